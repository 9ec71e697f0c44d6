"""Byte accounting: how much memory the DiT's (or one block's) weights take under a scheme.

Counted from the module shapes of the model built on the meta device (no weights needed), with
the storage each scheme really uses (the cache and the runtime modules use exactly these):

  bf16  every tensor 2 B/element (the compute dtype; `dtype` changes it)
  fp8   quantized weight 1 B/element + float32 scale per output channel (4 B x out)
  int8  quantized weight 1 B/element + scale per output channel in the compute dtype (2 B x out)
        + quanto's two scalar activation scales per layer (2 x 2 B)
Non-quantized tensors (biases, norms, embedders, refiner, final layer) are 2 B/element in every
scheme. For the 13B config the 320 block linears hold 12,457,082,880 weight elements and the rest
363,929,664 (facts §1.1, §1.14).

`llm_nf4_bytes` estimates the 4-bit text encoder: bitsandbytes NF4 packs 2 weights per byte with one
absmax per 64-element block; double quantization stores that absmax as 1 byte plus one float32 per
256 blocks (without it: a float32 per block). Embeddings and norms stay 2 B/element.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from hyvideo.blocks import DoubleStreamBlock, SingleStreamBlock
from hyvideo.config import DiTConfig
from hyvideo.dit import HunyuanVideoDiT

from .policy import QuantPolicy, get_policy

DIT_SCHEMES = ("bf16", "fp8", "int8")
NF4_BLOCKSIZE = 64
NF4_DOUBLE_QUANT_BLOCKSIZE = 256


@dataclass(frozen=True)
class WeightBytes:
    quantized_elements: int  # weight elements stored in 8 bits
    unquantized_elements: int  # everything else, in the compute dtype
    quantized_bytes: int  # quantized weights plus their scales
    unquantized_bytes: int
    total: int


def _quantized_linear_bytes(layer: nn.Linear, scheme: str, dtype_bytes: int) -> int:
    out_features = layer.out_features
    if scheme == "fp8":
        return layer.weight.numel() + 4 * out_features
    return layer.weight.numel() + dtype_bytes * out_features + 2 * dtype_bytes  # int8


def module_bytes(module: nn.Module, quantized: set[str], scheme: str, dtype: torch.dtype = torch.bfloat16) -> WeightBytes:
    """Bytes of `module`'s parameters when the linears named in `quantized` (paths relative to
    `module`) are stored with `scheme`."""
    if scheme not in DIT_SCHEMES:
        raise ValueError(f"scheme must be one of {DIT_SCHEMES}, not {scheme!r}")
    dtype_bytes = dtype.itemsize
    q_elements = q_bytes = u_elements = 0
    quantized = set() if scheme == "bf16" else quantized
    for name, sub in module.named_modules():
        if name in quantized:
            q_elements += sub.weight.numel()
            q_bytes += _quantized_linear_bytes(sub, scheme, dtype_bytes)
            u_elements += sum(p.numel() for n, p in sub.named_parameters(recurse=False) if n != "weight")
        else:
            u_elements += sum(p.numel() for p in sub.parameters(recurse=False))
    u_bytes = u_elements * dtype_bytes
    return WeightBytes(q_elements, u_elements, q_bytes, u_bytes, q_bytes + u_bytes)


def weight_bytes(config: DiTConfig, scheme: str, policy: "str | QuantPolicy" = "blocks",
                 dtype: torch.dtype = torch.bfloat16) -> WeightBytes:
    """The whole DiT's weights under `scheme` ("bf16", "fp8", "int8") and `policy`."""
    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    return module_bytes(model, set(get_policy(policy).module_names(config)), scheme, dtype)


def block_bytes(config: DiTConfig, scheme: str, policy: "str | QuantPolicy" = "blocks", kind: str = "double",
                dtype: torch.dtype = torch.bfloat16) -> WeightBytes:
    """One double- or single-stream block's weights: what a block streamer moves per block."""
    names = get_policy(policy).block_names(kind)
    block_class = DoubleStreamBlock if kind == "double" else SingleStreamBlock
    with torch.device("meta"):
        block = block_class(config.hidden_size, config.heads, config.mlp_hidden)
    return module_bytes(block, set(names), scheme, dtype)


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
