"""HunyuanVideo-1.5 sampling after text encoding: the DiT's conditioning input and the Euler loop
with real classifier-free guidance.

The DiT sees [noisy latents ; condition latents ; condition mask] on the channel axis. Text-to-video:
both conditions are zero. Image-to-video: the first latent frame of the condition holds the image's
scaled VAE latents and the mask is 1 there, and the SigLIP states of the image join the text stream.

Real CFG (the base checkpoints, guidance 6): two DiT forwards per step, conditional then
unconditional, each at batch 1 (one after the other, so only one forward's activations live at a
time); velocity = uncond + g * (cond - uncond). CFG-distilled and step-distilled checkpoints run one
forward (g = 1). MeanFlow checkpoints (`use_meanflow`, officially the super-resolution ones) also
get the step's end as `timestep_r` (sigma_{i+1} * 1000, 0 at the last step). The schedule and the Euler step are the 13B model's (`sampler.py`); a step is a pure
function of (latents, step index), so runs resume exactly.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .sampler import euler_step, flow_sigmas, flow_timesteps, predicted_clean


@dataclass
class V15Prompt:
    """One prompt's encoder outputs at batch 1 (masks: 1 = valid token)."""

    text_states: torch.Tensor  # [1, L, 3584] Qwen2.5-VL hidden states (template cropped)
    text_mask: torch.Tensor  # [1, L]
    byt5_states: torch.Tensor  # [1, Lb, 1472] byT5 glyph states
    byt5_mask: torch.Tensor  # [1, Lb]

    def to(self, device, dtype) -> "V15Prompt":
        return V15Prompt(self.text_states.to(device, dtype), self.text_mask.to(device),
                         self.byt5_states.to(device, dtype), self.byt5_mask.to(device))


@dataclass
class V15Image:
    """Image-to-video conditioning."""

    latents: torch.Tensor  # [1, C, 1, h, w] VAE latents of the first frame, times scaling_factor
    vision_states: torch.Tensor  # [1, 729, 1152] SigLIP last hidden states


def forwards_per_step(guidance_scale: float) -> int:
    """DiT forwards a step runs: 2 under real CFG, 1 for the distilled transformers (guidance 1)."""
    return 1 if guidance_scale == 1.0 else 2


def condition_channels(latents: torch.Tensor, image: V15Image | None) -> torch.Tensor:
    """[B, C + 1, T, h, w]: condition latents and mask for noisy latents [B, C, T, h, w]."""
    batch, channels, frames, height, width = latents.shape
    condition = latents.new_zeros(batch, channels + 1, frames, height, width)
    if image is not None:
        condition[:, :channels, :1] = image.latents.to(condition.dtype)
        condition[:, channels, 0] = 1.0
    return condition


@torch.inference_mode()
def denoise(
    dit, prompt: V15Prompt, negative: V15Prompt | None, latents: torch.Tensor, steps: int, flow_shift: float,
    guidance_scale: float, device, image: V15Image | None = None, start_step: int = 0,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    blocks_for_forward: Callable[[int], Iterable[torch.nn.Module]] | None = None,
    on_prediction: Callable[[int, torch.Tensor], None] | None = None,
    step_cache=None, last_block: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Euler steps start_step..steps-1 from float32 `latents` [1, C, T, h, w]; on_step(i, latents)
    after each. blocks_for_forward(i): the DiT's blocks for one forward of step i (called once per
    forward: twice per step under real CFG); None: its own. on_prediction(i, clean): step i's
    prediction of the clean latents (a live preview), before on_step. step_cache: a DeepCache
    (hyvideo/v15_step_cache.py), with `last_block`, the last double block where it runs."""
    cfg = forwards_per_step(guidance_scale) == 2
    if cfg and negative is None:
        raise ValueError("real CFG (guidance_scale != 1) needs the negative prompt's embeddings")
    dtype = dit.compute_dtype
    sigmas = flow_sigmas(steps, flow_shift).to(device)
    timesteps = flow_timesteps(sigmas)
    prompts = [prompt.to(device, dtype)] + ([negative.to(device, dtype)] if cfg else [])
    vision = None if image is None else image.vision_states.to(device, dtype)
    latents = latents.to(device, torch.float32)
    condition = condition_channels(latents, image).to(dtype)
    for i in range(start_step, steps):
        x = torch.cat([latents.to(dtype), condition], dim=1)
        timestep_r = sigmas[i + 1 : i + 2] * 1000.0 if dit.config.use_meanflow else None
        velocities = []
        for forward, p in enumerate(prompts):
            def blocks() -> Iterable[torch.nn.Module] | None:
                return blocks_for_forward(i) if blocks_for_forward is not None else None

            if step_cache is None:
                velocity = dit(x, timesteps[i : i + 1], p.text_states, p.text_mask, p.byt5_states, p.byt5_mask, vision,
                               timestep_r, blocks=blocks())
            else:
                velocity = step_cache.forward(dit, i, forward, x, timesteps[i : i + 1], p, vision, timestep_r, blocks,
                                              last_block if last_block is not None else dit.double_blocks[-1])
            velocities.append(velocity.float())
        velocity = velocities[0] if not cfg else velocities[1] + guidance_scale * (velocities[0] - velocities[1])
        if on_prediction is not None:
            on_prediction(i, predicted_clean(latents, velocity, sigmas[i]))
        latents = euler_step(latents, velocity, sigmas, i)
        if on_step is not None:
            on_step(i, latents)
    return latents
