"""HunyuanVideo-1.5 denoising loop (real CFG, two batch-1 forwards per step) against diffusers'
HunyuanVideo15Pipeline and HunyuanVideo15ImageToVideoPipeline on tiny random weights, given the
same text embeddings (and image latents / SigLIP states)."""

import numpy as np
import PIL.Image
import pytest
import torch
pytest.importorskip("diffusers")  # the oracle: `pytest -m cuda` collects without it (tests/test_cuda_collection.py)
from diffusers import (
    AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel,
)

from hyvideo.sampler import flow_sigmas, flow_timesteps
from hyvideo.v15_config import V15_DIT_CONFIGS, V15_VAE_CONFIGS
from hyvideo.v15_dit import HunyuanVideo15DiT
from hyvideo.v15_keys import ours_to_diffusers
from hyvideo.v15_pipeline import V15Image, V15Prompt, denoise
from tests.helpers import make_v15_prompt as make_prompt
from tests.helpers import randomize_

TINY = V15_DIT_CONFIGS["tiny"]
# float32: CFG multiplies per-forward differences (~3e-7) by up to 2g - 1 = 11 over 3 steps; observed
# 1.1e-6 (T2V, g 6), 2.0e-7 (T2V, g 1), 1.8e-6 (I2V, g 6). A wrong guidance formula or condition layout shows at 1e-2 or more (0.35 when guidance is
# skipped). The loops get the same schedule (see test_schedule_matches_diffusers for why).
TOL = 1e-5


def same_schedule(steps: int, shift: float) -> dict:
    """diffusers shifts its sigmas in float32, ours in float64 (a timestep can differ by one float32
    ulp, 6e-5 at t = 714, which random tiny weights amplify to ~1e-5): hand diffusers our shifted
    sigmas with shift 1 so both loops see identical timesteps."""
    return {"sigmas": flow_sigmas(steps, shift)[:-1].tolist()}


@pytest.mark.parametrize("shift", [5.0, 7.0, 9.0])
def test_schedule_matches_diffusers(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 51)[:-1])  # as HunyuanVideo15Pipeline does
    ours = flow_sigmas(50, shift)
    assert (scheduler.sigmas - ours).abs().max() <= 2.4e-7  # float32 rounding of sigma <= 1 (2 ulp)
    assert ((scheduler.timesteps - flow_timesteps(ours)).abs() / flow_timesteps(ours)).max() <= 2.4e-7


def pipeline_latents(pipe, positive: V15Prompt, negative: V15Prompt, noise: torch.Tensor, steps: int, shift: float,
                     **inputs) -> torch.Tensor:
    """diffusers' 1.5 pipeline from the given embeddings (ours), 9 frames from `noise`, our schedule."""
    with torch.no_grad():
        return pipe(
            prompt_embeds=positive.text_states, prompt_embeds_mask=positive.text_mask,
            prompt_embeds_2=positive.byt5_states, prompt_embeds_mask_2=positive.byt5_mask,
            negative_prompt_embeds=negative.text_states, negative_prompt_embeds_mask=negative.text_mask,
            negative_prompt_embeds_2=negative.byt5_states, negative_prompt_embeds_mask_2=negative.byt5_mask,
            num_frames=9, num_inference_steps=steps, latents=noise.clone(), output_type="latent", return_dict=False,
            **same_schedule(steps, shift), **inputs,
        )[0]


@pytest.mark.slow  # 7-17 s on a loaded 2-core machine (diffusers' pipeline machinery)
@pytest.mark.parametrize("guidance_scale,shift", [(6.0, 5.0), (1.0, 9.0)])
def test_t2v_denoise_matches_diffusers_pipeline(guidance_scale, shift):
    dit = HunyuanVideo15DiT(TINY).eval()
    randomize_(dit, seed=2)
    transformer = HunyuanVideo15Transformer3DModel(**TINY.to_diffusers()).eval()
    transformer.load_state_dict(ours_to_diffusers(dit.state_dict()), strict=True)
    vae = AutoencoderKLHunyuanVideo15(**V15_VAE_CONFIGS["tiny"].to_diffusers())  # unused: output_type="latent"
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )
    positive, negative = make_prompt(1, valid=9, byt5_valid=4), make_prompt(2, valid=5, byt5_valid=0)
    noise = torch.randn(1, TINY.latent_channels, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    ours = denoise(dit, positive, negative, noise, steps=3, flow_shift=shift, guidance_scale=guidance_scale, device="cpu")
    expected = pipeline_latents(pipe, positive, negative, noise, 3, shift, height=64, width=96)
    assert ((ours - expected).abs().max() / expected.abs().max()).item() <= TOL


@pytest.mark.slow
def test_i2v_denoise_matches_diffusers_pipeline():
    """Image-to-video: the image's latents and SigLIP states (given, as the text embeddings are)."""
    dit = HunyuanVideo15DiT(TINY).eval()
    randomize_(dit, seed=4)
    transformer = HunyuanVideo15Transformer3DModel(**TINY.to_diffusers(), target_size=64).eval()
    transformer.load_state_dict(ours_to_diffusers(dit.state_dict()), strict=True)
    pipe = HunyuanVideo15ImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer,
        vae=AutoencoderKLHunyuanVideo15(**V15_VAE_CONFIGS["tiny"].to_diffusers()),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=6.0), image_encoder=None, feature_extractor=None,
    )
    gen = torch.Generator().manual_seed(5)
    image = V15Image(torch.randn(1, TINY.latent_channels, 1, 4, 4, generator=gen),
                     torch.randn(1, 9, TINY.vision_states_dim, generator=gen))
    # diffusers computes both from a PIL image with its encoders; hand it ours instead.
    pipe._get_image_latents = lambda **kwargs: image.latents
    pipe.encode_image = lambda batch_size, **kwargs: image.vision_states.repeat(batch_size, 1, 1)
    positive, negative = make_prompt(6, valid=10, byt5_valid=3), make_prompt(7, valid=4, byt5_valid=0)
    noise = torch.randn(1, TINY.latent_channels, 3, 4, 4, generator=gen)
    ours = denoise(dit, positive, negative, noise, steps=3, flow_shift=7.0, guidance_scale=6.0, device="cpu", image=image)
    expected = pipeline_latents(pipe, positive, negative, noise, 3, 7.0, image=PIL.Image.new("RGB", (64, 64)))
    assert ((ours - expected).abs().max() / expected.abs().max()).item() <= TOL
