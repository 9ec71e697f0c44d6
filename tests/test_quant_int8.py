"""INT8 weight-only quantization through optimum-quanto: swap, state layout, requantize, and the
message when quanto is missing. (Error bounds: test_quant_policy.py per layer, test_quant_dit.py
for the whole model.)"""

import copy
import sys

import pytest
import torch

from hyvideo.config import DIT_CONFIGS
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.errors import HyVideoError
from tests.helpers import dit_inputs, forward, tiny_dit

TINY = DIT_CONFIGS["tiny"]
quanto = pytest.importorskip("optimum.quanto")  # the whole file is about it; `pytest -m cuda` collects without it


def test_quantize_int8_swaps_policy_linears_only():
    from quant.int8 import quantize_int8

    model = tiny_dit().to(torch.bfloat16)
    names = quantize_int8(model, "blocks-no-mod")
    assert len(names) == 2 * 8 + 2 * 2
    for name, module in model.named_modules():
        quantized = isinstance(module, quanto.QModuleMixin)
        assert quantized == (name in names), name
    layer = model.get_submodule(names[0])
    state = layer.state_dict()
    assert state["weight._data"].dtype == torch.int8
    # per output channel, stored in the compute dtype (what quant/bytes.py counts)
    assert state["weight._scale"].shape == (layer.out_features, 1) and state["weight._scale"].dtype == torch.bfloat16


def test_int8_linear_state_matches_quantize_int8():
    """The cache writer quantizes one layer at a time; the result equals quantizing the model."""
    from quant.int8 import int8_linear_state, quantize_int8

    model = tiny_dit().to(torch.bfloat16)
    plain = model.state_dict()
    quantize_int8(model, "blocks")
    name = "single_blocks.1.linear1"
    alone = int8_linear_state(plain[name + ".weight"], plain[name + ".bias"], torch.bfloat16)
    in_model = model.get_submodule(name).state_dict()
    assert alone.keys() == in_model.keys()
    for key in alone:
        assert torch.equal(alone[key], in_model[key]), key


def test_requantize_from_state_dict():
    from quant.int8 import quantize_int8, requantize_int8

    model = tiny_dit().to(torch.bfloat16)
    quantize_int8(model, "blocks")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        fresh = HunyuanVideoDiT(TINY)
    requantize_int8(fresh, state, "blocks")
    for key, value in fresh.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    inputs = dit_inputs()
    assert torch.equal(forward(fresh.eval(), inputs), forward(model.eval(), inputs))

    state.pop("double_blocks.0.img_attn_qkv.weight._scale")
    with torch.device("meta"):
        fresh = HunyuanVideoDiT(TINY)
    with pytest.raises(HyVideoError, match="1 missing"):
        requantize_int8(fresh, state, "blocks")


def test_missing_quanto_is_a_user_error(monkeypatch):
    from quant.int8 import quantize_int8, quanto_version

    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # makes `import optimum.quanto` fail
    with pytest.raises(HyVideoError, match="pip install optimum-quanto"):
        quantize_int8(copy.deepcopy(tiny_dit()), "blocks")
    with pytest.raises(HyVideoError, match="pip install optimum-quanto"):
        quanto_version()
