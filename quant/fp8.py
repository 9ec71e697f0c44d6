"""FP8 (e4m3) weight-only linears: the format of Tencent's `--use-fp8` release (facts §1.14).

Two verbs, as in gpt-fast's quantize.py:
- make the quantized state dict: `quantize_fp8(weight)` -> (float8_e4m3fn weight, float32 scale),
  `fp8_linear_state(weight, bias)` for one layer's tensors;
- swap modules for runtime: `swap_linears_fp8(model, policy)` replaces the policy's nn.Linear
  modules by `FP8Linear` in place.

Storage: W ~= W_fp8 * scale. The scale is per output channel ([out, 1], amax of the row / 448) when
we quantize, which keeps each row's largest weight at e4m3's largest normal value; Tencent's file
uses one scale per layer ([1, 1] here). Halving the 2-byte bf16 weights is the whole point: the
320 block linears go from 24.9 GB to 12.5 GB.

Runtime (default): the forward dequantizes the weight to the activation dtype just in time
(`W_fp8.to(bf16) * scale.to(bf16)`, exactly Tencent's arithmetic) and calls F.linear. The bf16
copy of one layer exists only during its matmul; the math is an ordinary bf16 linear on a weight
with 3 mantissa bits.

Opt-in fast path (`use_scaled_mm=True`; CUDA with compute capability >= 8.9 only, never turned on
by default): `torch._scaled_mm` multiplies FP8 by FP8 on the tensor cores, without materializing a
bf16 weight. It must quantize the *activations* to e4m3 too, which the dequant path does not do,
so it adds a second, independent e4m3 rounding. Measured on an H200 against float32 (normal
weights): one 3072x3072 layer 2.67 % (dequant) -> 3.74 % (scaled_mm); the whole tiny DiT
3.05 % -> 4.23 % (Student-t weights 2.60 % -> 4.44 %). Scales used:
- x (flattened to [M, K]) gets a dynamic per-token (row-wise) scale s_x[m] = amax_k |x[m, k]| / 448
  (float32, [M, 1]); x_fp8 = x / s_x rounded to e4m3;
- W uses its stored scale as a per-output-channel column scale s_w[n] ([1, N]; a per-tensor scale is
  broadcast to all N);
- y[m, n] = s_x[m] * s_w[n] * sum_k x_fp8[m, k] W_fp8[n, k], accumulated in float32, written in
  bf16, then + bias.
Memory: x_fp8 (1 byte per element) and its scales, with the float32 division done QUANT_ROWS rows
at a time in place; s_x comes from one reduction (no |x| copy). Out of place, the float32 copy of x
and its |x|, quotient and clamp were 16 bytes per element: ~1.2-1.5 GB per 8192-token chunk of the
13B model's 15360-wide linear2 input, which the planner did not know of. The planner counts these
temporaries (lowvram/activations.py, `scaled_mm_bytes`).
Availability (`scaled_mm_unavailable_reason`) is checked once, where the path is turned on
(`set_scaled_mm`, `choose_fp8_matmul`), never per call: a check inside the forward costs a device
query per linear and breaks torch.compile's graphs. (PyTorch's CPU `_scaled_mm` takes row-wise
scales too, which is what the CPU tests run.)
"""

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from hyvideo.errors import HyVideoError

from .policy import QuantPolicy, get_policy

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
_TINY = 1e-12  # floor for scales, so an all-zero row quantizes to zeros instead of NaN
QUANT_ROWS = 1024  # rows of activations divided in float32 at a time (bounds that scratch to 1024 x K x 4 bytes)


def quantize_fp8(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] weight -> (float8_e4m3fn [out, in], float32 scale [out, 1] or [1, 1]).

    The scale maps each row's (or the tensor's) largest magnitude to 448, so no weight saturates
    and the largest ones keep full e4m3 precision. Works on meta tensors (shapes only)."""
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1, 1)
    scale = amax.clamp(min=_TINY) / FP8_MAX
    w_fp8 = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return w_fp8, scale


def dequantize_fp8(w_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W_fp8 * scale in `dtype` (both factors cast first: Tencent's order, so its file dequantizes
    bit-identically)."""
    return w_fp8.to(dtype) * scale.to(dtype)


def fp8_linear_state(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, per_channel: bool = True) -> dict:
    """One linear's entries in an FP8 state dict: weight, scale, and the bias in the compute dtype."""
    w_fp8, scale = quantize_fp8(weight, per_channel)
    state = {"weight": w_fp8, "scale": scale}
    if bias is not None:
        state["bias"] = bias.to(dtype)
    return state


