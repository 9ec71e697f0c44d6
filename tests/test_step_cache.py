"""Step caching (hyvideo/step_cache.py): the skip rule against a hand computation, exactness where
nothing is skipped, streaming with skipped steps (no copies, same bits as resident), and resume
from a saved cache state."""

import copy

import numpy as np
import pytest
import torch

from hyvideo.pipeline import GenerationRequest, denoise
from hyvideo.step_cache import HUNYUAN_COEFFICIENTS, CacheState, TeaCache, decide, expected_forwards, rescale
from hyvideo.text_encoder import TextEmbeddings
from lowvram.streaming import BlockStreamer
from tests.helpers import schedule_for, streaming_dit, streaming_inputs

# --- the rule, by hand -----------------------------------------------------------------------


def test_rescale_is_the_published_polynomial():
    for x in (0.0, 0.01, 0.05, 0.2, 0.7):
        assert rescale(x) == pytest.approx(float(np.poly1d(HUNYUAN_COEFFICIENTS)(x)), rel=1e-12)


def test_skip_decisions_match_a_hand_computation():
    """Threshold 0.1, 6 steps. poly(0) = 0.0961238; poly(0.05) = 0.0620384; poly(0.2) = 0.1337311
    (term by term: 733.226126 * 0.05**4 - 401.131952 * 0.05**3 + 67.5869174 * 0.05**2 - 3.149878 * 0.05
    + 0.0961238 = 0.0045827 - 0.0501415 + 0.1689673 - 0.1574939 + 0.0961238; for 0.2:
    1.1731618 - 3.2090556 + 2.7034767 - 0.6299756 + 0.0961238)."""
    assert rescale(0.05) == pytest.approx(0.0620384, abs=1e-6)
    assert rescale(0.2) == pytest.approx(0.1337311, abs=1e-6)
    inputs = [None, 0.0, 0.0, 0.05, 0.2, 0.0]  # rel-L1 per step (None: no previous step)
    expected = [
        (True, 0.0),  # step 0 always computes
        (False, 0.0961238),  # 0.0961 < 0.1: reuse
        (True, 0.0),  # 0.0961 + 0.0961 = 0.1922 >= 0.1: compute, reset
        (False, 0.0620384),  # reuse
        (True, 0.0),  # 0.0620 + 0.1337 = 0.1958 >= 0.1: compute
        (True, 0.0),  # the last step always computes, whatever the distance
    ]
    accumulated = 0.0
    for step, (rel, (compute, after)) in enumerate(zip(inputs, expected)):
        got, accumulated = decide(step, 6, accumulated, rel, 0.1)
        assert got == compute and accumulated == pytest.approx(after, abs=1e-6), step


def test_expected_forwards_from_the_published_speedups():
    assert expected_forwards("off", 50) == (50, 50)
    assert expected_forwards("safe", 50) == (31, 34)  # threshold 0.10: 50 / 1.66 .. 50 / 1.5
    assert expected_forwards("fast", 50) == (22, 24)  # threshold 0.15: 50 / 2.31 .. 50 / 2.1
    assert expected_forwards("fast", 1) == (1, 1)


# --- on a small DiT (3 double + 5 single blocks, float32) --------------------------------------

STEPS = 8
REQUEST = GenerationRequest("unused", width=64, height=48, frames=5, steps=STEPS, seed=0)  # latents [1, 16, 2, 6, 8]


@pytest.fixture(scope="module")
def model():
    return streaming_dit()


def embeddings():
    _, _, text, mask, pooled, _ = streaming_inputs()
    return TextEmbeddings(text, mask, pooled, [False], [False])


def noise():
    return streaming_inputs()[0]


def cache_for(model, threshold, state=None):
    return TeaCache(threshold, STEPS, copy.deepcopy(model.double_blocks[0].img_mod), state)


def run(model, cache=None, blocks_for_step=None, start_step=0, latents=None, on_step=None):
    return denoise(model, embeddings(), noise() if latents is None else latents, REQUEST, "cpu", start_step=start_step,
                   on_step=on_step, blocks_for_step=blocks_for_step, step_cache=cache)


@pytest.mark.slow
def test_a_cache_that_never_skips_is_bit_identical_to_no_cache(model):
    """Computing every step goes through the same four parts of the forward as no cache at all."""
    cache = cache_for(model, float("-inf"))  # no accumulated distance is below it
    assert torch.equal(run(model, cache), run(model))
    assert cache.state.computed == list(range(STEPS))


def test_first_and_last_steps_always_run(model):
    cache = cache_for(model, 1e9)  # everything in between is reused
    out = run(model, cache)
    assert cache.state.computed == [0, STEPS - 1]
    assert torch.isfinite(out).all() and not torch.equal(out, run(model))


def test_skipped_steps_copy_no_blocks_and_streamed_equals_resident(model):
    """A streamed run with skips: copies only for computed steps, in the streamed order, each
    streamed block once per computed step; final latents equal the resident cached run's."""
    threshold = 0.15
    resident = cache_for(model, threshold)
    expected = run(model, resident)
    assert 2 < len(resident.state.computed) < STEPS  # this input really skips some steps

    streamed_model = copy.deepcopy(model)
    schedule = schedule_for(streamed_model, resident=2, prefetch_depth=2)
    streamer = BlockStreamer(streamed_model.all_blocks(), schedule, "cpu", trace=True)
    cache = cache_for(streamed_model, threshold)
    out = run(streamed_model, cache, lambda i: streamer.blocks_for_step(prefetch_next_step=i + 1 < STEPS))
    assert torch.equal(out, expected) and cache.state.computed == resident.state.computed

    forwards = len(cache.state.computed)
    copies = [(s, b) for e, s, b, _ in streamer.trace if e == "copy"]
    assert len(copies) == forwards * len(schedule.streamed)  # nothing copied for a skipped step
    assert [b for _, b in copies] == list(schedule.streamed) * forwards  # the cyclic streamed order
    assert [s.blocks_copied for s in streamer.step_stats()] == [len(schedule.streamed)] * forwards


def test_resume_from_a_saved_cache_state_is_bit_exact(model):
    """Stop after any step k, keep (latents, cache state) as a checkpoint would, continue in a new
    cache: same final latents and the same computed steps as the uninterrupted run."""
    threshold = 0.15
    saved = {}

    def keep(i, latents):
        saved[i + 1] = (latents.clone(), copy.deepcopy(whole.state))

    whole = cache_for(model, threshold)
    expected = run(model, whole, on_step=keep)
    for k in range(1, STEPS):
        latents, state = saved[k]
        resumed = cache_for(model, threshold, CacheState(state.accumulated, list(state.computed), state.previous_latents,
                                                         state.residual, state.residual_step))
        assert torch.equal(run(model, resumed, start_step=k, latents=latents), expected), k
        assert resumed.state.computed == whole.state.computed


def test_the_probe_goes_to_the_compute_device_even_when_block_0_stays_on_the_host(model):
    """bench_speed built its probe from a streamed block on the host, so the first cached step on
    a GPU multiplied CUDA vectors by CPU weights (issue 21, item 7). The meta device stands in for
    the GPU: the probe is a copy there, the model's own block stays where it was."""
    from lowvram.stages import make_step_cache

    cache = make_step_cache(model, "safe", steps=4, device="meta")
    assert all(p.device.type == "meta" for p in cache.probe.parameters())
    assert all(p.device.type == "cpu" for p in model.double_blocks[0].img_mod.parameters())
    assert cache.probe is not model.double_blocks[0].img_mod
