"""FP8Linear, the meta-device swap, Tencent's FP8 file pair, and the opt-in FP8 matmul (CUDA)."""

import copy

import pytest
import torch
import torch.nn as nn

from hyvideo.blocks import linear_rows
from hyvideo.config import DIT_CONFIGS
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.errors import HyVideoError
from quant.fp8 import FP8_DTYPE, FP8Linear, dequantize_fp8, quantize_fp8, set_scaled_mm, swap_linears_fp8
from quant.tencent_fp8 import TENCENT_POLICY, load_tencent_fp8, map_path_for, write_tencent_fp8_pair
from tests.helpers import dit_inputs, forward, rel_err, tiny_dit

TINY = DIT_CONFIGS["tiny"]


def random_linear(out_features=96, in_features=64, dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features).to(dtype).requires_grad_(False)


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_fp8_rounding(per_channel):
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row must give zeros, not NaN
    w_fp8, scale = quantize_fp8(w, per_channel)
    assert w_fp8.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert scale.shape == ((96, 1) if per_channel else (1, 1))
    scaled = w_fp8.float()
    # Each row's (or the tensor's) largest magnitude maps exactly onto e4m3's maximum, 448.
    amax = scaled.abs().amax(dim=1) if per_channel else scaled.abs().amax().reshape(1)
    assert torch.all((amax == 448) | (amax == 0))
    deq = dequantize_fp8(w_fp8, scale, torch.float32)
    assert torch.isfinite(deq).all() and torch.all(deq[3] == 0)
    # Round to nearest with 3 mantissa bits: |error| <= 2^-4 |w| for normal numbers (|w/scale| >=
    # 2^-6); e4m3 subnormals are spaced 2^-9, so below that the error is <= 2^-10 * scale.
    err = (deq - w).abs()
    normal = (w / scale).abs() >= 2**-6
    assert torch.all(err[normal] <= 2**-4 * w.abs()[normal] * (1 + 1e-6))
    assert torch.all(err[~normal] <= 2**-10 * scale.expand_as(w)[~normal] * (1 + 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_linear_with_dequantized_weight(dtype):
    linear = random_linear(dtype=dtype)
    layer = FP8Linear.from_linear(linear)
    x = torch.randn(5, 7, 64).to(dtype)
    expected = nn.functional.linear(x, layer.weight.to(dtype) * layer.scale.to(dtype), linear.bias)
    assert torch.equal(layer(x), expected)  # same bf16/float32 weight, same F.linear: bit-identical
    assert layer.bias.dtype == dtype and torch.equal(layer.bias, linear.bias)


@pytest.mark.parametrize("per_channel", [True, False])
def test_forward_rows_equals_slicing(per_channel):
    layer = FP8Linear.from_linear(random_linear(out_features=21 * 16, in_features=64), per_channel)
    x = torch.randn(3, 10, 64)
    full = layer(x)
    for rows in (slice(0, 9 * 16), slice(9 * 16, 21 * 16), slice(5, 6)):
        # float32 on CPU: a row subset is the same dot products, only fewer of them. Wide slices come
        # out bit-identical; a one-row slice goes through a matrix-vector kernel that sums in
        # another order, so allow the last float32 bits (1e-6 relative).
        torch.testing.assert_close(layer.forward_rows(x, rows), full[..., rows], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(linear_rows(layer, x, rows), full[..., rows], rtol=1e-6, atol=1e-6)


def test_swap_on_meta_then_assign_load():
    """A model built on meta, swapped, then filled with assign=True equals one quantized in RAM."""
    model = tiny_dit()
    reference = copy.deepcopy(model)
    swap_linears_fp8(reference, "blocks")
    with torch.device("meta"):
        meta = HunyuanVideoDiT(TINY)
    names = swap_linears_fp8(meta, "blocks")
    assert all(meta.get_submodule(n).weight.is_meta for n in names)
    meta.load_state_dict(reference.state_dict(), strict=True, assign=True)
    assert meta.get_submodule(names[0]).weight.dtype == FP8_DTYPE
    inputs = dit_inputs()
    assert torch.equal(forward(meta.eval(), inputs), forward(reference, inputs))


def test_cast_after_swap_is_refused():
    layer = FP8Linear.from_linear(random_linear())
    layer.to(torch.bfloat16)  # torch counts fp8 as floating point and converts it
    with pytest.raises(RuntimeError, match="model.to\\(dtype\\)"):
        layer(torch.randn(2, 64, dtype=torch.bfloat16))


def test_scaled_mm_refused_without_capable_gpu():
    model = tiny_dit()
    swap_linears_fp8(model, "blocks")
    with pytest.raises(HyVideoError, match="compute capability"):
        set_scaled_mm(model, True, device="cpu")
    assert set_scaled_mm(model, False) == 26  # turning it off always works


def test_scaled_mm_forward_checks_nothing_and_quantizes_in_place(monkeypatch):
    """The availability check happens where the path is turned on, never in the forward (a device
    query per linear, and a graph break under torch.compile). The activations are quantized row
    block by row block without touching x, to the same e4m3 values and scales as the out-of-place
    float32 arithmetic; PyTorch's CPU `_scaled_mm` (row-wise scales) runs the matmul here."""
    import quant.fp8 as fp8

    def no_check(*args):
        raise AssertionError("availability checked in the forward")

    monkeypatch.setattr(fp8, "scaled_mm_unavailable_reason", no_check)
    monkeypatch.setattr(fp8, "_probe_scaled_mm", no_check)
    monkeypatch.setattr(fp8, "QUANT_ROWS", 16)  # several row blocks, the last one partial
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(1, 40, 64, generator=gen).to(dtype)
        x[0, 7] = 0  # an all-zero row: scale floored, zeros out
        original = x.clone()
        x_fp8, x_scale = fp8.quantize_rows_fp8(x.reshape(-1, 64))
        assert torch.equal(x, original)  # float32 input: its rows were divided in a copy, not in place
        expected_scale = x.float().abs().amax(dim=-1, keepdim=True).reshape(-1, 1).clamp(min=1e-12) / 448
        expected = (x.float().reshape(-1, 64) / expected_scale).clamp(-448, 448).to(FP8_DTYPE)
        assert torch.equal(x_scale, expected_scale) and torch.equal(x_fp8.view(torch.uint8), expected.view(torch.uint8))
        layer = FP8Linear.from_linear(random_linear(), use_scaled_mm=True)
        out = layer(x.to(torch.bfloat16)).float().reshape(-1, layer.out_features)  # [40, 96]
        reference = x.float().reshape(-1, 64) @ layer.dequantize(torch.float32).T + layer.bias.float()
        # the weights are e4m3 on both sides; the activations' e4m3 rounding (~2.7 %) and bf16 output: < 5 %
        assert rel_err(out, reference) < 0.05


# ---- Tencent's file pair ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tencent_pair(tmp_path_factory):
    state = tiny_dit(seed=2).state_dict()
    folder = tmp_path_factory.mktemp("fp8")
    scalar = write_tencent_fp8_pair(state, folder / "scalar" / "mp_rank_00_model_states_fp8.pt", TINY)
    one = write_tencent_fp8_pair(state, folder / "one" / "mp_rank_00_model_states_fp8.pt", TINY, scalar_scales=False)
    return state, scalar, one


def test_tencent_file_format(tencent_pair):
    _, (weights, map_path), _ = tencent_pair
    assert map_path == map_path_for(weights) and map_path.name == "mp_rank_00_model_states_fp8_map.pt"
    module = torch.load(weights, weights_only=True)["module"]
    scales = torch.load(map_path, weights_only=True)
    quantized = TENCENT_POLICY.module_names(TINY)
    assert sorted(scales) == sorted(quantized) and len(quantized) == 26
    for name in quantized:
        assert module[name + ".weight"].dtype == FP8_DTYPE and scales[name].shape == ()
        assert module[name + ".bias"].dtype == torch.bfloat16
    assert module["img_in.proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("which", ["scalar", "one-element"])
def test_tencent_round_trip_exact(tencent_pair, which):
    """Loaded model == plain bf16 model holding W_fp8.to(bf16) * scale.to(bf16), bit for bit."""
    _, scalar, one = tencent_pair
    weights, map_path = scalar if which == "scalar" else one
    model = load_tencent_fp8(weights, TINY)
    module = torch.load(weights, weights_only=True)["module"]
    scales = torch.load(map_path, weights_only=True)

    dequantized = {}
    for key, tensor in module.items():
        name = key.removesuffix(".weight")
        if name in scales:
            layer = model.get_submodule(name)
            assert isinstance(layer, FP8Linear) and layer.scale.shape == (1, 1)
            assert torch.equal(layer.weight.view(torch.uint8), tensor.view(torch.uint8))
            dequantized[key] = tensor.to(torch.bfloat16) * scales[name].to(torch.bfloat16)
            assert torch.equal(layer.dequantize(torch.bfloat16), dequantized[key])
        else:
            assert torch.equal(model.state_dict()[key], tensor)
            dequantized[key] = tensor
    plain = HunyuanVideoDiT(TINY).to(torch.bfloat16).eval()
    plain.load_state_dict(dequantized)
    inputs = dit_inputs()
    assert torch.equal(forward(model, inputs), forward(plain, inputs))


def test_tencent_pair_close_to_source(tencent_pair):
    """Per-tensor FP8 + bf16 activations vs the float32 source weights: within the whole-model
    FP8 bound of test_quant_dit.py (5 %)."""
    state, (weights, _), _ = tencent_pair
    source = HunyuanVideoDiT(TINY).eval()
    source.load_state_dict(state)
    inputs = dit_inputs()
    assert rel_err(forward(load_tencent_fp8(weights, TINY), inputs), forward(source, inputs)) < 0.05


def test_tencent_errors(tencent_pair, tmp_path):
    state, (weights, map_path), _ = tencent_pair
    with pytest.raises(HyVideoError, match="not found"):
        load_tencent_fp8(tmp_path / "missing_fp8.pt", TINY)
    # the bf16 file given to the FP8 loader
    bf16_file = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": state}, bf16_file)
    torch.save(torch.load(map_path, weights_only=True), map_path_for(bf16_file))
    with pytest.raises(HyVideoError, match="not Tencent's FP8"):
        load_tencent_fp8(bf16_file, TINY)
    # a map that lacks a layer
    scales = torch.load(map_path, weights_only=True)
    scales.pop("single_blocks.1.linear2")
    bad_map = tmp_path / "bad_map.pt"
    torch.save(scales, bad_map)
    with pytest.raises(HyVideoError, match="no scale for single_blocks.1.linear2"):
        load_tencent_fp8(weights, TINY, map_path=bad_map)
    # a truncated weights file
    cut = tmp_path / "cut_fp8.pt"
    cut.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(HyVideoError):
        load_tencent_fp8(cut, TINY, map_path=map_path)


# ---- GPU only -----------------------------------------------------------------------------------


@pytest.mark.cuda
def test_dequant_path_on_cuda_matches_cpu():
    layer = FP8Linear.from_linear(random_linear(out_features=256, in_features=256, dtype=torch.bfloat16))
    x = torch.randn(32, 256, dtype=torch.bfloat16)
    cpu = layer(x)
    gpu = copy.deepcopy(layer).cuda()(x.cuda()).cpu()
    # identical bf16 weights; only the GEMM's accumulation order differs (bf16 output: 2^-8 relative)
    torch.testing.assert_close(gpu, cpu, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_scaled_mm_fast_path():
    from quant.fp8 import scaled_mm_supported

    if not scaled_mm_supported("cuda"):
        pytest.skip("needs compute capability >= 8.9")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(512, 1024, generator=gen) / 32
    x = torch.randn(4, 48, 1024, generator=gen)
    ref = x @ w.T
    for per_channel in (True, False):
        layer = nn.Linear(1024, 512, bias=False)
        layer.weight.data = w.clone()
        fp8 = FP8Linear.from_linear(layer, per_channel).cuda()
        slow = fp8(x.cuda().bfloat16())
        fp8.use_scaled_mm = True
        fast = fp8(x.cuda().bfloat16())
        rows = fp8.forward_rows(x.cuda().bfloat16(), slice(128, 384))
        # Weights alone: ~2.65 % (e4m3). The fast path rounds the activations to e4m3 as well, an
        # independent ~2.65 %, so ~3.7 % in quadrature (H200: 2.67 % and 3.74 % on a 3072x3072
        # layer); 5 % bounds both, and fast != slow.
        assert rel_err(slow.cpu(), ref) < 0.035
        assert rel_err(fast.cpu(), ref) < 0.05
        assert not torch.equal(fast, slow)
        torch.testing.assert_close(rows, fast[..., 128:384], rtol=1e-2, atol=1e-2)
    model = tiny_dit().to(torch.bfloat16)
    swap_linears_fp8(model, "blocks")
    model.cuda()
    assert set_scaled_mm(model, True) == 26
    inputs = [t.cuda() for t in dit_inputs()]
    reference = tiny_dit()
    # dequant path 3.05 %, scaled_mm 4.23 % (H200); the dequant path's 5 % bound + the extra rounding
    assert rel_err(forward(model, inputs).cpu(), forward(reference, dit_inputs())) < 0.065


def test_block_dequantizes_each_weight_once_not_per_chunk(monkeypatch):
    """With token chunks, the blocks hold each FP8 weight for the chunk loop: one dequantization
    per layer call site per block (linear1 twice: qkv pass and MLP pass), not one per chunk, and
    the output is bit-identical to dequantizing on every call."""
    model = tiny_dit()
    swap_linears_fp8(model)
    model.token_chunk = 7  # 48 image + 9 text tokens -> 9 chunks
    inputs = dit_inputs()
    calls = []
    real = FP8Linear.dequantize
    monkeypatch.setattr(FP8Linear, "dequantize", lambda self, *a, **k: calls.append(self) or real(self, *a, **k))
    held = forward(model, inputs)
    # Per double block: 2 x (mod, qkv, proj, fc1, fc2); per single block: mod, linear1 twice, linear2.
    expected = TINY.double_blocks * 10 + TINY.single_blocks * 4
    assert len(calls) == expected
    monkeypatch.setattr(FP8Linear, "hold_weight", lambda self: None)  # every call dequantizes again
    calls.clear()
    assert torch.equal(forward(model, inputs), held)
    assert len(calls) > 3 * expected


def test_fp8_matmul_choice_falls_back_to_dequantizing_with_a_note():
    from quant.fp8 import choose_fp8_matmul

    assert choose_fp8_matmul("dequant", "cpu") == (False, None)
    assert choose_fp8_matmul("auto", "cpu") == (False, None)  # nothing to measure: no FP8 tensor cores here
    used, note = choose_fp8_matmul("scaled_mm", "cpu")
    assert not used and note.startswith("FP8 matmul (_scaled_mm) unavailable: it needs a CUDA GPU") and "dequantizing instead" in note
    with pytest.raises(HyVideoError, match="fp8_matmul must be one of dequant, scaled_mm, auto"):
        choose_fp8_matmul("fast", "cpu")


@pytest.mark.cuda
def test_cuda_fp8_matmul_measurement():
    from quant.fp8 import choose_fp8_matmul, measure_scaled_mm, scaled_mm_supported

    if not scaled_mm_supported("cuda"):
        pytest.skip("no _scaled_mm on this GPU")
    measured = measure_scaled_mm("cuda", 256, 512, 1024)
    for path in ("dequant", "scaled_mm"):
        assert measured[path]["ms"] > 0 and 0 < measured[path]["rel_error"] < 0.1  # e4m3: a few % vs float32
    assert choose_fp8_matmul("auto", "cuda")[1] is None
