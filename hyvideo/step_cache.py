"""Step caching with TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video
Diffusion Model", CVPR 2025): on steps whose input barely changed since the last computed step,
skip the DiT's 60 blocks and reuse their residual.

The rule, as TeaCache4HunyuanVideo applies it (the published coefficients are for this model):
  m_i   = LayerNorm(img_in(x_i)) * (1 + scale_i) + shift_i    shift/scale: double block 0's img_mod(vec_i)
  rel_i = mean|m_i - m_(i-1)| / mean|m_(i-1)|
  acc  += poly(rel_i)        poly: the published 4th-order fit of output change to input change
  acc >= threshold: compute all blocks, acc = 0, residual = (tokens after the blocks) - img_in(x_i)
  else:             tokens after the blocks = img_in(x_i) + residual
The first and the last step always compute. The final layer always runs.

Presets (`safe`, `fast`), with what was published for HunyuanVideo 720p x 129, 50 steps:
- safe = threshold 0.10: TeaCache's README, ~50 -> ~30 min on an A800 (1.6x); 1.5-1.66x at PSNR
  21.9-23.9 vs uncached in later papers' comparisons (ScalingCache, ProfilingDiT tables).
- fast = threshold 0.15: TeaCache's README, ~50 -> ~23 min (2.1x); 2.31x at PSNR 21.6 (ProfilingDiT).
These are real-model figures: with random weights the skip pattern says nothing about quality.

Why TeaCache, after evaluating cache-dit (DBCache / TaylorSeer, PyPI `cache-dit` 1.5): cache-dit
wraps a diffusers pipeline's transformer and replaces its block ModuleLists with its own cached
blocks, deciding *inside* each forward after the first Fn blocks. Here blocks come from the
streamer one step at a time (`blocks=`), copies of the later blocks are already issued when a
mid-forward decision is made, cache-dit's state lives in its context objects (nothing a run
checkpoint can save for a bit-exact resume), and it needs diffusers' transformer class. The same
mid-forward decision rules out First-Block-Cache. TeaCache decides from (x_i, t_i) *before* any
block is asked for, so a skipped step issues no block copies, and its whole state is a float, the
previous step's latents and one residual.

Where this differs from the reference code (same decisions up to float rounding): m_(i-1) is
recomputed from x_(i-1) instead of being kept (one [N, D] tensor less: 0.73 GB at 720p, and the
resume state stays small), the means are float32 sums over token chunks, and the residual's
img_in(x_i) is recomputed after the blocks instead of a clone being kept through them (0.73 GB less
at 720p while the blocks run).
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .blocks import linear_rows, norm_modulate, token_chunks
from .dit import HunyuanVideoDiT

# TeaCache's presets (the 13B model): the name, and its threshold, looked up here and nowhere else.
PRESETS = {"off": None, "safe": 0.10, "fast": 0.15}
# The one vocabulary of the step cache, from `--cache` to profile files to run manifests: TeaCache's
# presets and HunyuanVideo-1.5's DeepCache (hyvideo/v15_step_cache.py; each family takes its own).
STEP_CACHES = (*PRESETS, "deepcache")
# TeaCache4HunyuanVideo's fit of the output change to the modulated input change (highest power first).
HUNYUAN_COEFFICIENTS = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)
# What published runs at 720p x 129 saved (see the module docstring): DiT forwards = steps / speedup.
PUBLISHED_SPEEDUP = {0.10: (1.5, 1.66), 0.15: (2.1, 2.31)}


def rescale(rel_l1: float, coefficients: tuple[float, ...] = HUNYUAN_COEFFICIENTS) -> float:
    """The polynomial, evaluated as numpy.poly1d does (highest power first)."""
    value = 0.0
    for c in coefficients:
        value = value * rel_l1 + c
    return value


def decide(step: int, steps: int, accumulated: float, rel_l1: float | None, threshold: float) -> tuple[bool, float]:
    """(compute this step?, accumulated distance after it). `rel_l1` is None on the first step."""
    if step == 0 or step == steps - 1 or rel_l1 is None:
        return True, 0.0
    accumulated += rescale(rel_l1)
    if accumulated < threshold:
        return False, accumulated
    return True, 0.0


@dataclass
class CacheState:
    """What a resume needs to continue bit-identically (saved with every step's checkpoint)."""

    accumulated: float = 0.0
    computed: list[int] = field(default_factory=list)  # steps whose DiT blocks ran, in order
    previous_latents: torch.Tensor | None = None  # x_(i-1), float32, on the host
    residual: torch.Tensor | None = None  # [1, N_img, D] compute dtype, on the host (all tokens, also when sharded)
    residual_step: int | None = None  # the step that computed `residual`
    split: list[int] | None = None  # DeepCache (hyvideo/v15_step_cache.py): `residual` holds one part per forward, these long


class TeaCache:
    """Decides per step whether the DiT's blocks run, and carries the residual between steps.

    probe: a copy of double block 0's `img_mod` on the compute device (lowvram/ keeps it there even
    when block 0 itself is streamed, so deciding never needs a block copy)."""

    def __init__(self, threshold: float, steps: int, probe: torch.nn.Module, state: CacheState | None = None):
        self.threshold, self.steps, self.probe = threshold, steps, probe
        self.state = state or CacheState()

    def _shift_scale(self, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first two of block 0's six image modulation chunks, each [1, 1, D]."""
        rows = slice(0, 2 * vec.shape[-1])
        return linear_rows(self.probe.linear, self.probe.act(vec), rows).unsqueeze(1).chunk(2, dim=-1)

    def _rel_l1(self, dit: HunyuanVideoDiT, img, vec, previous_x, previous_t, text_states_2, guidance) -> float:
        """mean|m_i - m_(i-1)| / mean|m_(i-1)|, as float32 sums over token chunks."""
        previous_img = dit.embed_image(previous_x)  # [1, N, D]
        previous_vec = dit.conditioning(previous_t, text_states_2, guidance)
        (shift, scale), (previous_shift, previous_scale) = self._shift_scale(vec), self._shift_scale(previous_vec)
        change = total = torch.zeros((), dtype=torch.float32, device=img.device)
        for rows in token_chunks(img.shape[1], dit.token_chunk):
            before = norm_modulate(previous_img[:, rows], previous_shift, previous_scale).float()
            now = norm_modulate(img[:, rows], shift, scale).float()
            change = change + (now - before).abs().sum()
            total = total + before.abs().sum()
        if dit.sequence_parallel is not None:  # each process holds a share of the tokens
            change, total = dit.sequence_parallel.all_sum(torch.stack([change, total]))
        return float(change / total)  # the one device sync of the decision

    def forward(
        self, dit: HunyuanVideoDiT, step: int, x: torch.Tensor, timesteps: torch.Tensor, text_states, text_mask,
        text_states_2, guidance, blocks_for_step: Callable[[int], Iterable[torch.nn.Module]] | None = None,
        riflex: bool = False,
    ) -> torch.Tensor:
        """The velocity at `step` (x: float32 latents [1, C, T, H, W]); asks for the blocks only
        when they run. riflex: as the DiT's forward."""
        if x.shape[0] != 1:
            raise ValueError("the step cache runs batch 1 (one residual per video)")
        state = self.state
        t = timesteps[step : step + 1]
        vec = dit.conditioning(t, text_states_2, guidance)
        img = dit.embed_image(x)  # [1, N, D]
        rel_l1 = None
        if state.previous_latents is not None and step > 0:
            rel_l1 = self._rel_l1(dit, img, vec, state.previous_latents.to(x.device), timesteps[step - 1 : step],
                                  text_states_2, guidance)
        compute, state.accumulated = decide(step, self.steps, state.accumulated, rel_l1, self.threshold)
        if not compute and state.residual is None:  # no residual to reuse (cannot happen after step 0)
            compute, state.accumulated = True, 0.0
        if compute:
            del img  # transform embeds the tokens again: nothing but the blocks holds them meanwhile
            blocks = blocks_for_step(step) if blocks_for_step is not None else None
            img = dit.transform(x, vec, t, text_states, text_mask, blocks, riflex=riflex)
            state.residual = dit.gather_image_tokens(img - dit.embed_image(x), x).to("cpu", copy=True)
            state.residual_step = step
            state.computed.append(step)
        else:
            img = img + dit.shard_image_tokens(state.residual, x).to(x.device)  # this process's share, moved alone
        state.previous_latents = x.to("cpu", torch.float32, copy=True)
        return dit.head(img, vec, x)


def expected_forwards(preset: str, steps: int) -> tuple[int, int]:
    """(fewest, most) DiT forwards expected for a `steps`-step run with step cache `preset`, from
    the published speedups at its threshold (the first and last step always run); DeepCache's
    computed steps are known in advance."""
    if preset == STEP_CACHES[-1]:
        from .v15_step_cache import deepcache_steps  # (that module builds on this one)

        return len(deepcache_steps(steps)), len(deepcache_steps(steps))
    threshold = PRESETS[preset]
    if threshold is None:
        return steps, steps
    fewest = min(2, steps)
    slow, fast = PUBLISHED_SPEEDUP[threshold]
    return max(fewest, math.ceil(steps / fast)), min(steps, math.ceil(steps / slow))
