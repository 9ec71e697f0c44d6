"""HunyuanVideo-1.5's step cache: DeepCache as Tencent ships it (HunyuanVideo-1.5 `generate.py
--enable_cache`, whose default `--cache_type deepcache` wraps every double block in AngelSlim's
`DeepCacheHelper` with `no_cache_block_id` 53).

On a *cached* step every double block but the last returns, without running, its output of the
last computed step. So the last block runs on the input it had then (the second-to-last block's
image and text tokens), with this step's timestep modulation, and the final layer follows as
always. The text stream is not embedded on a cached step: the cached text tokens replace it.

Computed steps are Tencent's `no_cache_steps` for its defaults (cache_start_step 11, cache_end_step
45, cache_step_interval 4, total_steps 50): every step before 11, every 4th from 11 to 44, every
step from 45. That is 25 of 50 steps computed; on the other 25 one block of 54 runs. For another
step count the two bounds scale with it (rounded); the interval stays 4. Tencent's generate.py
refuses the cache with the step-distilled transformer ("performance degradation"); so does lowvram/.

Under real CFG each of a step's forwards (conditional, unconditional) keeps its own input to the
last block: Tencent's pipeline runs the two as one batch, whose cached block outputs hold both.

The state is `step_cache.CacheState`, so a run resumes bit-identically from any step's checkpoint:
`residual` holds each forward's [image ; text] tokens (all image tokens, gathered from every rank
under sequence parallelism) concatenated along the tokens, `split` their lengths. They are kept
only from a computed step that a cached step follows (on the host, in the compute dtype: 0.47 GB
per forward at 720p x 121).
"""

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from .dit import token_grid
from .step_cache import STEP_CACHES, CacheState

DEEPCACHE = STEP_CACHES[-1]  # its --cache / profile name
PUBLISHED_STEPS, PUBLISHED_START, PUBLISHED_END, INTERVAL = 50, 11, 45, 4  # generate.py's defaults


def deepcache_steps(steps: int) -> list[int]:
    """The computed steps of a `steps`-step run (Tencent's `no_cache_steps`, bounds scaled)."""
    start = round(PUBLISHED_START * steps / PUBLISHED_STEPS)
    end = round(PUBLISHED_END * steps / PUBLISHED_STEPS)
    return sorted({*range(0, start), *range(start, end, INTERVAL), *range(end, steps)})


class DeepCache:
    """Runs one forward of a step, all blocks or (cached) the last one, and keeps the last block's
    input where a cached step follows. `forwards`: DiT forwards per step (2 under real CFG)."""

    def __init__(self, steps: int, forwards: int, state: CacheState | None = None):
        self.steps, self.forwards = steps, forwards
        self.computed_steps = frozenset(deepcache_steps(steps))
        self.state = state or CacheState()
        self._kept: list[torch.Tensor] = []  # this step's forwards' [img ; txt] on the host, until its last forward

    def forward(
        self, dit, step: int, forward: int, x: torch.Tensor, t: torch.Tensor, prompt, vision_states, timestep_r,
        blocks: Callable[[], Iterable[nn.Module] | None], last_block: nn.Module,
    ) -> torch.Tensor:
        """The velocity of forward `forward` (0: conditional, 1: unconditional) of `step`.
        blocks(): the DiT's blocks for a computed forward (asked only then); last_block: the last
        double block where it runs (resident), for a cached forward."""
        state = self.state
        vec = dit.conditioning(t, timestep_r)
        if step not in self.computed_steps and state.residual is not None:
            img, txt = self._cached_input(dit, x, forward)
            return dit.head(dit.transform_last(x, vec, img, txt, last_block), vec, x)
        if forward == 0:
            state.computed.append(step)
            self._kept = []
        keep = step + 1 < self.steps and step + 1 not in self.computed_steps

        def on_last_input(img: torch.Tensor, txt: torch.Tensor) -> None:
            if keep:  # all image tokens (every rank's), then this forward's text tokens
                self._kept.append(torch.cat([dit.gather_image_tokens(img, x), txt], dim=1).to("cpu", copy=True))

        txt, txt_mask = dit.text_tokens(t, prompt.text_states, prompt.text_mask, prompt.byt5_states, prompt.byt5_mask,
                                        vision_states)
        img = dit.transform(x, vec, txt, txt_mask, blocks(), on_last_input)
        if keep and forward == self.forwards - 1:
            state.split = [part.shape[1] for part in self._kept]
            state.residual, state.residual_step, self._kept = torch.cat(self._kept, dim=1), step, []
        return dit.head(img, vec, x)

    def _cached_input(self, dit, x: torch.Tensor, forward: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(this process's image tokens, the text tokens) that forward `forward` kept, on x's device."""
        state, n_img = self.state, math.prod(token_grid(x.shape[2:], dit.config.patch_size))
        start = sum(state.split[:forward])
        # a copy also on the CPU: the block updates its input in place, and the kept input serves every cached step
        joint = state.residual[:, start : start + state.split[forward]].to(x.device, copy=True)  # [1, N_img + L, D]
        return dit.shard_image_tokens(joint[:, :n_img], x), joint[:, n_img:]
