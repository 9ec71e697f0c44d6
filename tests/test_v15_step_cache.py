"""HunyuanVideo-1.5's step cache, DeepCache as Tencent ships it (hyvideo/v15_step_cache.py): the
schedule of Tencent's generate.py, the denoise loop against diffusers' HunyuanVideo15Pipeline whose
transformer blocks are wrapped as AngelSlim's DeepCacheHelper wraps them, and the runner's
checkpoints: a run stopped on a cached step resumes bit-identically."""

import pytest
import torch

from hyvideo.v15_config import V15_DIT_CONFIGS, V15_VAE_CONFIGS
from hyvideo.v15_dit import HunyuanVideo15DiT
from hyvideo.v15_keys import ours_to_diffusers
from hyvideo.v15_pipeline import denoise
from hyvideo.v15_step_cache import DeepCache, deepcache_steps
from tests.helpers import randomize_

TINY = V15_DIT_CONFIGS["tiny"]


def test_the_schedule_is_tencents():
    """generate.py's defaults (cache_start_step 11, cache_end_step 45, cache_step_interval 4,
    total_steps 50) give AngelSlim's no_cache_steps: 25 computed steps; other step counts scale the
    bounds."""
    assert deepcache_steps(50) == [*range(11), 11, 15, 19, 23, 27, 31, 35, 39, 43, 45, 46, 47, 48, 49]
    assert len(deepcache_steps(50)) == 25
    assert deepcache_steps(20) == [0, 1, 2, 3, 4, 8, 12, 16, 18, 19]  # bounds 4 and 18
    assert deepcache_steps(3) == [0, 1]  # the last step reuses step 1's input to the last block


def wrap_like_deepcache_helper(transformer, computed_steps: list[int], forwards: int) -> None:
    """AngelSlim's DeepCacheHelper.wrap_block_forward on every transformer block, no_cache_block_id
    the last block: on a step outside `computed_steps` a block returns its output of the last
    computed step instead of running. The step is counted from the transformer's calls (diffusers
    calls it once per CFG branch), each branch keeping its own outputs, as Tencent's batched CFG does."""
    calls, cached = [0], {}
    last = len(transformer.transformer_blocks) - 1
    transformer_forward = transformer.forward

    def counted(*args, **kwargs):
        try:
            return transformer_forward(*args, **kwargs)
        finally:
            calls[0] += 1

    transformer.forward = counted
    for index, block in enumerate(transformer.transformer_blocks):
        def wrapped(*args, _index=index, _forward=block.forward, **kwargs):
            step, branch = divmod(calls[0], forwards)
            if step not in computed_steps and _index != last:
                return cached[(_index, branch)]
            cached[(_index, branch)] = _forward(*args, **kwargs)
            return cached[(_index, branch)]

        block.forward = wrapped


