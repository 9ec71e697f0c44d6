"""INT8 weight-only linears through optimum-quanto (per-output-channel scales).

INT8 stores the same 1 byte per weight as FP8 but spends all 8 bits on a uniform grid:
W ~= W_int8 * scale[out], scale = amax of the row / 127 (quanto's `qint8` weights, axis 0). For
weights without extreme outliers this is ~4x more accurate than e4m3 (policy.py has the numbers);
activations stay in the compute dtype (quanto dequantizes, or uses its int8 kernels, per layer).

Two verbs, as in gpt-fast's quantize.py:
- make the quantized state dict: `int8_linear_state(weight, bias)` (one layer's tensors, in
  quanto's key layout: weight._data, weight._scale, bias, input_scale, output_scale);
- swap modules for runtime: `quantize_int8(model, policy)` quantizes and freezes a real model in
  place; `requantize_int8(meta_model, state_dict, policy)` rebuilds a saved one without quantizing
  again (quanto's `requantize` with our quantization map).

optimum-quanto is optional: without it every entry point raises a HyVideoError naming the pip
command. `forward_rows` is not provided: `hyvideo.blocks.linear_rows` computes all outputs of a
quanto layer and slices (the single block's linear1 then runs its matmul twice).
"""

import torch
import torch.nn as nn

from hyvideo.errors import HyVideoError

from .policy import QuantPolicy, get_policy


def quanto():
    """The optimum.quanto module, or a HyVideoError saying how to get it."""
    try:
        import optimum.quanto as module
    except ImportError as error:
        raise HyVideoError(
            "INT8 weights need optimum-quanto, which is not installed: pip install optimum-quanto "
            "(or choose the fp8 scheme)"
        ) from error
    return module


def quanto_version() -> str:
    from importlib.metadata import version

    quanto()  # the HyVideoError with the pip command if it is missing
    return version("optimum-quanto")


class _Holder(nn.Module):
    """quanto replaces *children*; a lone linear is quantized as the child of this holder."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def int8_linear_state(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> dict:
    """One linear's entries in a quanto INT8 state dict (works on meta tensors for shapes)."""
    q = quanto()
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=dtype)
    layer.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    holder = _Holder(layer)
    q.quantize(holder, weights=q.qint8)
    q.freeze(holder)
    return dict(holder.layer.state_dict())


def quantization_map(names: list[str]) -> dict[str, dict[str, str]]:
    """quanto's serialization map for INT8 weights, no activation quantization."""
    return {name: {"weights": "qint8", "activations": "none"} for name in names}


def quantize_int8(model: nn.Module, policy: "str | QuantPolicy" = "blocks") -> list[str]:
    """Quantize the policy's linears of a real (not meta) model to INT8 in place; returns their names."""
    q = quanto()
    names = get_policy(policy).select(model)
    q.quantize(model, weights=q.qint8, include=names)
    q.freeze(model)
    return names


def requantize_int8(model: nn.Module, state_dict: dict, policy: "str | QuantPolicy" = "blocks",
                    device: "torch.device | str" = "cpu") -> nn.Module:
    """Fill a meta-device model from an INT8 state dict (as written by the cache) without
    quantizing again. quanto's `requantize` loads non-strictly, so the keys are checked here:
    a missing tensor would otherwise stay uninitialized memory. quanto also *copies* into the
    model's existing dtype, so the meta model is first cast to the state dict's compute dtype (that
    of img_in, `HunyuanVideoDiT.compute_dtype`)."""
    q = quanto()
    names = get_policy(policy).select(model)
    if "img_in.proj.weight" in state_dict:
        model.to(state_dict["img_in.proj.weight"].dtype)
    q.requantize(model, state_dict, quantization_map(names), device=torch.device(device))
    expected, given = set(model.state_dict()), set(state_dict)
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise HyVideoError(
            f"INT8 weights do not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); rebuild the quantized cache"
        )
    model.requires_grad_(False)
    return model
