"""HunyuanVideo-1.5 text-to-video through the engine's `Stages` on tiny weights (Tencent's layout,
the tiny encoders of tests/tiny_v15_text.py): prompt -> Qwen2.5-VL + byT5 -> FP8 DiT from the
quantize-once cache with one block streamed under real CFG -> tiled 16x VAE decode; the streamed
FP8 stage equals the same DiT resident, a run resumed from a step's latents equals the whole run,
and the bf16 stage equals the model side's own denoising."""

import dataclasses

import pytest
import torch

from hyvideo.checkpoint import find_model_files
from hyvideo.sampler import initial_noise
from hyvideo.v15_checkpoint import load_v15_dit
from hyvideo.v15_config import V15Sampling
from hyvideo.v15_pipeline import denoise
from lowvram.planner import plan
from lowvram.profiles import Profile
from lowvram.stages import Stages, model_sizes
from lowvram.setup.synthetic_v15 import write_v15_checkpoint
from tests.tiny_v15_text import write_official_encoders

WIDTH, HEIGHT, FRAMES = 96, 64, 9  # latents 3 x 4 x 6
SAMPLING = V15Sampling(steps=3, guidance_scale=6.0, flow_shift=5.0)
STREAMED = Profile(name="test", vram_budget_gb=2.0, dit_scheme="fp8", encoder_scheme="bf16", resident_blocks=1, prefetch_depth=1,
                   token_chunk=16, vae_spatial_tile=8, vae_temporal_tile=4, pin_memory=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("v15stages") / "ckpts"
    write_v15_checkpoint(root, "official", "tiny")
    write_official_encoders(root)  # real tiny encoders in place of the config-only folders
    return find_model_files(root)


def stages_for(files, profile, tmp_path) -> Stages:
    found = plan(profile, WIDTH, HEIGHT, FRAMES, **model_sizes(files, (HEIGHT, WIDTH)))
    return Stages(files, found, torch.device("cpu"), "sdpa", cache_dir=tmp_path)


@pytest.mark.slow
def test_text_to_video_through_the_stages(files, tmp_path):
    stages = stages_for(files, STREAMED, tmp_path)
    assert stages.plan.schedule.streamed == (0,) and stages.plan.schedule.forwards_per_step == 2
    prompt, negative = stages.v15_text_encoder().encode('a fox holding a sign that says "hello"')
    assert prompt.byt5_mask.any() and not negative.byt5_mask.any()  # the quoted text reaches byT5
    noise = initial_noise((1, 4, 3, 4, 6), seed=7)
    model, streamer = stages.dit()
    saved = {}
    latents = stages.denoise_v15(model, streamer, prompt, negative, noise, SAMPLING, start_step=0,
                                 on_step=lambda i, x: saved.setdefault(i, x.clone()))
    assert [s.blocks_copied for s in streamer.step_stats()] == [1] * 2 * SAMPLING.steps  # block 0, twice a step
    resumed = stages.denoise_v15(model, streamer, prompt, negative, saved[0], SAMPLING, start_step=1, on_step=None)
    assert torch.equal(resumed, latents)
    stages.release_dit(model, streamer)

    resident = stages_for(files, dataclasses.replace(STREAMED, resident_blocks=2), tmp_path)
    model, streamer = resident.dit()
    assert torch.equal(resident.denoise_v15(model, streamer, prompt, negative, noise, SAMPLING, start_step=0, on_step=None), latents)

    frames = stages.decode(stages.vae(), latents, lambda done, total: None)
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == torch.uint8
    assert stages.stats["vae"]["tiles"] > 1  # 16x VAE in tiles of 4 latents (the profile's 8 at 8x)


@pytest.mark.slow
def test_bf16_stage_equals_the_model_side(files, tmp_path):
    stages = stages_for(files, dataclasses.replace(STREAMED, dit_scheme="bf16"), tmp_path)
    prompt, negative = stages.v15_text_encoder().encode("a fox")
    noise = initial_noise((1, 4, 3, 4, 6), seed=7)
    model, streamer = stages.dit()
    ours = stages.denoise_v15(model, streamer, prompt, negative, noise, SAMPLING, start_step=0, on_step=None)
    plain = load_v15_dit(files, torch.float32)
    expected = denoise(plain, prompt, negative, noise, SAMPLING.steps, SAMPLING.flow_shift, SAMPLING.guidance_scale, "cpu")
    assert torch.equal(ours, expected)
