"""Attention backends: the flash-attn varlen path's segmenting (run here through a stand-in
flash_attn module built on SDPA, since flash-attn needs CUDA) and the SDPA key mask."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from hyvideo.attention import attention, check_backend
from hyvideo.errors import HyVideoError


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
    monkeypatch.setattr("hyvideo.attention.flash_available", lambda: False)
    with pytest.raises(HyVideoError, match="needs flash-attn"):
        check_backend("flash")
