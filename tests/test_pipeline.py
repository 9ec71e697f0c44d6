"""End-to-end tiny pipeline: both layouts, determinism, request validation."""

import pytest
import torch

from hyvideo.checkpoint import find_model_files
from hyvideo.errors import HyVideoError
from hyvideo.pipeline import GenerationRequest, HunyuanVideoPipeline, latents_to_frames, validate_request

REQUEST = GenerationRequest("a red fox running through snow", width=64, height=48, frames=9, steps=2, seed=7)


def pipeline(root):
    return HunyuanVideoPipeline.from_files(
        find_model_files(root), "cpu", dit_dtype=torch.float32, vae_dtype=torch.float32, text_dtype=torch.float32
    )


@pytest.fixture(scope="module")
def official_pipeline(tiny_official):
    return pipeline(tiny_official)


def test_frames_shape_dtype_and_determinism(official_pipeline):
    first = official_pipeline.generate(REQUEST)
    assert first.shape == (9, 48, 64, 3) and first.dtype == torch.uint8
    assert first.float().std() > 0  # not a constant image
    assert torch.equal(first, official_pipeline.generate(REQUEST))  # same seed, same frames
    other = GenerationRequest(**{**REQUEST.__dict__, "seed": 8})
    assert not torch.equal(first, official_pipeline.generate(other))


def test_layouts_give_identical_frames(official_pipeline, tiny_diffusers):
    assert torch.equal(official_pipeline.generate(REQUEST), pipeline(tiny_diffusers).generate(REQUEST))


def test_resume_from_a_saved_step_is_bit_exact(official_pipeline):
    """Denoising is a pure function of (latents, step): stopping after step 0 and continuing from
    the saved latents gives the same result as an uninterrupted run."""
    from hyvideo.pipeline import latent_shape_for
    from hyvideo.sampler import initial_noise

    request = GenerationRequest(**{**REQUEST.__dict__, "steps": 3})
    emb = official_pipeline.encode_text(request.prompt, request.frames)
    noise = initial_noise(latent_shape_for(request, official_pipeline.dit, official_pipeline.vae), request.seed)
    saved = {}
    full = official_pipeline.denoise(emb, noise, request, on_step=lambda i, x: saved.setdefault(i, x.clone()))
    resumed = official_pipeline.denoise(emb, saved[0], request, start_step=1)
    assert torch.equal(full, resumed)


def test_single_frame_uses_image_template(official_pipeline):
    frames = official_pipeline.generate(GenerationRequest("a lighthouse", width=32, height=32, frames=1, steps=1))
    assert frames.shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"frames": 8}, "4k\\+1.*try 5 or 9"),
        ({"width": 100}, "multiple of 16.*try 112"),
        ({"height": 0}, "height must be a positive multiple of 16"),
        ({"steps": 0}, "at least 1"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"width": 4096, "height": 4096}, "larger than any HunyuanVideo bucket"),
    ],
)
def test_bad_requests_rejected(change, message):
    with pytest.raises(HyVideoError, match=message):
        validate_request(GenerationRequest(**{**REQUEST.__dict__, **change}))


def test_latents_to_frames_follows_official_rounding():
    video = torch.tensor([-1.5, -1.0, 0.0, 0.999, 2.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    frames = latents_to_frames(video)
    # clamp(x/2 + 0.5, 0, 1) * 255, truncated: -1.5 -> 0, -1 -> 0, 0 -> 127 (127.5 truncated), 0.999 -> 254, 2 -> 255
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 127, 254, 255]
