"""Precision policy: the module sets, and the measurements behind the default (quant/policy.py).

Per-layer error: one [256, 3072] linear (the 13B fan-in; 256 outputs keep it fast), 64 normal
input tokens, output compared with the float32 output of the unquantized weights.
Measured (seed 0):                 fp8 per-channel  fp8 per-tensor  int8 per-channel
  normal                           2.62 %           2.62 %          0.85 %
  Student-t df=3                   2.53 %           2.65 %          3.84 %
  normal, 4 input columns x10      2.53 %           2.57 %          3.46 %
(seeds 1 and 2 agree to +-0.05 % for FP8; INT8 3.74-3.94 % and 3.20-3.47 % on the last two rows)
Bounds and their reasons:
- FP8 <= 3 %: e4m3 keeps 3 mantissa bits; rounding a log-uniformly spread value to them gives an
  RMS relative error of 2^-3 / sqrt(12) * sqrt(3 / (8 ln 2)) = 2.65 %, for any weight
  distribution, and a dot product inherits it. (The issue's 4 % budget is met with room.)
- INT8 <= 1.5 % on normal weights: grid step = row max / 127 ~ 3.6 sigma / 127, RMS error
  step / sqrt(12) = 0.8 % of sigma. Heavy tails and outlier input columns stretch the row maximum,
  so INT8 gets worse than FP8 there: <= 5 % (measured 3.2-3.9 % over seeds 0-2; the largest sample
  of a heavy tail varies a lot between draws, and 20x outlier columns reach 5.8 %). These are the cases that decide between the two schemes, not the
  policy, so the test asserts the ordering too.
"""

import copy

import pytest
import torch

from hyvideo.config import DIT_CONFIGS
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.errors import HyVideoError
from quant.fp8 import FP8Linear, dequantize_fp8, quantize_fp8, swap_linears_fp8
from quant.policy import DEFAULT_POLICY, POLICIES, QuantPolicy, get_policy
from tests.helpers import HAS_QUANTO, dit_inputs, forward, rel_err, student_t, tiny_dit

FULL = DIT_CONFIGS["HYVideo-T/2-cfgdistill"]
OUT, FAN_IN, TOKENS = 256, 3072, 64


def test_policy_module_sets_13b():
    with torch.device("meta"):
        model = HunyuanVideoDiT(FULL)
    blocks = POLICIES["blocks"].select(model)
    assert DEFAULT_POLICY == "blocks"
    assert len(blocks) == 20 * 10 + 40 * 3 == 320  # facts §1.14
    assert "double_blocks.19.txt_mod.linear" in blocks and "single_blocks.39.modulation.linear" in blocks
    assert not any(n.startswith(("txt_in", "img_in", "final_layer", "time_in", "vector_in", "guidance_in")) for n in blocks)
    no_mod = POLICIES["blocks-no-mod"].select(model)
    assert len(no_mod) == 20 * 8 + 40 * 2
    assert set(blocks) - set(no_mod) == {n for n in blocks if n.endswith("mod.linear") or n.endswith("modulation.linear")}


def test_get_policy():
    assert get_policy("blocks-no-mod") is POLICIES["blocks-no-mod"]
    custom = QuantPolicy("mine", ("img_attn_qkv",), ())
    assert get_policy(custom) is custom
    with pytest.raises(HyVideoError, match="blocks-no-mod"):
        get_policy("everything")


def test_select_refuses_already_swapped():
    model = tiny_dit()
    swap_linears_fp8(model, "blocks")
    with pytest.raises(TypeError, match="already quantized"):
        POLICIES["blocks"].select(model)


