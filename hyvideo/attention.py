"""The one attention function of the DiT, with three kernel families.

Joint sequences are [image tokens ; text tokens] with text right-padded. The rule that matters
(facts §1.11): no valid token attends to a padded text key. For batch 1 the pipeline drops padded
text tokens altogether, so no mask is needed and any kernel applies. For batch > 1:
- `sdpa`: a boolean key mask [B, 1, 1, S] (diffusers' semantics; padded query rows see valid keys,
  their outputs are never used);
- `flash`: flash-attn varlen with the official segments: per item (image + valid text) and
  (padding only), exactly as the official code;
- `sage`: SageAttention (INT8 QK^T, FP16 PV; PyPI `sageattention`) takes no mask, so a masked
  batch runs SDPA instead (a Python warning says so once; lowvram's runs are batch 1). Its PyPI
  release, 1.0.6 (`sageattn(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k=True, **kwargs)`),
  subtracts the keys' mean from `k` *in place* (smooth_k; the result is unchanged, softmax ignores a
  per-query constant) and takes head sizes 64, 96 and 128 only: `attention` takes k over, so a
  caller hands it a k it does not read again (the DiT's blocks do: JointAttentionInputs.attend).

`attention_with_lse` is the same attention returning the log-sum-exp of each query's scores too,
which is what lets partial results over key blocks be merged exactly (ring attention,
lowvram/parallel.py). SageAttention 1.0.6 returns no LSE (its **kwargs swallow `return_lse`): a
release without the `return_lse` parameter runs SDPA's LSE kernel instead, with a warning (the ring
also passes its keys on to the next rank: 1.0.6's in-place smoothing must not reach them).
SageAttention 2 returns the LSE and takes the mean out inside its quantization kernel, leaving k
as it was.

Backend names: "sdpa" (PyTorch picks the kernel), "sdpa:flash" / "sdpa:cudnn" / "sdpa:efficient" /
"sdpa:math" (that SDPA kernel only), "sage", "flash". Which one a run uses is lowvram's choice
(lowvram/attention_choice.py: installed, probed, measured).
"""

import importlib.util
import inspect
import warnings

import torch
import torch.nn.functional as F

from .errors import HyVideoError

BACKENDS = ("sdpa", "sage", "flash")
SDPA_KERNELS = ("flash", "cudnn", "efficient", "math")
PACKAGES = {"sage": "sageattention", "flash": "flash_attn"}
EXTRAS = {"sage": "sage", "flash": "flash"}  # pip install 'hyvideo-lowvram[EXTRA]'


def split_backend(backend: str) -> tuple[str, str | None]:
    """"sdpa:cudnn" -> ("sdpa", "cudnn"); "sage" -> ("sage", None)."""
    name, _, kernel = backend.partition(":")
    return name, kernel or None


def installed(name: str) -> bool:
    """Whether the package a backend family needs is importable (SDPA is part of torch)."""
    return name not in PACKAGES or importlib.util.find_spec(PACKAGES[name]) is not None


def check_backend(backend: str) -> None:
    name, kernel = split_backend(backend)
    if name not in BACKENDS or (kernel is not None and (name != "sdpa" or kernel not in SDPA_KERNELS)):
        choices = ", ".join([*BACKENDS, *(f"sdpa:{k}" for k in SDPA_KERNELS)])
        raise HyVideoError(f"unknown attention backend {backend!r}; choose one of {choices}")
    if not installed(name):
        raise HyVideoError(f"attention backend {name!r} needs {PACKAGES[name]}: pip install 'hyvideo-lowvram[{EXTRAS[name]}]', "
                           "or use --attention sdpa")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, backend: str = "sdpa"
) -> torch.Tensor:
    """Full bidirectional attention, scale 1/sqrt(head_dim).

    q, k, v: [B, S, H, D]; key_mask: [B, S] bool (True = valid key, valid positions form a prefix) or
    None. Returns [B, S, H*D]. With "sage", k may be overwritten (see the module docstring).
    """
    name, kernel = split_backend(backend)
    if name == "flash":
        out = _flash_attention(q, k, v, key_mask)
    elif name == "sage" and key_mask is None:
        from sageattention import sageattn

        out = sageattn(q, k, v, tensor_layout="NHD", is_causal=False)  # [B, S, H, D] as given
    else:
        if name == "sage":
            warnings.warn("SageAttention takes no mask: this masked batch ran SDPA", stacklevel=2)
        out = _sdpa(q, k, v, key_mask, kernel)
    return out.flatten(2)


def _sdpa(q, k, v, key_mask, kernel: str | None):
    mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, S, D]
    if kernel is None:
        out = F.scaled_dot_product_attention(*args, attn_mask=mask)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                  "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[kernel]
        with sdpa_kernel(chosen):
            out = F.scaled_dot_product_attention(*args, attn_mask=mask)
    return out.transpose(1, 2)  # [B, S, H, D]


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


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention of q [B, Sq, H, D] over k, v [B, Sk, H, D] -> (out [B, Sq, H, D] in q's dtype,
    lse [B, H, Sq] float32, the log-sum-exp of each query's scaled scores). flash-attn and
    SageAttention return it themselves; otherwise PyTorch's flash SDPA op (the CPU's own on the CPU,
    the efficient kernel's on a GPU where flash does not apply: float32 or head_dim > 256)."""
    name, _ = split_backend(backend)
    if name == "flash":
        from flash_attn import flash_attn_func

        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
        return out, lse
    if name == "sage":
        from sageattention import sageattn

        if "return_lse" in inspect.signature(sageattn).parameters:  # SageAttention 2; 1.0.6 would return out alone
            return sageattn(q, k, v, tensor_layout="NHD", is_causal=False, return_lse=True)
        warnings.warn("this SageAttention returns no log-sum-exp (1.0.6): ring attention runs SDPA", stacklevel=2)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, S, D]
    ops = torch.ops.aten
    if q.device.type == "cpu":
        out, lse = ops._scaled_dot_product_flash_attention_for_cpu(*args, 0.0, False)[:2]
    elif q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse = ops._scaled_dot_product_flash_attention(*args, 0.0, False)[:2]
    else:
        out, lse = ops._scaled_dot_product_efficient_attention(*args, None, True)[:2]  # lse padded to 32 rows
    return out.transpose(1, 2), lse[..., : q.shape[1]].float()
