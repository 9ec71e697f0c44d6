"""Which attention kernel a run uses: `--attention auto|sdpa|sage|flash` resolved on this device.

Attention is most of a step at 720p x 129 (~119k tokens; ~77 % of the FLOPs), so the kernel is the
largest speed lever, and which one is fastest depends on the GPU and the installed packages:
- `sage` (SageAttention, INT8 QK^T + FP16 PV; `pip install 'hyvideo-lowvram[sage]'`): on GeForce
  cards FP16-accumulate tensor cores run at twice the bf16 rate;
- `flash` (flash-attn; `[flash]`);
- `sdpa`: PyTorch's SDPA, with its kernel (flash, cuDNN, memory-efficient) chosen by measurement
  here instead of PyTorch's default order.

Each candidate is probed once per process on this device at the model's own heads and head size
(24 x 128 for the 13B model; bf16, 4096 tokens): it must run and match float32 SDPA (math kernel)
within its tolerance, and it is timed. The model's own shape matters: a kernel may support some
head sizes only (SageAttention 1.0.6: 64, 96 and 128; the tiny model's heads have 32). `auto` takes the fastest that passes; `sdpa` the fastest SDPA kernel; `sage` / `flash` that
one, or, when it is missing or fails its probe, the fastest SDPA kernel with a note saying why
(never an error). On the CPU there is nothing to choose: SDPA as PyTorch picks it.
"""

import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from hyvideo.attention import BACKENDS, EXTRAS, PACKAGES, SDPA_KERNELS, attention, installed, split_backend
from hyvideo.errors import HyVideoError

# "sdpa:KERNEL" pins one SDPA kernel, no timing: runs in separate processes then use the same one
# (bit-identical results; the CUDA resume test relies on it).
CHOICES = ("auto", *BACKENDS, *(f"sdpa:{kernel}" for kernel in SDPA_KERNELS))
PROBE_TOKENS = 4096
HEADS_13B, HEAD_DIM_13B = 24, 128  # what the probe runs at unless told the model's own
# Relative L2 error vs float32 attention a kernel may have on the probe's random inputs: bf16
# rounding of the output (~0.4 % per element) for the exact kernels; INT8 Q/K with per-block scales
# and FP16 P.V for sage (SageAttention reports ~1 % on real attention; 5 % still rejects garbage).
TOLERANCE = {"sdpa": 0.02, "flash": 0.02, "sage": 0.05}


@dataclass
class AttentionChoice:
    backend: str  # what the DiT runs, e.g. "sdpa:cudnn", "sage"
    notes: list[str] = field(default_factory=list)  # fallbacks, said once to the user
    timings_ms: dict = field(default_factory=dict)  # probe time per candidate that passed


def check_choice(requested: str) -> None:
    if requested not in CHOICES:
        raise HyVideoError(f"--attention must be one of {', '.join(CHOICES)}, not {requested!r}")


def _probe_inputs(device: torch.device, tokens: int, heads: int, head_dim: int):
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (1, tokens, heads, head_dim)
    return [torch.randn(shape, generator=gen).to(device, torch.bfloat16) for _ in range(3)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(backend: str, device: torch.device, tokens: int = PROBE_TOKENS, heads: int = HEADS_13B,
          head_dim: int = HEAD_DIM_13B) -> tuple[float | None, str | None]:
    """(milliseconds per call, None) if `backend` runs here within its tolerance at this many heads
    of this size, else (None, why). Every call gets its own copy of k: `attention` may overwrite it
    (hyvideo/attention.py, SageAttention)."""
    name, _ = split_backend(backend)
    if not installed(name):
        return None, f"is not installed (pip install 'hyvideo-lowvram[{EXTRAS[name]}]' for {PACKAGES[name]})"
    q, k, v = _probe_inputs(device, tokens, heads, head_dim)
    try:
        with torch.inference_mode():
            reference = attention(q.float(), k.float(), v.float(), backend="sdpa:math")
            out = attention(q, k.clone(), v, backend=backend)
            error = float((out.float() - reference).norm() / reference.norm())
            if not error <= TOLERANCE[name]:
                return None, f"failed its probe (relative error {error:.3f} > {TOLERANCE[name]})"
            keys = [k.clone() for _ in range(3)]
            _sync(device)
            began = time.perf_counter()
            for copy in keys:
                attention(q, copy, v, backend=backend)
            _sync(device)
    except Exception as error:  # a kernel that cannot run here (no build for this GPU, Triton missing, ...)
        return None, f"failed its probe ({type(error).__name__}: {' '.join(str(error).split())[:120]})"
    return (time.perf_counter() - began) * 1000 / 3, None


def candidates(requested: str) -> list[str]:
    """What `requested` may run on a GPU, in the order tried."""
    sdpa = [f"sdpa:{kernel}" for kernel in SDPA_KERNELS if kernel != "math"]
    return {"auto": ["sage", "flash", *sdpa], "sdpa": sdpa}.get(requested, list(dict.fromkeys([requested, *sdpa])))


def choose(requested: str, probed: dict[str, tuple[float | None, str | None]]) -> AttentionChoice:
    """The pick among probed candidates ({backend: (ms or None, why not)}): see the module docstring."""
    passed = {backend: ms for backend, (ms, _) in probed.items() if ms is not None}
    if requested not in ("auto", "sdpa"):  # one kernel asked for: taken if it passed, even if not the fastest
        if requested in passed:
            return AttentionChoice(requested, [], passed)
        notes = [f"attention '{requested}' {probed[requested][1]}; using SDPA"]
        passed.pop(requested, None)
    else:
        notes = []
    if not passed:
        return AttentionChoice("sdpa", notes + ["no attention kernel passed its probe; using SDPA's default"], {})
    return AttentionChoice(min(passed, key=passed.get), notes, passed)


@lru_cache(maxsize=None)
def resolve_attention(requested: str, device: str, heads: int = HEADS_13B, head_dim: int = HEAD_DIM_13B) -> AttentionChoice:
    """The backend for `requested` on `device` for a model with `heads` heads of `head_dim` (probed
    once per process, device and shape)."""
    check_choice(requested)
    if torch.device(device).type != "cuda":
        notes = [] if requested in ("auto", "sdpa") else [f"attention '{requested}' needs CUDA; using sdpa on the CPU"]
        return AttentionChoice("sdpa", notes)
    return choose(requested, {backend: probe(backend, torch.device(device), heads=heads, head_dim=head_dim)
                              for backend in candidates(requested)})


def usable_backend(stored: str, device: str, heads: int = HEADS_13B, head_dim: int = HEAD_DIM_13B) -> AttentionChoice:
    """The backend a run stored, if it still runs here for this model's heads (resume on another
    machine); else the fastest SDPA kernel, with a note that results may differ slightly from an
    uninterrupted run."""
    name, _ = split_backend(stored)
    if torch.device(device).type != "cuda" or (
            installed(name) and probe(stored, torch.device(device), heads=heads, head_dim=head_dim)[0] is not None):
        return AttentionChoice(stored)
    backend = resolve_attention("sdpa", device, heads, head_dim).backend
    return AttentionChoice(backend, [f"the run used attention '{stored}', which does not run here; continuing with {backend} "
                                     "(the result may differ slightly from an uninterrupted run)"])