def layer_weights(kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "student-t":
        w = student_t((OUT, FAN_IN), gen)
    else:
        w = torch.randn(OUT, FAN_IN, generator=gen)
        if kind == "outlier-columns":
            w[:, :4] *= 10  # a few input channels with 10x larger weights
    return w / FAN_IN**0.5


def layer_errors(kind: str, seed: int = 0) -> dict[str, float]:
    from quant.int8 import int8_linear_state

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, FAN_IN, generator=gen)
    w = layer_weights(kind, gen)
    ref = x @ w.T
    errors = {}
    for name, per_channel in (("fp8-channel", True), ("fp8-tensor", False)):
        w_fp8, scale = quantize_fp8(w, per_channel)
        errors[name] = rel_err(x @ dequantize_fp8(w_fp8, scale, torch.float32).T, ref)
    layer = FP8Linear.from_linear(torch.nn.Linear(FAN_IN, OUT, bias=False).requires_grad_(False).to(torch.bfloat16))
    layer.load_state_dict(dict(zip(("weight", "scale"), quantize_fp8(w))), assign=True)
    errors["fp8-module-bf16"] = rel_err(layer(x.bfloat16()), ref)  # what runs: bf16 activations too
    if HAS_QUANTO:
        state = int8_linear_state(w, None, torch.float32)
        errors["int8"] = rel_err(x @ (state["weight._data"].float() * state["weight._scale"]).T, ref)
    return errors


@pytest.mark.parametrize("kind", ["normal", "student-t", "outlier-columns"])
def test_per_layer_error(kind):
    errors = layer_errors(kind)
    assert errors["fp8-channel"] <= 0.03 and errors["fp8-tensor"] <= 0.03
    # bf16 activations add their own ~0.3 % rounding (8 mantissa bits) on top of the fp8 weights
    assert errors["fp8-module-bf16"] <= 0.03
    if "int8" not in errors:
        return  # optimum-quanto is not installed
    if kind == "normal":
        assert errors["int8"] <= 0.015
        assert errors["int8"] < errors["fp8-channel"] / 2  # uniform 8 bits beat 3 mantissa bits
    else:
        assert errors["int8"] <= 0.05
        assert errors["int8"] > errors["fp8-channel"]  # the stretched grid is INT8's weak spot


# Per-kind sensitivity on the whole tiny DiT (fp8 per-channel, float32 compute, seed 1): quantizing
# only one kind of block linear. Measured: mod 2.2 %, mlp 1.9 %, qkv 0.9 %, proj 0.8 %,
# linear1 0.9 %, linear2 0.9 %; all "blocks" 3.1 %, "blocks-no-mod" 2.4 %.
KINDS = {
    "mod": (("img_mod.linear", "txt_mod.linear"), ("modulation.linear",)),
    "mlp": (("img_mlp.fc1", "img_mlp.fc2", "txt_mlp.fc1", "txt_mlp.fc2"), ()),
    "qkv": (("img_attn_qkv", "txt_attn_qkv"), ()),
    "proj": (("img_attn_proj", "txt_attn_proj"), ()),
    "linear1": ((), ("linear1",)),
    "linear2": ((), ("linear2",)),
}


@pytest.mark.parametrize("heavy", [False, True], ids=["normal", "student-t"])
def test_modulation_sensitivity(heavy):
    """The modulation linears are the most sensitive kind on the whole model (their input, vec, is
    the same for every token, so their error is shared by all tokens). Dropping them from the
    quantized set ("blocks-no-mod") lowers the error, at +3.4 GB for the 13B model (test_quant_bytes)."""
    model, inputs = tiny_dit(seed=1, heavy=heavy), dit_inputs()
    ref = forward(model, inputs)

    def error(policy):
        quantized = copy.deepcopy(model)
        swap_linears_fp8(quantized, policy)
        return rel_err(forward(quantized, inputs), ref)

    per_kind = {kind: error(QuantPolicy(kind, *names)) for kind, names in KINDS.items()}
    assert max(per_kind, key=per_kind.get) == "mod"
    full, no_mod = error("blocks"), error("blocks-no-mod")
    assert no_mod < 0.85 * full  # measured 0.76x (normal) and 0.72x (Student-t)
    assert full < 0.05  # the default is still within the whole-model FP8 bound
