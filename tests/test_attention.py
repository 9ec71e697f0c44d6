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
    """A `sageattention` module whose sageattn is SDPA on [B, S, H, D] ("NHD"), or a broken one."""
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
        calls.append((tensor_layout, is_causal, tuple(q.shape)))
        if fail:
            raise RuntimeError("no kernel image is available for execution on the device")
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
    q, k, v = (torch.randn(1, 10, 2, 8, generator=gen) for _ in range(3))
    assert torch.equal(attention(q, k, v, backend="sage"), attention(q, k, v, backend="sdpa"))
    assert fake.calls == [("NHD", False, (1, 10, 2, 8))]
    mask = torch.arange(10)[None] < 7
    with pytest.warns(UserWarning, match="SageAttention takes no mask"):
        assert torch.equal(attention(q, k, v, mask, backend="sage"), attention(q, k, v, mask, backend="sdpa"))
    assert len(fake.calls) == 1  # the masked call never reached sage


def test_probe_passes_a_good_kernel_and_names_what_is_wrong_with_bad_ones(monkeypatch):
    device, tokens = torch.device("cpu"), 64
    monkeypatch.setitem(sys.modules, "sageattention", stand_in_sage())
    ms, why = probe("sage", device, tokens)
    assert ms is not None and ms > 0 and why is None
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
