"""End-to-end tiny pipeline (hyvideo's functions, all models whole on the CPU in float32): both
layouts, determinism, request validation."""

import pytest
import torch

from hyvideo.checkpoint import find_model_files, load_dit, load_vae
from hyvideo.errors import HyVideoError
from hyvideo.pipeline import GenerationRequest, decode, denoise, latents_to_frames, validate_request
from hyvideo.sampler import initial_noise
from hyvideo.text_encoder import ClipTextEncoder, LlamaTextEncoder, encode_prompts
from hyvideo.vae import latent_shape

REQUEST = GenerationRequest("a red fox running through snow", width=64, height=48, frames=9, steps=2, seed=7)


class Pipeline:
    """The four models of one folder, whole, in float32: encode, denoise, decode."""

    def __init__(self, root):
        files = find_model_files(root)
        f32 = torch.float32
        self.dit, self.vae = load_dit(files, f32), load_vae(files, f32)
        self.llm = LlamaTextEncoder.from_folder(files.llm, dtype=f32, device="cpu", tokenizer_folder=files.llm_tokenizer)
        self.clip = ClipTextEncoder.from_folder(files.clip, dtype=f32, device="cpu", tokenizer_folder=files.clip_tokenizer)

    def encode_text(self, prompt, frames):
        return encode_prompts(self.llm, self.clip, [prompt], frames)

    def noise(self, request):
        return initial_noise((1, *latent_shape(request.frames, request.height, request.width, self.vae.config)), request.seed)

    def denoise(self, embeddings, latents, request, start_step=0, on_step=None):
        return denoise(self.dit, embeddings, latents, request, "cpu", start_step, on_step)

    def generate(self, request):
        validate_request(request)
        latents = self.denoise(self.encode_text(request.prompt, request.frames), self.noise(request), request)
        return decode(self.vae, latents, "cpu")


def pipeline(root):
    return Pipeline(root)


@pytest.fixture(scope="module")
def official_pipeline(tiny_official):
    return pipeline(tiny_official)


@pytest.mark.slow
def test_frames_shape_dtype_and_determinism(official_pipeline):
    first = official_pipeline.generate(REQUEST)
    assert first.shape == (9, 48, 64, 3) and first.dtype == torch.uint8
    assert first.float().std() > 0  # not a constant image
    assert torch.equal(first, official_pipeline.generate(REQUEST))  # same seed, same frames
    other = GenerationRequest(**{**REQUEST.__dict__, "seed": 8})
    assert not torch.equal(first, official_pipeline.generate(other))


@pytest.mark.slow
def test_layouts_give_identical_frames(official_pipeline, tiny_diffusers):
    assert torch.equal(official_pipeline.generate(REQUEST), pipeline(tiny_diffusers).generate(REQUEST))


def test_resume_from_a_saved_step_is_bit_exact(official_pipeline):
    """Denoising is a pure function of (latents, step): stopping after step 0 and continuing from
    the saved latents gives the same result as an uninterrupted run."""
    request = GenerationRequest(**{**REQUEST.__dict__, "steps": 3})
    emb = official_pipeline.encode_text(request.prompt, request.frames)
    noise = official_pipeline.noise(request)
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
