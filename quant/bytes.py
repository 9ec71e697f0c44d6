"""Byte accounting: how much memory each component's weights take under a storage scheme.

Counted from module shapes on the meta device (no weights needed), with the storage each scheme
really uses (the cache and the runtime modules use exactly these; the planner adds them up); a
quantized linear's bytes come from its scheme's handler (`quant/schemes.py`):

  bf16  every tensor 2 B/element (the compute dtype; `dtype` changes it)
  fp8   quantized weight 1 B/element + float32 scale per output channel (4 B x out)
  int8  quantized weight 1 B/element + scale per output channel in the compute dtype (2 B x out)
        + quanto's two scalar activation scales per layer (2 x 2 B)
Only the nn.Linear layers inside the blocks named by the quant policy are quantized ("blocks": the
320 layers of Tencent's FP8 release, facts §1.14); non-quantized tensors (biases, norms,
embedders, refiner, final layer) are 2 B/element in every scheme. For the 13B config the 320 block
linears hold 12,457,082,880 weight elements and the rest 363,929,664 (facts §1.1, §1.14).

Text encoders are not built here (their configs live in transformers); their sizes are fixed facts
of the released checkpoints (facts §4): the Llama-3-8B base model (no lm_head) and CLIP-L's text
tower. `llm_nf4_bytes` estimates the 4-bit text encoder: bitsandbytes NF4 packs 2 weights per byte
with one absmax per 64-element block; double quantization stores that absmax as 1 byte plus one
float32 per 256 blocks (without it: a float32 per block). Embeddings and norms stay 2 B/element.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn

from hyvideo.blocks import DoubleStreamBlock, SingleStreamBlock
from hyvideo.config import DiTConfig, VAEConfig
from hyvideo.errors import HyVideoError
from hyvideo.models import dit_class, vae_class
from hyvideo.v15_config import V15DiTConfig

from .policy import POLICIES, QuantPolicy, get_policy
from .schemes import QUANT_SCHEMES

DIT_SCHEMES = (*QUANT_SCHEMES, "bf16")  # fp8, int8, bf16: fastest-to-load first, as profiles list them
ENCODER_SCHEMES = ("nf4", "bf16")
QUANT_POLICIES = tuple(POLICIES)
NF4_BLOCKSIZE = 64
NF4_DOUBLE_QUANT_BLOCKSIZE = 256


# Llama-3-8B as saved by the official preprocessing (AutoModel: no lm_head): 32 layers, hidden 4096,
# MLP 14336, 8 KV heads of 128, vocab 128256.
LLM_EMBED_PARAMS = 128_256 * 4096  # 525,336,576: stays bf16 under NF4 (bitsandbytes skips embeddings)
LLM_LINEAR_PARAMS = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # 6,979,321,856
LLM_OTHER_PARAMS = 32 * 2 * 4096 + 4096  # RMSNorm weights (262,144 + 4,096)
CLIP_TEXT_PARAMS = 123_060_480  # CLIP-L/14 text transformer (kept fp16 in every scheme)
LLAVA_VISION_PARAMS = 303_507_456 + 20_979_712  # HunyuanVideo-I2V's LLaVA: CLIP-ViT-L/14-336 tower + projector (16-bit)
LLAVA_IMAGE_TOKENS = 576  # 24 x 24 patches of 14 px at 336 px

# Quantized linears whose dequantized weights are alive at the same time (hyvideo/blocks.py runs
# each chunk loop inside `held_weights`: an MLP pair together, every other linear alone).
HELD_TOGETHER = {"double": (("img_mlp.fc1", "img_mlp.fc2"), ("txt_mlp.fc1", "txt_mlp.fc2")), "single": (("linear1", "linear2"),)}


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise HyVideoError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


@lru_cache(maxsize=8)
def _meta_dit(config: DiTConfig | V15DiTConfig) -> nn.Module:
    """The DiT of `config` on the meta device: the 13B model's or HunyuanVideo-1.5's."""
    with torch.device("meta"):
        return dit_class(config)(config)


@dataclass(frozen=True)
class WeightBytes:
    quantized_elements: int  # weight elements stored in 8 bits
    unquantized_elements: int  # everything else, in the compute dtype
    quantized_bytes: int  # quantized weights plus their scales
    unquantized_bytes: int
    total: int


def scheme_bytes(module: nn.Module, quantized: set[str], scheme: str, dtype: torch.dtype = torch.bfloat16) -> WeightBytes:
    """Bytes `module`'s parameters would take with the linears named in `quantized` (paths relative
    to `module`) stored with `scheme` (the module itself may be unquantized, or on meta)."""
    _check(scheme, DIT_SCHEMES, "DiT scheme")
    dtype_bytes = dtype.itemsize
    q_elements = q_bytes = u_elements = 0
    handler = QUANT_SCHEMES.get(scheme)  # None for bf16: nothing is quantized
    quantized = quantized if handler else set()
    for name, sub in module.named_modules():
        if name in quantized:
            q_elements += sub.weight.numel()
            q_bytes += handler.linear_bytes(sub, dtype_bytes)
            u_elements += sum(p.numel() for n, p in sub.named_parameters(recurse=False) if n != "weight")
        else:
            u_elements += sum(p.numel() for p in sub.parameters(recurse=False))
    u_bytes = u_elements * dtype_bytes
    return WeightBytes(q_elements, u_elements, q_bytes, u_bytes, q_bytes + u_bytes)


def weight_bytes(config: DiTConfig, scheme: str, policy: "str | QuantPolicy" = "blocks",
                 dtype: torch.dtype = torch.bfloat16) -> WeightBytes:
    """The whole DiT's weights under `scheme` ("bf16", "fp8", "int8") and `policy`."""
    return scheme_bytes(_meta_dit(config), set(get_policy(policy).module_names(config)), scheme, dtype)


