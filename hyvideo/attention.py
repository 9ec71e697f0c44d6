"""The one attention function of the DiT, with two backends.

Joint sequences are [image tokens ; text tokens] with text right-padded. The rule that matters
(facts §1.11): no valid token attends to a padded text key. For batch 1 the pipeline drops padded
text tokens altogether, so no mask is needed and SDPA can pick its flash kernel. For batch > 1:
- `sdpa`: a boolean key mask [B, 1, 1, S] (diffusers' semantics; padded query rows see valid keys,
  their outputs are never used);
- `flash`: flash-attn varlen with the official segments: per item (image + valid text) and
  (padding only), exactly as the official code.
"""

import importlib.util

import torch
import torch.nn.functional as F

from .errors import HyVideoError

BACKENDS = ("sdpa", "flash")


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise HyVideoError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "flash" and not flash_available():
        raise HyVideoError("attention backend 'flash' needs flash-attn: pip install 'hyvideo-lowvram[flash]', or use --attention sdpa")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, backend: str = "sdpa"
) -> torch.Tensor:
    """Full bidirectional attention, scale 1/sqrt(head_dim).

    q, k, v: [B, S, H, D]; key_mask: [B, S] bool (True = valid key, valid positions form a prefix) or
    None. Returns [B, S, H*D].
    """
    if backend == "flash":
        out = _flash_attention(q, k, v, key_mask)
    else:
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        out = out.transpose(1, 2)  # [B, S, H, D]
    return out.flatten(2)


def _flash_attention(q, k, v, key_mask):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if key_mask is None:
        return flash_attn_func(q, k, v)
    batch, seq, heads, dim = q.shape
    valid = key_mask.sum(dim=1, dtype=torch.int32)  # [B]
    starts = torch.arange(batch, device=q.device, dtype=torch.int32) * seq
    # Boundaries per item: start, start + valid, start + S (a padding-only segment when valid < S).
    bounds = torch.stack([starts, starts + valid], dim=1).flatten()
    cu_seqlens = torch.cat([bounds, torch.tensor([batch * seq], device=q.device, dtype=torch.int32)])
    cu_seqlens = torch.unique_consecutive(cu_seqlens)
    out = flash_attn_varlen_func(
        q.reshape(batch * seq, heads, dim), k.reshape(batch * seq, heads, dim), v.reshape(batch * seq, heads, dim),
        cu_seqlens, cu_seqlens, seq, seq,
    )
    return out.view(batch, seq, heads, dim)
