"""Which model class a config builds: the 13B HunyuanVideo or HunyuanVideo-1.5. One door for the
code that handles both the same way (byte accounting, the quantize-once cache, planning)."""

import torch.nn as nn

from .config import DiTConfig, VAEConfig
from .dit import HunyuanVideoDiT
from .v15_config import V15DiTConfig, V15VAEConfig
from .v15_dit import HunyuanVideo15DiT
from .v15_vae import HunyuanVideo15VAE
from .vae import CausalVAE


def dit_class(config: DiTConfig | V15DiTConfig) -> type[nn.Module]:
    return HunyuanVideo15DiT if isinstance(config, V15DiTConfig) else HunyuanVideoDiT


def vae_class(config: VAEConfig | V15VAEConfig) -> type[nn.Module]:
    return HunyuanVideo15VAE if isinstance(config, V15VAEConfig) else CausalVAE