@pytest.mark.slow  # 50 steps x 2 forwards on both sides, ~4 s
def test_denoise_matches_the_deepcache_helper_on_diffusers():
    """Tencent's schedule over 50 steps under real CFG (guidance 6): our loop with DeepCache equals
    diffusers' pipeline with the helper's wrapping within float32 rounding (the bound of the 1.5
    pipeline parity, tests/test_v15_pipeline.py); and the cache does change the result (by far more
    than the bound), so the comparison would see a wrong schedule or block."""
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel)

    from tests.helpers import make_v15_prompt as make_prompt
    from tests.test_v15_pipeline import TOL, pipeline_latents

    dit = HunyuanVideo15DiT(TINY).eval()
    randomize_(dit, seed=2)
    transformer = HunyuanVideo15Transformer3DModel(**TINY.to_diffusers()).eval()
    transformer.load_state_dict(ours_to_diffusers(dit.state_dict()), strict=True)
    wrap_like_deepcache_helper(transformer, deepcache_steps(50), forwards=2)
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=AutoencoderKLHunyuanVideo15(**V15_VAE_CONFIGS["tiny"].to_diffusers()),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    positive, negative = make_prompt(1, valid=9, byt5_valid=4), make_prompt(2, valid=5, byt5_valid=0)
    noise = torch.randn(1, TINY.latent_channels, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    cache = DeepCache(50, forwards=2)
    ours = denoise(dit, positive, negative, noise, steps=50, flow_shift=5.0, guidance_scale=6.0, device="cpu", step_cache=cache)
    uncached = denoise(dit, positive, negative, noise, steps=50, flow_shift=5.0, guidance_scale=6.0, device="cpu")
    expected = pipeline_latents(pipe, positive, negative, noise, 50, 5.0, height=64, width=96)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert cache.state.computed == deepcache_steps(50)
    assert rel(ours, expected) <= TOL  # measured 3.3e-7
    assert rel(uncached, expected) > 100 * TOL, rel(uncached, expected)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lowvram.setup.synthetic_v15 import write_v15_checkpoint
    from tests.tiny_v15_text import write_official_encoders

    root = tmp_path_factory.mktemp("v15cache") / "ckpts"
    write_v15_checkpoint(root, "official", "tiny")
    return write_official_encoders(root)


@pytest.mark.slow
def test_a_run_stopped_on_a_cached_step_resumes_bit_identically(model_dir, tmp_path):
    """`--cache deepcache` through the runner on the streamed FP8 DiT (1 of 2 blocks resident: the
    last, which the cached steps run alone): 20 steps compute 10 (blocks copied on their forwards
    only); stopped after step 6, a cached step whose kept input is step 4's, the run resumes to the
    uninterrupted run's final latents bit for bit; the cache changes the result."""
    import dataclasses

    from hyvideo.pipeline import GenerationRequest
    from lowvram.generation.preflight import start_run
    from lowvram.generation.run_folder import find_run
    from lowvram.generation.runner import RunInterrupted, StopRequest, execute, resume_run
    from lowvram.profiles import Overrides
    from lowvram.progress import Reporter
    from tests.test_v15_generate import options

    request = GenerationRequest('a fox with a sign that says "hi"', width=96, height=64, frames=9, seed=5, steps=20)

    def cached(runs, **fields):
        return dataclasses.replace(options(model_dir, runs, **fields), request=request, overrides=Overrides(step_cache="deepcache"))

    whole = execute(*start_run(cached(tmp_path / "a")))
    assert whole.stats["dit"]["computed_steps"] == deepcache_steps(20) == [0, 1, 2, 3, 4, 8, 12, 16, 18, 19]
    assert whole.stats["dit"]["blocks_copied_per_step"] == [1] * 20  # 10 computed steps x 2 forwards, block 0 streamed
    final = find_run(tmp_path / "a", whole.run_id).load_final()

    class StopAfterStep6(Reporter):
        def advance(self, completed: int, **info) -> None:
            if completed >= 6:
                stop.set()

    stop = StopRequest()
    run, files, plan = start_run(cached(tmp_path / "b"))
    assert plan.profile.step_cache == "deepcache" and 1 in plan.schedule.resident
    with pytest.raises(RunInterrupted):
        execute(run, files, plan, StopAfterStep6(), stop)
    assert find_run(tmp_path / "b", run.id).step == 6
    assert resume_run(tmp_path / "b", run.id).resumed_from == "step 6/20"
    assert find_run(tmp_path / "b", run.id).load_final().equal(final)
    plain = execute(*start_run(dataclasses.replace(options(model_dir, tmp_path / "c"), request=request)))
    assert not find_run(tmp_path / "c", plain.run_id).load_final().equal(final)


@pytest.mark.cuda
def test_cuda_streamed_deepcache_equals_resident():
    """On a GPU, the 1.5 DiT streamed (block 0 through the ring, the last block resident, as the
    planner keeps it for DeepCache) with the cache equals the resident DiT with the cache, bit for
    bit: the same kernels on the same weights; the cached steps take the kept tokens to the GPU
    as a copy, never moving them (20 steps: 10 cached)."""
    from lowvram.schedule import plan_schedule
    from lowvram.streaming import BlockStreamer, forward_blocks
    from tests.helpers import make_v15_prompt as make_prompt

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    positive, negative = make_prompt(1, valid=9, byt5_valid=4), make_prompt(2, valid=5, byt5_valid=0)
    noise = torch.randn(1, TINY.latent_channels, 3, 4, 6, generator=torch.Generator().manual_seed(3))

    def run(streamed: bool) -> torch.Tensor:
        dit = HunyuanVideo15DiT(TINY).eval()
        randomize_(dit, seed=2)
        if not streamed:
            return denoise(dit.to(device), positive, negative, noise, 20, 5.0, 6.0, device, step_cache=DeepCache(20, 2))
        for name, child in dit.named_children():
            if name != "double_blocks":
                child.to(device)
        schedule = plan_schedule(["double"] * TINY.double_blocks, [1] * TINY.double_blocks, resident=0, keep=(1,))
        with BlockStreamer(dit.all_blocks(), schedule, device) as streamer:
            return denoise(dit, positive, negative, noise, 20, 5.0, 6.0, device, step_cache=DeepCache(20, 2),
                           blocks_for_forward=forward_blocks(streamer, 20, 2), last_block=streamer.resident_block(1))

    assert torch.equal(run(streamed=True), run(streamed=False))
