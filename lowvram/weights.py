"""Weight bytes per storage scheme, computed from module shapes on the meta device (no weights needed).

DiT bytes come from `quant/bytes.py` (the accounting the quantized modules really use): only the
nn.Linear layers inside the 60 blocks named by the quant policy are quantized ("blocks": the 320
layers of Tencent's FP8 release, facts §1.14); everything else (trunk, biases, norms) stays bf16.
- bf16: 2 bytes per element;
- fp8:  float8_e4m3fn weight (1 byte/element) + a float32 scale per output channel;
- int8: int8 weight (1 byte/element) + a bf16 scale per output channel + quanto's two scalars.

Text encoders are not built here (their configs live in transformers); their sizes are fixed
facts of the released checkpoints (facts §4): the Llama-3-8B base model (no lm_head) and CLIP-L's
text tower.
"""

from functools import lru_cache

import torch

from hyvideo.config import DiTConfig, VAEConfig
from hyvideo.errors import HyVideoError

from quant import bytes as quant_bytes
from quant.policy import POLICIES, get_policy

DIT_SCHEMES = ("fp8", "int8", "bf16")
ENCODER_SCHEMES = ("nf4", "bf16")
QUANT_POLICIES = tuple(POLICIES)
BLOCK_KINDS = ("double", "single")

# Llama-3-8B as saved by the official preprocessing (AutoModel: no lm_head): 32 layers, hidden 4096,
# MLP 14336, 8 KV heads of 128, vocab 128256.
LLM_EMBED_PARAMS = 128_256 * 4096  # 525,336,576: stays bf16 under NF4 (bitsandbytes skips embeddings)
LLM_LINEAR_PARAMS = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # 6,979,321,856
LLM_OTHER_PARAMS = 32 * 2 * 4096 + 4096  # RMSNorm weights (262,144 + 4,096)
CLIP_TEXT_PARAMS = 123_060_480  # CLIP-L/14 text transformer (kept fp16 in every scheme)


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise HyVideoError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


@lru_cache(maxsize=8)
def _meta_dit(config: DiTConfig):
    from hyvideo.dit import HunyuanVideoDiT

    with torch.device("meta"):
        return HunyuanVideoDiT(config)


def block_bytes(config: DiTConfig, scheme: str, policy: str, kind: str) -> int:
    """Bytes of one DiT block of `kind` ("double" or "single") stored with `scheme`."""
    _check(scheme, DIT_SCHEMES, "DiT scheme")
    _check(policy, QUANT_POLICIES, "quant policy")
    _check(kind, BLOCK_KINDS, "block kind")
    return quant_bytes.block_bytes(config, scheme, policy, kind).total


# Quantized linears whose dequantized weights are alive at the same time (hyvideo/blocks.py runs
# each chunk loop inside `held_weights`: an MLP pair together, every other linear alone).
HELD_TOGETHER = {"double": (("img_mlp.fc1", "img_mlp.fc2"), ("txt_mlp.fc1", "txt_mlp.fc2")), "single": (("linear1", "linear2"),)}


def dequantized_weight_bytes(config: DiTConfig, scheme: str, policy: str, act_bytes: int = 2) -> int:
    """Transient GPU bytes of dequantized weights while a block runs: the weights held together by
    one chunk loop, plus the `W_q.to(bf16)` temporary of building the largest of them. For the 13B
    model the largest is the single block's linear1 + linear2 pair (0.33 GiB). 0 for bf16."""
    if scheme == "bf16":
        return 0
    model = _meta_dit(config)
    peak = 0
    for kind, blocks in (("double", model.double_blocks), ("single", model.single_blocks)):
        if not len(blocks):
            continue
        quantized = {name: blocks[0].get_submodule(name).weight.numel() for name in get_policy(policy).block_names(kind)}
        groups = [(name,) for name in quantized] + list(HELD_TOGETHER[kind])
        for group in groups:
            sizes = [quantized[name] for name in group if name in quantized]
            if sizes:
                peak = max(peak, sum(sizes) + max(sizes))
    return peak * act_bytes


def trunk_bytes(config: DiTConfig) -> int:
    """Bytes of everything outside the 60 blocks (embedders, token refiner, final layer), bf16."""
    model = _meta_dit(config)
    in_blocks = {id(p) for block in model.all_blocks() for p in block.parameters()}
    return sum(p.numel() * 2 for p in model.parameters() if id(p) not in in_blocks)


def weight_bytes(config: DiTConfig, scheme: str, policy: str) -> int:
    """Bytes of the whole DiT stored with `scheme` (13B: bf16 25.6 GB, fp8 13.2 GB)."""
    return (trunk_bytes(config) + config.double_blocks * block_bytes(config, scheme, policy, "double")
            + config.single_blocks * block_bytes(config, scheme, policy, "single"))


def dit_block_kinds(config: DiTConfig) -> list[str]:
    """Kind of each of the blocks in run order: the double blocks, then the single blocks."""
    return ["double"] * config.double_blocks + ["single"] * config.single_blocks


def llm_bytes(scheme: str) -> int:
    """The LLM text encoder's weights: bf16 15.0 GB, nf4 4.6 GB (bitsandbytes, double quant)."""
    _check(scheme, ENCODER_SCHEMES, "text encoder scheme")
    other = LLM_EMBED_PARAMS + LLM_OTHER_PARAMS  # embeddings and norms stay bf16 under NF4
    if scheme == "bf16":
        return (LLM_LINEAR_PARAMS + other) * 2
    return quant_bytes.llm_nf4_bytes(LLM_LINEAR_PARAMS, other)


def clip_bytes() -> int:
    return CLIP_TEXT_PARAMS * 2  # fp16


@lru_cache(maxsize=8)
def vae_decoder_bytes(config: VAEConfig, bytes_per_element: int = 2) -> int:
    """Decoder + post_quant_conv weights (fp16 by default, as the official VAE runs)."""
    from hyvideo.vae import CausalVAE

    with torch.device("meta"):
        vae = CausalVAE(config)
    params = sum(p.numel() for p in vae.decoder.parameters()) + sum(p.numel() for p in vae.post_quant_conv.parameters())
    return params * bytes_per_element
