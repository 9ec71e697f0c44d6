"""Attention backends: the flash-attn varlen path's segmenting and SageAttention's call (run here
through stand-in modules built on SDPA, since both need CUDA), the SDPA key mask, and how a run's
kernel is chosen (probe, fallback, fastest)."""

import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from hyvideo.attention import attention, check_backend
from hyvideo.errors import HyVideoError
from lowvram.attention_choice import AttentionChoice, candidates, choose, probe, resolve_attention


def fake_flash_attn():
    """flash_attn's two entry points, reimplemented with SDPA: [B,S,H,D] and packed varlen."""

    def flash_attn_func(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k):
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        out = torch.empty_like(q)
        for start, stop in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            seg = slice(start, stop)
            out[seg] = flash_attn_func(q[None, seg], k[None, seg], v[None, seg])[0]
        return out

    module = types.ModuleType("flash_attn")
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module


def test_flash_varlen_matches_masked_sdpa_on_valid_tokens(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn())
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 10, 2, 8, generator=gen) for _ in range(3))
    valid = torch.tensor([10, 6, 7])  # item 0 has no padding: a single segment
    key_mask = torch.arange(10)[None] < valid[:, None]
    flash = attention(q, k, v, key_mask, backend="flash")
    sdpa = attention(q, k, v, key_mask, backend="sdpa")
    for i, n in enumerate(valid.tolist()):
        # Valid queries: identical semantics (no valid token sees a padded key). Float32 on CPU.
        assert torch.allclose(flash[i, :n], sdpa[i, :n], atol=1e-6)
        if n < 10:  # official: padded tokens form their own segment and only see each other
            pad = attention(q[i : i + 1, n:], k[i : i + 1, n:], v[i : i + 1, n:])
            assert torch.allclose(flash[i, n:], pad[0], atol=1e-6)


def test_unknown_or_missing_backend_is_a_user_error(monkeypatch):
    with pytest.raises(HyVideoError, match="unknown attention backend"):
        check_backend("xformers")
    with pytest.raises(HyVideoError, match="unknown attention backend 'sdpa:fast'"):
        check_backend("sdpa:fast")
    monkeypatch.setattr("hyvideo.attention.installed", lambda name: name == "sdpa")
    with pytest.raises(HyVideoError, match=r"needs flash_attn: pip install 'hyvideo-lowvram\[flash\]'"):
        check_backend("flash")


# --- SageAttention's plumbing and the choice of kernel (lowvram/attention_choice.py) -------------


def stand_in_sage(result=None, fail=False):
    """A `sageattention` module shaped like PyPI's 1.0.6, whose sageattn is SDPA on [B, S, H, D]
    ("NHD") or a broken kernel. As 1.0.6: the same signature (no `return_lse`, which **kwargs
    swallow), one tensor back, head sizes 64 / 96 / 128 only (its assert), and the keys' mean
    subtracted from k in place (smooth_k). Unlike it, it runs on the CPU."""
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
        calls.append((tensor_layout, is_causal, tuple(q.shape), k))  # k kept: no address is reused
        assert q.size(-1) in [64, 96, 128], "headdim should be in [64, 96, 128]."
        if fail:
            raise RuntimeError("no kernel image is available for execution on the device")
        if smooth_k:
            k -= k.mean(dim=1 if tensor_layout == "NHD" else 2, keepdim=True)
        if result is not None:
            return result(q, k, v)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    module = types.ModuleType("sageattention")
    module.__spec__ = importlib.machinery.ModuleSpec("sageattention", None)
    module.sageattn, module.calls = sageattn, calls
    return module


def test_sage_gets_nhd_tensors_and_a_masked_batch_runs_sdpa(monkeypatch):
    fake = stand_in_sage()
    monkeypatch.setitem(sys.modules, "sageattention", fake)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 10, 2, 64, generator=gen) for _ in range(3))
    expected = attention(q, k, v, backend="sdpa")
    # float32: the smoothed keys change only the rounding of the scores (softmax ignores a per-query shift)
    torch.testing.assert_close(attention(q, k.clone(), v, backend="sage"), expected, rtol=1e-5, atol=1e-6)
    assert [call[:3] for call in fake.calls] == [("NHD", False, (1, 10, 2, 64))]
    mask = torch.arange(10)[None] < 7
    with pytest.warns(UserWarning, match="SageAttention takes no mask"):
        assert torch.equal(attention(q, k, v, mask, backend="sage"), attention(q, k, v, mask, backend="sdpa"))
    assert len(fake.calls) == 1  # the masked call never reached sage


