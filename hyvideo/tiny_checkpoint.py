"""Write a complete random checkpoint folder of a small HunyuanVideo, in the official or the
diffusers layout, so tests, `lowvram demo` and benchmarks run the real loading code offline.

The same seed gives the same weights in both layouts.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import OFFICIAL_DIT, OFFICIAL_VAE
from .config import DIT_CONFIGS, VAE_CONFIGS, DiTConfig, VAEConfig
from .diffusers_keys import official_to_diffusers
from .dit import HunyuanVideoDiT
from .tiny_text_encoders import write_tiny_clip, write_tiny_llm
from .vae import CausalVAE

LAYOUTS = ("official", "diffusers")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def random_weights(dit_config: DiTConfig, vae_config: VAEConfig, seed: int) -> tuple[dict, dict]:
    """PyTorch's default init, seeded: O(1) activations, every parameter non-trivial."""
    torch.manual_seed(seed)
    dit = HunyuanVideoDiT(dit_config)
    vae = CausalVAE(vae_config)
    return dit.state_dict(), vae.state_dict()


def official_vae_config(config: VAEConfig) -> dict:
    """`vae/config.json` as Tencent ships it (diffusers-style fields, official class name)."""
    levels = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKLCausal3D", **config.to_dict(),
        "act_fn": "silu", "sample_size": 256, "sample_tsize": 64,
        "down_block_types": ["DownEncoderBlockCausal3D"] * levels,
        "up_block_types": ["UpDecoderBlockCausal3D"] * levels,
    }


def diffusers_vae_config(config: VAEConfig) -> dict:
    levels = len(config.block_out_channels)
    values = config.to_dict()
    values["temporal_compression_ratio"] = values.pop("time_compression_ratio")
    return {
        "_class_name": "AutoencoderKLHunyuanVideo", **values, "act_fn": "silu",
        "down_block_types": ["HunyuanVideoDownBlock3D"] * levels,
        "up_block_types": ["HunyuanVideoUpBlock3D"] * levels,
    }


def write_tiny_checkpoint(
    root: Path, layout: str = "official", seed: int = 0,
    dit_config: DiTConfig = DIT_CONFIGS["tiny"], vae_config: VAEConfig = VAE_CONFIGS["tiny"],
) -> Path:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    root = Path(root)
    dit_sd, vae_sd = random_weights(dit_config, vae_config, seed)
    llm_kwargs = {"hidden_size": dit_config.text_states_dim, "seed": seed}
    clip_kwargs = {"hidden_size": dit_config.text_states_dim_2, "seed": seed}
    if layout == "official":
        dit_path = root / OFFICIAL_DIT
        dit_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"module": dit_sd}, dit_path)
        vae_dir = root / OFFICIAL_VAE
        vae_dir.mkdir(parents=True, exist_ok=True)
        torch.save(vae_sd, vae_dir / "pytorch_model.pt")
        (vae_dir / "config.json").write_text(json.dumps(official_vae_config(vae_config), indent=2))
        write_tiny_llm(root / "text_encoder", **llm_kwargs)
        write_tiny_clip(root / "text_encoder_2", **clip_kwargs)
        return root

    transformer = root / "transformer"
    transformer.mkdir(parents=True, exist_ok=True)
    (transformer / "config.json").write_text(json.dumps(dit_config.to_diffusers(), indent=2))
    _save_sharded(official_to_diffusers(dit_sd), transformer, shards=2)
    vae_dir = root / "vae"
    vae_dir.mkdir(parents=True, exist_ok=True)
    (vae_dir / "config.json").write_text(json.dumps(diffusers_vae_config(vae_config), indent=2))
    save_file({k: v.contiguous() for k, v in vae_sd.items()}, vae_dir / "diffusion_pytorch_model.safetensors")
    write_tiny_llm(root / "text_encoder", **llm_kwargs)
    write_tiny_clip(root / "text_encoder_2", **clip_kwargs)
    _move_tokenizer(root / "text_encoder", root / "tokenizer")
    _move_tokenizer(root / "text_encoder_2", root / "tokenizer_2")
    return root


def _save_sharded(state_dict: dict, folder: Path, shards: int) -> None:
    """diffusers' sharded format: N safetensors files plus an index mapping keys to files."""
    keys = sorted(state_dict)
    per_shard = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state_dict[k].contiguous() for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _move_tokenizer(model_folder: Path, tokenizer_folder: Path) -> None:
    tokenizer_folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (model_folder / name).exists():
            shutil.move(str(model_folder / name), tokenizer_folder / name)