def block_bytes(config: DiTConfig, scheme: str, policy: "str | QuantPolicy" = "blocks", kind: str = "double",
                dtype: torch.dtype = torch.bfloat16) -> WeightBytes:
    """One double- or single-stream block's weights: what a block streamer moves per block."""
    names = get_policy(policy).block_names(kind)  # ValueError for an unknown kind
    block_class = DoubleStreamBlock if kind == "double" else SingleStreamBlock
    with torch.device("meta"):
        block = block_class(config.hidden_size, config.heads, config.mlp_hidden)
    return scheme_bytes(block, set(names), scheme, dtype)


def modulation_probe_bytes(config: DiTConfig, scheme: str, policy: "str | QuantPolicy" = "blocks") -> int:
    """Double block 0's image modulation under `scheme`: the step cache's probe (hyvideo/step_cache.py),
    which stays on the GPU beside the trunk when caching is on."""
    prefix = "img_mod."
    names = {name[len(prefix):] for name in get_policy(policy).block_names("double") if name.startswith(prefix)}
    with torch.device("meta"):
        block = DoubleStreamBlock(config.hidden_size, config.heads, config.mlp_hidden)
    return scheme_bytes(block.img_mod, names, scheme).total


def llm_nf4_bytes(quantized_params: int, unquantized_params: int = 0, double_quant: bool = True,
                  unquantized_bytes_per_param: int = 2) -> int:
    """Estimated bytes of a bitsandbytes NF4 LLM: `quantized_params` linear weights in NF4 (with
    their absmax statistics) plus `unquantized_params` (embeddings, norms) at 2 B each.
    Ignores the per-tensor constants (a 16-entry code table, an offset), < 1 KB per layer."""
    blocks = -(-quantized_params // NF4_BLOCKSIZE)
    if double_quant:
        absmax = blocks + 4 * -(-blocks // NF4_DOUBLE_QUANT_BLOCKSIZE)
    else:
        absmax = 4 * blocks
    return -(-quantized_params // 2) + absmax + unquantized_bytes_per_param * unquantized_params


def llm_param_counts(llama_config) -> tuple[int, int]:
    """(linear weight elements NF4 would quantize, all other parameters) of a transformers
    LlamaModel (no LM head, as the encoder is loaded), counted on the meta device."""
    from transformers import LlamaModel

    with torch.device("meta"):
        model = LlamaModel(llama_config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    return linear, total - linear


def param_counts(make_model) -> tuple[int, int]:
    """(nn.Linear weight elements, all other parameters) of the model `make_model()` builds on the
    meta device: what an NF4 encoder quantizes and what stays 16-bit (any transformers model)."""
    with torch.device("meta"):
        model = make_model()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return linear, sum(p.numel() for p in model.parameters()) - linear


def dit_block_kinds(config: DiTConfig) -> list[str]:
    """Kind of each of the blocks in run order: the double blocks, then the single blocks."""
    return ["double"] * config.double_blocks + ["single"] * config.single_blocks


def trunk_bytes(config: DiTConfig) -> int:
    """Bytes of everything outside the 60 blocks (embedders, token refiner, final layer), bf16."""
    model = _meta_dit(config)
    in_blocks = {id(p) for block in model.all_blocks() for p in block.parameters()}
    return sum(p.numel() * 2 for p in model.parameters() if id(p) not in in_blocks)


def dequantized_weight_bytes(config: DiTConfig, scheme: str, policy: str, act_bytes: int = 2) -> int:
    """Transient GPU bytes of dequantized weights while a block runs: the weights held together by
    one chunk loop, plus the `W_q.to(bf16)` temporary of building the largest of them. For the 13B
    model the largest is the single block's linear1 + linear2 pair (0.33 GiB). 0 for bf16."""
    if scheme == "bf16":
        return 0
    model = _meta_dit(config)
    peak = 0
    for kind, blocks in (("double", model.double_blocks), ("single", getattr(model, "single_blocks", ()))):
        if not len(blocks):
            continue
        quantized = {name: blocks[0].get_submodule(name).weight.numel() for name in get_policy(policy).block_names(kind)}
        groups = [(name,) for name in quantized] + list(HELD_TOGETHER[kind])
        for group in groups:
            sizes = [quantized[name] for name in group if name in quantized]
            if sizes:
                peak = max(peak, sum(sizes) + max(sizes))
    return peak * act_bytes


@dataclass(frozen=True)
class TextEncoderSize:
    """One text encoder as the planner counts it. A model's text stage is a list of these (13B:
    the LLaVA-Llama-3 language model and CLIP-L's text model), so the planner needs no names."""

    name: str
    linear: int  # linear weight elements the profile's encoder scheme may store in NF4 (0: always 16-bit)
    other: int  # parameters that stay 16-bit (embeddings, norms; all of a small encoder)
    activation_bytes: int = 0  # its forward's peak activations at batch 1
    phase: int = 0  # encoders of a later phase load after those of earlier phases are freed (1.5 I2V: SigLIP after Qwen)

    def weight_bytes(self, scheme: str) -> int:
        """bf16/fp16: 2 bytes a parameter; nf4: the linears in 4 bits (bitsandbytes, double quant)."""
        _check(scheme, ENCODER_SCHEMES, "text encoder scheme")
        if scheme == "bf16" or not self.linear:
            return (self.linear + self.other) * 2
        return llm_nf4_bytes(self.linear, self.other)


@lru_cache(maxsize=8)
def vae_decoder_bytes(config: VAEConfig, bytes_per_element: int = 2) -> int:
    """Decoder + post_quant_conv weights (fp16 by default, as the official VAE runs; the 1.5 VAE
    has no post_quant_conv)."""
    with torch.device("meta"):
        vae = vae_class(config)(config)
    post = getattr(vae, "post_quant_conv", None)
    params = sum(p.numel() for p in vae.decoder.parameters()) + (sum(p.numel() for p in post.parameters()) if post else 0)
    return params * bytes_per_element


@lru_cache(maxsize=8)
def vae_parameters(config: VAEConfig) -> int:
    """The whole VAE's parameters (encoder and decoder: image-to-video loads both)."""
    with torch.device("meta"):
        return sum(p.numel() for p in vae_class(config)(config).parameters())