def test_probe_passes_a_good_kernel_and_names_what_is_wrong_with_bad_ones(monkeypatch):
    device, tokens = torch.device("cpu"), 64
    fake = stand_in_sage()
    monkeypatch.setitem(sys.modules, "sageattention", fake)
    ms, why = probe("sage", device, tokens)
    assert ms is not None and ms > 0 and why is None
    assert len({call[3].data_ptr() for call in fake.calls}) == len(fake.calls) == 4  # every call its own k: sage overwrites it
    monkeypatch.setitem(sys.modules, "sageattention", stand_in_sage(result=lambda q, k, v: v))  # not attention
    assert probe("sage", device, tokens)[1].startswith("failed its probe (relative error")
    monkeypatch.setitem(sys.modules, "sageattention", stand_in_sage(fail=True))
    assert probe("sage", device, tokens)[1] == ("failed its probe (RuntimeError: no kernel image is available for "
                                               "execution on the device)")
    monkeypatch.setattr("lowvram.attention_choice.installed", lambda name: name == "sdpa")
    assert probe("flash", device, tokens) == (None, "is not installed (pip install 'hyvideo-lowvram[flash]' for flash_attn)")
    assert probe("sdpa:math", device, tokens)[0] is not None


def test_choice_takes_the_fastest_kernel_that_passed():
    probed = {"sage": (None, "is not installed (...)"), "flash": (4.0, None), "sdpa:flash": (5.0, None),
              "sdpa:cudnn": (3.0, None), "sdpa:efficient": (None, "failed its probe (...)")}
    assert choose("auto", probed).backend == "sdpa:cudnn" and not choose("auto", probed).notes
    sdpa_only = {b: r for b, r in probed.items() if b.startswith("sdpa")}
    assert choose("sdpa", sdpa_only).backend == "sdpa:cudnn"
    assert choose("flash", probed).backend == "flash"  # asked for and passed: taken even if not the fastest
    fallback = choose("sage", probed)
    assert fallback.backend == "sdpa:cudnn" and fallback.notes == ["attention 'sage' is not installed (...); using SDPA"]
    nothing = choose("auto", {"sdpa:flash": (None, "failed")})
    assert nothing.backend == "sdpa" and "no attention kernel passed" in nothing.notes[0]
    assert candidates("sage") == ["sage", "sdpa:flash", "sdpa:cudnn", "sdpa:efficient"]


def test_on_the_cpu_every_choice_is_sdpa():
    assert resolve_attention("auto", "cpu") == AttentionChoice("sdpa", [])
    assert resolve_attention("flash", "cpu").notes == ["attention 'flash' needs CUDA; using sdpa on the CPU"]
    with pytest.raises(HyVideoError, match="--attention must be one of auto, sdpa, sage, flash"):
        resolve_attention("xformers", "cpu")


# --- each kernel's error on a whole DiT forward --------------------------------------------------


