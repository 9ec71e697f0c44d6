"""The DiT's quantization schemes: one handler per scheme, looked up in one table.

As gpt-fast's quantize.py keeps one class per scheme, everything that differs between FP8 and INT8
lives in its handler here; the cache (`quant/cache.py`), the byte accounting (`quant/bytes.py`) and
the stages (`lowvram/stages.py`) look the scheme up in `QUANT_SCHEMES` instead of asking
"fp8 or int8?". Each handler answers:

- `linear_state(weight, bias, dtype)`: one policy linear's entries in the quantized state dict
  (works on meta tensors, which gives the cache file's layout);
- `load(meta_model, state_dict, policy, device)`: swap the policy's linears for the scheme's
  runtime modules and fill the model from a state dict the cache wrote;
- `linear_bytes(layer, dtype_bytes)`: the bytes of one quantized linear's weight with its scales
  (its bias stays in the compute dtype and is counted with the unquantized tensors);
- `versions()`: the packages whose version decides whether a cache is still valid (recorded in the
  cache header beside torch's and our quantizer's);
- `choose_matmul(requested, device)`: the matmul the scheme's linears run in a run: (its name,
  recorded in the run's stats, or None where there is no choice; a note for the user, or None).

"bf16" (nothing quantized) is the profiles' third DiT scheme and has no handler.
fp8.py and int8.py import optimum-quanto only when INT8 weights are made or loaded, so
`import quant.bytes`, which reads this table, pulls in neither quanto nor bitsandbytes.
"""

import torch
import torch.nn as nn

from hyvideo.errors import HyVideoError

from .fp8 import choose_fp8_matmul, fp8_linear_state, swap_linears_fp8
from .int8 import int8_linear_state, quanto_version, requantize_int8
from .policy import QuantPolicy


class FP8Scheme:
    """float8_e4m3fn weights with a float32 scale per output channel (quant/fp8.py)."""

    def linear_state(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> dict:
        return fp8_linear_state(weight, bias, dtype)

    def load(self, model: nn.Module, state_dict: dict, policy: "str | QuantPolicy", device: "torch.device | str") -> nn.Module:
        swap_linears_fp8(model, policy)
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.to(device)

    def linear_bytes(self, layer: nn.Linear, dtype_bytes: int) -> int:
        return layer.weight.numel() + 4 * layer.out_features  # 1 B per weight + a float32 scale per row

    def versions(self) -> dict[str, str]:
        return {}  # our own code only (the cache's "hyvideo-quant" version)

    def choose_matmul(self, requested: str, device: torch.device) -> tuple[str | None, str | None]:
        """"dequant" or "scaled_mm" for the profile's fp8_matmul (dequant | scaled_mm | auto)."""
        scaled_mm, note = choose_fp8_matmul(requested, device)
        return "scaled_mm" if scaled_mm else "dequant", note


class Int8Scheme:
    """int8 weights with a scale per output channel, through optimum-quanto (quant/int8.py)."""

    def linear_state(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> dict:
        return int8_linear_state(weight, bias, dtype)

    def load(self, model: nn.Module, state_dict: dict, policy: "str | QuantPolicy", device: "torch.device | str") -> nn.Module:
        return requantize_int8(model, state_dict, policy, device)

    def linear_bytes(self, layer: nn.Linear, dtype_bytes: int) -> int:
        # 1 B per weight + a scale per row in the compute dtype + quanto's two scalar activation scales
        return layer.weight.numel() + dtype_bytes * layer.out_features + 2 * dtype_bytes

    def versions(self) -> dict[str, str]:
        return {"optimum-quanto": quanto_version()}  # its layout and kernels decide what the cache holds

    def choose_matmul(self, requested: str, device: torch.device) -> tuple[str | None, str | None]:
        return None, None  # quanto picks its kernel per layer


QUANT_SCHEMES: dict[str, FP8Scheme | Int8Scheme] = {"fp8": FP8Scheme(), "int8": Int8Scheme()}


def quant_scheme(name: str) -> FP8Scheme | Int8Scheme:
    """The handler of DiT quantization scheme `name`; a HyVideoError naming the choices otherwise."""
    if name not in QUANT_SCHEMES:
        raise HyVideoError(f"unknown DiT quantization scheme {name!r}: choose one of {', '.join(QUANT_SCHEMES)}")
    return QUANT_SCHEMES[name]