@lru_cache(maxsize=None)
def _probe_scaled_mm(device: str) -> str | None:
    """Run one tiny row-wise-scaled FP8 matmul on `device`; None if it works, else why not."""
    try:
        x = torch.randn(16, 32, device=device).to(FP8_DTYPE)
        w = torch.randn(16, 32, device=device).to(FP8_DTYPE)
        out = torch._scaled_mm(x, w.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                               out_dtype=torch.bfloat16)
        if not torch.isfinite(out).all():
            return "torch._scaled_mm gives non-finite results here"
    except Exception as error:  # unsupported scaling mode, architecture or torch build: many error types
        return f"torch._scaled_mm with row-wise scales fails here ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    return None


def scaled_mm_unavailable_reason(device: torch.device | str) -> str | None:
    """None if the FP8 tensor-core matmul works on `device`, else why not. It needs Ada/Hopper or
    newer (compute capability >= 8.9) *and* a torch build whose `_scaled_mm` takes row-wise scales
    there (not every architecture / version does): probed once per device with a tiny matmul."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"it needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper), not {device}"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "it needs compute capability >= 8.9 (Ada/Hopper)"
    return _probe_scaled_mm(str(device))


def scaled_mm_supported(device: torch.device | str) -> bool:
    return scaled_mm_unavailable_reason(device) is None


def quantize_rows_fp8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (e4m3 [M, K], float32 row scales [M, 1]) with x2 ~= x_fp8 * scale; the float32
    quotient exists for QUANT_ROWS rows at a time (same values as dividing all rows at once)."""
    amax = torch.linalg.vector_norm(x2, ord=float("inf"), dim=1, keepdim=True)  # max |x| per row, exact in x's dtype
    x_scale = amax.float().clamp_(min=_TINY).div_(FP8_MAX)  # [M, 1]
    x_fp8 = torch.empty(x2.shape, dtype=FP8_DTYPE, device=x2.device)
    for start in range(0, x2.shape[0], QUANT_ROWS):
        rows = slice(start, start + QUANT_ROWS)
        x_fp8[rows] = x2[rows].to(torch.float32, copy=True).div_(x_scale[rows]).clamp_(-FP8_MAX, FP8_MAX)  # never x's own
    return x_fp8, x_scale


