"""The text-to-video steps after text encoding: Euler denoising of seeded noise, then VAE decode to
uint8 frames [F, H, W, 3].

Plain functions of tensors and modules on one device: lowvram/ runs them per stage, with the DiT's
blocks coming from its streamer (`blocks_for_step`) and the VAE decoded in tiles (`vae_decode`),
checkpointing after each step so a run resumes (`denoise(start_step=k)`).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .errors import HyVideoError
from .sampler import embedded_guidance, euler_step, flow_sigmas, flow_timesteps, predicted_clean
from .step_cache import TeaCache
from .text_encoder import TextEmbeddings
from .vae import CausalVAE

MAX_PIXELS = 1280 * 1280  # beyond the official buckets by a margin; larger is almost surely a typo
TRAINED_FRAMES = 129  # the longest clip HunyuanVideo was trained on (33 latent frames)
MAX_FRAMES = 261  # twice as long (66 latent frames): what RIFLEx is shown to reach for HunyuanVideo
RIFLEX_CHOICES = {"auto": None, "on": True, "off": False}  # --riflex; auto: on above TRAINED_FRAMES


@dataclass
class GenerationRequest:
    prompt: str
    width: int = 1280
    height: int = 720
    frames: int = 129
    steps: int = 50
    seed: int = 0
    guidance: float = 6.0  # embedded (distilled) guidance scale
    flow_shift: float = 7.0
    riflex: bool | None = None  # RIFLEx (hyvideo/rope.py); None: on above TRAINED_FRAMES (`uses_riflex`)


def uses_riflex(request: GenerationRequest) -> bool:
    """Whether the DiT's temporal RoPE gets RIFLEx: as asked, else only for clips longer than the
    model was trained on (at or below 129 frames nothing changes)."""
    return request.frames > TRAINED_FRAMES if request.riflex is None else request.riflex


def riflex_choice(text: str) -> bool | None:
    """--riflex auto | on | off (a batch line's "riflex" too) -> the request's field."""
    if text not in RIFLEX_CHOICES:
        raise HyVideoError(f"--riflex must be one of {', '.join(RIFLEX_CHOICES)}; got {text!r}")
    return RIFLEX_CHOICES[text]


def validate_request(request: GenerationRequest) -> None:
    """Reject impossible settings before any model is loaded, with a message saying what to do."""
    if not request.prompt or not request.prompt.strip():
        raise HyVideoError("the prompt is empty: give a prompt text or --prompt-file")
    if request.frames < 1 or (request.frames - 1) % 4:
        lower = max(1, (request.frames - 1) // 4 * 4 + 1)
        raise HyVideoError(f"--frames must be 4k+1 (1, 5, ..., {MAX_FRAMES}); got {request.frames}, try {lower} or {lower + 4}")
    if request.frames > MAX_FRAMES:
        raise HyVideoError(f"--frames {request.frames} is more than {MAX_FRAMES}, the longest clip RIFLEx extends "
                           f"HunyuanVideo to (twice its {TRAINED_FRAMES} trained frames); use at most {MAX_FRAMES}")
    for name, value in (("width", request.width), ("height", request.height)):
        if value < 16 or value % 16:
            fixed = max(16, -(-value // 16) * 16)
            raise HyVideoError(f"{name} must be a positive multiple of 16; got {value}, try {fixed}")
    if request.width * request.height > MAX_PIXELS:
        raise HyVideoError(f"{request.width}x{request.height} is larger than any HunyuanVideo bucket (720p max: 1280x720)")
    if request.steps < 1:
        raise HyVideoError(f"--steps must be at least 1; got {request.steps}")
    if request.flow_shift <= 0:
        raise HyVideoError(f"--flow-shift must be positive; got {request.flow_shift}")


def latents_to_frames(video: torch.Tensor) -> torch.Tensor:
    """VAE output [1, 3, F, H, W] in about [-1, 1] -> uint8 [F, H, W, 3] (clamp(x/2 + 0.5), x255,
    truncating cast, as the official saver)."""
    pixels = (video[0].float() / 2 + 0.5).clamp(0, 1)
    return (pixels * 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()


@torch.inference_mode()
def denoise(
    dit, embeddings: TextEmbeddings, latents: torch.Tensor, request: GenerationRequest, device,
    start_step: int = 0, on_step: Callable[[int, torch.Tensor], None] | None = None,
    blocks_for_step: Callable[[int], Iterable[torch.nn.Module]] | None = None, step_cache: TeaCache | None = None,
    on_prediction: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Euler steps start_step..steps-1 from float32 `latents`; on_step(i, latents) after each.
    blocks_for_step(i): the DiT's blocks for step i (streamed ones just in time); None: its own.
    step_cache: decides per step whether the blocks run (and asks blocks_for_step only then).
    on_prediction(i, clean): step i's prediction of the clean latents (a live preview), before on_step."""
    sigmas = flow_sigmas(request.steps, request.flow_shift).to(device)
    timesteps = flow_timesteps(sigmas)
    dtype = dit.compute_dtype
    guidance = embedded_guidance(request.guidance, 1, dtype, device)
    text_states = embeddings.text_states.to(device, dtype)
    text_mask = embeddings.text_mask.to(device)
    text_states_2 = embeddings.text_states_2.to(device, dtype)
    latents = latents.to(device, torch.float32)
    riflex = uses_riflex(request)
    for i in range(start_step, request.steps):
        if step_cache is not None:
            velocity = step_cache.forward(dit, i, latents, timesteps, text_states, text_mask, text_states_2, guidance,
                                          blocks_for_step, riflex)
        else:
            blocks = blocks_for_step(i) if blocks_for_step is not None else None
            velocity = dit(latents, timesteps[i : i + 1], text_states, text_mask, text_states_2, guidance, blocks=blocks,
                           riflex=riflex)
        if on_prediction is not None:
            on_prediction(i, predicted_clean(latents, velocity, sigmas[i]))
        latents = euler_step(latents, velocity, sigmas, i)
        if on_step is not None:
            on_step(i, latents)
    return latents


@torch.inference_mode()
def decode(vae: CausalVAE, latents: torch.Tensor, device, vae_decode: Callable | None = None) -> torch.Tensor:
    """Scaled latents -> uint8 frames [F, H, W, 3]. `vae_decode` replaces `vae.decode` on the
    unscaled latents (lowvram/ passes its tiled decoder)."""
    vae_dtype = next(vae.parameters()).dtype
    z = (latents / vae.config.scaling_factor).to(device, vae_dtype)
    return latents_to_frames((vae_decode or vae.decode)(z))