def tiny_forward(backend: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A small DiT with the 13B model's head_dim (128, which every kernel supports)."""
    from hyvideo.config import DiTConfig
    from hyvideo.dit import HunyuanVideoDiT
    from tests.helpers import randomize_, streaming_inputs

    config = DiTConfig(hidden_size=256, heads=2, double_blocks=2, single_blocks=2, refiner_blocks=1,
                       text_states_dim=48, text_states_dim_2=40, rope_axes_dim=(16, 56, 56))
    model = HunyuanVideoDiT(config).eval()
    randomize_(model, seed=1)
    model = model.to(device, dtype)
    model.attention_backend = backend
    x, t, text, mask, pooled, guidance = (v.to(device) for v in streaming_inputs())
    with torch.no_grad():
        return model(x, t, text.to(dtype), mask, pooled.to(dtype), guidance).float().cpu()


def test_sdpa_kernels_agree_on_the_cpu():
    """float32 on the CPU: PyTorch's default SDPA kernel and the math kernel differ only by the
    order of float32 sums."""
    reference = tiny_forward("sdpa:math", "cpu", torch.float32)
    assert float((tiny_forward("sdpa", "cpu", torch.float32) - reference).norm() / reference.norm()) < 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("backend,bound", [("sdpa:flash", 1e-2), ("sdpa:cudnn", 1e-2), ("sdpa:efficient", 1e-2),
                                           ("flash", 1e-2), ("sage", 5e-2)])
def test_cuda_kernel_error_on_a_dit_forward(backend, bound):
    """bf16 forward of the small DiT with each kernel vs the same bf16 model with float32-accurate
    attention (math kernel). Exact kernels: bf16 rounding of attention outputs through 4 blocks
    (< 1 %). sage: INT8 Q/K with per-block scales and FP16 P.V add their rounding (< 5 %)."""
    from lowvram.attention_choice import probe

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ms, why = probe(backend, torch.device("cuda"), tokens=256)
    if ms is None:
        pytest.skip(f"{backend} {why}")
    reference = tiny_forward("sdpa:math", "cuda", torch.bfloat16)
    assert float((tiny_forward(backend, "cuda", torch.bfloat16) - reference).norm() / reference.norm()) < bound


# --- SageAttention 1.0.6: k overwritten, no LSE, head sizes (issue 21, items 8 and 9) -----------


def test_a_dit_forward_with_a_sage_that_overwrites_k_equals_sdpa(monkeypatch):
    """1.0.6 subtracts the keys' mean from k in place. Harmless as long as nothing reads k after the
    kernel: this forward would differ from SDPA's if a block did. float32 on the CPU: the shifted
    scores differ only by rounding (the bound: float32 sums, ~1e-6 relative, through 4 blocks)."""
    monkeypatch.setitem(sys.modules, "sageattention", stand_in_sage())
    reference = tiny_forward("sdpa", "cpu", torch.float32)
    assert float((tiny_forward("sage", "cpu", torch.float32) - reference).norm() / reference.norm()) < 1e-5


def test_ring_attention_with_sage_without_lse_runs_sdpa_and_leaves_k_alone(monkeypatch):
    """1.0.6 has no `return_lse` (its **kwargs take it and one tensor comes back, which the ring
    could not unpack): the LSE comes from SDPA instead, with a warning, and k is never handed over."""
    from hyvideo.attention import attention_with_lse

    fake = stand_in_sage()
    monkeypatch.setitem(sys.modules, "sageattention", fake)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, 64, generator=gen) for _ in range(3))
    keys = k.clone()
    with pytest.warns(UserWarning, match="returns no log-sum-exp"):
        out, lse = attention_with_lse(q, k, v, backend="sage")
    expected_out, expected_lse = attention_with_lse(q, k, v, backend="sdpa")
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse) and lse.shape == (1, 2, 12)
    assert fake.calls == [] and torch.equal(k, keys)


def test_ring_attention_takes_the_lse_from_a_sage_that_returns_it(monkeypatch):
    """SageAttention 2's signature has `return_lse`: its (out, lse) is used as it comes."""
    from hyvideo.attention import attention_with_lse

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
        assert return_lse and tensor_layout == "NHD"
        return attention_with_lse(q, k, v, backend="sdpa")

    module = types.ModuleType("sageattention")
    module.__spec__ = importlib.machinery.ModuleSpec("sageattention", None)
    module.sageattn = sageattn
    monkeypatch.setitem(sys.modules, "sageattention", module)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, 64, generator=gen) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, backend="sage")
    assert torch.equal(lse, attention_with_lse(q, k, v, backend="sdpa")[1])


def test_the_probe_runs_at_the_models_own_head_size(monkeypatch):
    """The tiny model's heads have 32 dims, which 1.0.6 refuses: probed at 24 x 128 sage passed and
    then the model failed its assert (`demo` on a GPU with sage). At the model's shape it fails the
    probe, and the run takes SDPA."""
    monkeypatch.setitem(sys.modules, "sageattention", stand_in_sage())
    device = torch.device("cpu")
    assert probe("sage", device, 64, heads=2, head_dim=128)[1] is None
    ms, why = probe("sage", device, 64, heads=2, head_dim=32)
    assert ms is None and "headdim should be in [64, 96, 128]" in why


def test_preflight_and_resume_probe_at_the_models_shape(tiny_official, tmp_path, monkeypatch):
    """The run's attention is resolved for the tiny model's 2 heads of 32 (not the 13B's 24 x 128),
    when it starts and when it resumes."""
    from hyvideo.pipeline import GenerationRequest
    from lowvram.generation import preflight, runner
    from lowvram.generation.preflight import RunOptions, start_run
    from lowvram.generation.runner import execute

    asked = []

    def resolve(requested, device, heads=24, head_dim=128):
        asked.append(("resolve", heads, head_dim))
        return AttentionChoice("sdpa")

    def usable(stored, device, heads=24, head_dim=128):
        asked.append(("usable", heads, head_dim))
        return AttentionChoice(stored)

    monkeypatch.setattr(preflight, "resolve_attention", resolve)
    monkeypatch.setattr(runner, "usable_backend", usable)
    request = GenerationRequest("a fox", width=32, height=32, frames=1, steps=1, seed=0)
    execute(*start_run(RunOptions(request, tiny_official, tmp_path / "runs", device="cpu")))
    assert asked == [("resolve", 2, 32), ("usable", 2, 32)]