def scaled_mm_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (W_fp8 * w_scale).T + bias with x quantized per token to e4m3 (see module docstring).
    Assumes the caller checked that `_scaled_mm` runs here (once, not per call)."""
    shape = x.shape
    x_fp8, x_scale = quantize_rows_fp8(x.reshape(-1, shape[-1]))  # [M, K], [M, 1]
    w_scale = w_scale.float().expand(w_fp8.shape[0], 1).reshape(1, -1).contiguous()  # [1, N]
    out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
    del x_fp8
    out = out.to(x.dtype)
    if bias is not None:
        out += bias  # in place: `out` is this call's own tensor
    return out.reshape(*shape[:-1], -1)


class FP8Linear(nn.Module):
    """Linear with a float8_e4m3fn weight and a float32 scale; bias in the compute dtype.

    State-dict keys: weight [out, in] (fp8), scale [out, 1] or [1, 1] (float32), bias [out].
    Do not call `model.to(dtype)` after swapping: torch counts fp8 as floating point and would
    convert the weight; the forward refuses a weight that is no longer fp8.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, per_channel: bool = True,
                 dtype: torch.dtype = torch.bfloat16, device=None, use_scaled_mm: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.use_scaled_mm = use_scaled_mm
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False)
        rows = out_features if per_channel else 1
        self.register_buffer("scale", torch.ones(rows, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._hold = False  # see hold_weight
        self._held: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = True, use_scaled_mm: bool = False) -> "FP8Linear":
        """Quantize a real linear, or make an empty meta FP8Linear from a meta one (to be filled by
        `load_state_dict(..., assign=True)`)."""
        weight, bias = linear.weight, linear.bias
        layer = cls(linear.in_features, linear.out_features, bias is not None, per_channel, weight.dtype,
                    device="meta", use_scaled_mm=use_scaled_mm)
        if weight.device.type != "meta":
            state = fp8_linear_state(weight.detach(), None if bias is None else bias.detach(), weight.dtype, per_channel)
            layer.load_state_dict(state, assign=True)
        return layer

    def dequantize(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """The (rows of the) weight in `dtype`, [rows, in]."""
        scale = self.scale[rows] if self.scale.shape[0] > 1 else self.scale
        return dequantize_fp8(self.weight[rows], scale, dtype)

    def hold_weight(self) -> None:
        """Keep the dequantized weight from the next call until `release_weight()`: the DiT's
        blocks call a layer once per token chunk (`hyvideo.blocks.held_weights`), and the weight
        is then dequantized once per block instead of once per chunk (same values)."""
        self._hold = True

    def release_weight(self) -> None:
        self._hold, self._held = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_rows(x, slice(None))

    def forward_rows(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """Only output features `rows` (what `hyvideo.blocks.linear_rows` asks for)."""
        if self.weight.dtype != FP8_DTYPE:
            raise RuntimeError(f"FP8Linear weight was converted to {self.weight.dtype} (model.to(dtype) after swapping?)")
        bias = None if self.bias is None else self.bias[rows].to(x.dtype)
        if self.use_scaled_mm:
            scale = self.scale[rows] if self.scale.shape[0] > 1 else self.scale
            return scaled_mm_linear(x, self.weight[rows], scale, bias)
        if not self._hold:
            return F.linear(x, self.dequantize(x.dtype, rows), bias)
        if self._held is None or self._held.dtype != x.dtype:
            self._held = self.dequantize(x.dtype)
        return F.linear(x, self._held[rows], bias)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.scale.shape[0] > 1 else "per-tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scale={kind}, use_scaled_mm={self.use_scaled_mm}")


FP8_MATMULS = ("dequant", "scaled_mm", "auto")
# `auto` takes _scaled_mm when it is this much faster on the probe layer ...
SCALED_MM_MIN_SPEEDUP = 1.10
# ... and its error vs float32 is at most this multiple of the dequant path's (H200: 3.74 / 2.67 = 1.4).
SCALED_MM_MAX_ERROR_RATIO = 1.5


def measure_scaled_mm(device, in_features: int = 3072, out_features: int = 12288, tokens: int = 8192) -> dict:
    """One FP8 linear (the 13B MLP's fc1 shape; a token chunk of 8192) both ways on `device`:
    milliseconds per call and relative error vs float32, for the dequant path and _scaled_mm."""
    import time

    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    linear = nn.Linear(in_features, out_features, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) / in_features**0.5)
        linear.bias.zero_()
    x = torch.randn(1, tokens, in_features, generator=gen).to(device)
    reference = linear.to(device)(x)
    layer = FP8Linear.from_linear(linear.to(torch.bfloat16)).to(device)
    result = {}
    for name, flag in (("dequant", False), ("scaled_mm", True)):
        layer.use_scaled_mm = flag
        with torch.no_grad():
            out = layer(x.to(torch.bfloat16))
            torch.cuda.synchronize(device)
            began = time.perf_counter()
            for _ in range(5):
                layer(x.to(torch.bfloat16))
            torch.cuda.synchronize(device)
        result[name] = {"ms": (time.perf_counter() - began) * 200,
                        "rel_error": float((out.float() - reference).norm() / reference.norm())}
    return result


def choose_fp8_matmul(requested: str, device) -> tuple[bool, str | None]:
    """(use _scaled_mm?, a note for the user or None) for `fp8_matmul` = dequant | scaled_mm | auto.
    A request that cannot be met falls back to the dequant path with a note, never an error."""
    if requested not in FP8_MATMULS:
        raise HyVideoError(f"fp8_matmul must be one of {', '.join(FP8_MATMULS)}, not {requested!r}")
    if requested == "dequant":
        return False, None
    reason = scaled_mm_unavailable_reason(device)
    if reason:
        return False, None if requested == "auto" else f"FP8 matmul (_scaled_mm) unavailable: {reason}; dequantizing instead"
    if requested == "scaled_mm":
        return True, None
    measured = measure_scaled_mm(device)
    dequant, scaled = measured["dequant"], measured["scaled_mm"]
    faster = dequant["ms"] / scaled["ms"] >= SCALED_MM_MIN_SPEEDUP
    accurate = scaled["rel_error"] <= SCALED_MM_MAX_ERROR_RATIO * dequant["rel_error"]
    return faster and accurate, None


def swap_linears_fp8(model: nn.Module, policy: "str | QuantPolicy" = "blocks", per_channel: bool = True,
                     use_scaled_mm: bool = False) -> list[str]:
    """Replace the policy's nn.Linear modules of a HunyuanVideoDiT by FP8Linear, in place.

    Real weights are quantized; on a meta model the FP8Linears are empty, ready for
    `model.load_state_dict(fp8_state_dict, assign=True)` (how a 13B model is loaded without a bf16
    copy). `per_channel=False` gives the [1, 1] scales of Tencent's file. Returns the swapped names.
    """
    names = get_policy(policy).select(model)
    for name in names:
        model.set_submodule(name, FP8Linear.from_linear(model.get_submodule(name), per_channel, use_scaled_mm))
    return names


def set_scaled_mm(model: nn.Module, enabled: bool, device: "torch.device | str" = "cuda") -> int:
    """Turn the FP8 tensor-core path on or off for every FP8Linear; returns how many there are.
    Refuses to turn it on unless `device` (where the blocks will run) is a capable GPU."""
    reason = scaled_mm_unavailable_reason(device) if enabled else None
    if reason:
        raise HyVideoError(f"the FP8 matmul (use_scaled_mm) cannot run: {reason}. Leave it off: the dequantizing FP8 path runs anywhere.")
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for layer in layers:
        layer.use_scaled_mm = enabled
    return len(layers)
