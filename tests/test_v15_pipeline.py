"""HunyuanVideo-1.5 denoising loop (real CFG, two batch-1 forwards per step) against diffusers'
HunyuanVideo15Pipeline on tiny random weights, given the same text embeddings."""

import pytest
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)

from hyvideo.v15_config import V15_DIT_CONFIGS, V15_VAE_CONFIGS
from hyvideo.v15_dit import HunyuanVideo15DiT
from hyvideo.v15_keys import ours_to_diffusers
from hyvideo.v15_pipeline import V15Prompt, denoise
from tests.random_weights import randomize_

TINY = V15_DIT_CONFIGS["tiny"]
# float32. Observed 7.9e-6 (guidance 6) and 1.9e-6 (guidance 1): CFG multiplies per-forward
# differences (~3e-7) by up to 2g - 1 = 11, and diffusers computes the shifted schedule in float32
# (timestep 714.2856 where ours, from float64, rounds to 714.2857); with diffusers' exact sigmas the
# guidance-6 case is 1.2e-6. A wrong guidance formula or schedule shows at 1e-2 or more (0.35 when
# guidance is skipped).
TOL = 1e-5


def make_prompt(seed: int, valid: int, byt5_valid: int) -> V15Prompt:
    gen = torch.Generator().manual_seed(seed)
    text_mask, byt5_mask = torch.zeros(1, 12, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)
    text_mask[0, :valid], byt5_mask[0, :byt5_valid] = 1, 1
    return V15Prompt(torch.randn(1, 12, TINY.text_states_dim, generator=gen), text_mask,
                     torch.randn(1, 6, TINY.byt5_states_dim, generator=gen), byt5_mask)


@pytest.mark.parametrize("guidance_scale,shift", [(6.0, 5.0), (1.0, 9.0)])
def test_t2v_denoise_matches_diffusers_pipeline(guidance_scale, shift):
    dit = HunyuanVideo15DiT(TINY).eval()
    randomize_(dit, seed=2)
    transformer = HunyuanVideo15Transformer3DModel(**TINY.to_diffusers()).eval()
    transformer.load_state_dict(ours_to_diffusers(dit.state_dict()), strict=True)
    vae = AutoencoderKLHunyuanVideo15(**V15_VAE_CONFIGS["tiny"].to_diffusers())  # unused: output_type="latent"
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )
    positive, negative = make_prompt(1, valid=9, byt5_valid=4), make_prompt(2, valid=5, byt5_valid=0)
    noise = torch.randn(1, TINY.latent_channels, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    ours = denoise(dit, positive, negative, noise, steps=3, flow_shift=shift, guidance_scale=guidance_scale, device="cpu")
    with torch.no_grad():
        expected = pipe(
            prompt_embeds=positive.text_states, prompt_embeds_mask=positive.text_mask,
            prompt_embeds_2=positive.byt5_states, prompt_embeds_mask_2=positive.byt5_mask,
            negative_prompt_embeds=negative.text_states, negative_prompt_embeds_mask=negative.text_mask,
            negative_prompt_embeds_2=negative.byt5_states, negative_prompt_embeds_mask_2=negative.byt5_mask,
            height=64, width=96, num_frames=9, num_inference_steps=3, latents=noise.clone(), output_type="latent",
            return_dict=False,
        )[0]
    assert ((ours - expected).abs().max() / expected.abs().max()).item() <= TOL
