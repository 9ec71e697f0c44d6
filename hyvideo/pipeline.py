"""The steps after text encoding: Euler denoising of seeded noise, then VAE decode to uint8 frames
[F, H, W, 3]; for image-to-video also the image's encoding and how each step takes it.

Plain functions of tensors and modules on one device: lowvram/ runs them per stage, with the DiT's
blocks coming from its streamer (`blocks_for_step`) and the VAE decoded in tiles (`vae_decode`),
checkpointing after each step so a run resumes (`denoise(start_step=k)`).

Image-to-video (HunyuanVideo-I2V, official `pipeline_hunyuan_video.py` with `i2v_mode`; diffusers'
HunyuanVideoImageToVideoPipeline): the bucket-cropped image is VAE-encoded to one scaled latent
frame (`encode_image`), and the same loop runs with an `ImageCondition`:
  token_replace: every step the first latent frame is the clean image latent (the DiT modulates its
    tokens from t = 0) and the Euler step moves only the later frames;
  latent_concat: the DiT reads noisy latents | image latent on frame 0, zeros after | mask (1 on
    frame 0), and all frames step; the decoded video's first 4 frames are dropped (official).
Guidance is as the official sampler runs each release: embedded guidance (6.0) for token_replace,
none for latent_concat (no guidance_in); real classifier-free guidance is off in both (cfg-scale 1).
Stability mode (`--i2v-stability`, with flow shift 7; off in the official "dynamic" default, shift
17; always on in diffusers) starts from 0.999 noise + 0.001 image latent (`image_initial_latents`).
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
STABILITY_NOISE = 0.999  # official i2v_stability: the initial latents keep 0.1% of the image latent
LATENT_CONCAT_DROPPED_FRAMES = 4  # official: the decoded latent_concat video starts after 4 frames
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


@dataclass
class ImageCondition:
    """An image-to-video DiT's image: its scaled latent and how the DiT takes it (module docstring)."""

    kind: str  # the DiT config's image_condition_type: "token_replace" | "latent_concat"
    latent: torch.Tensor  # [B, C, 1, h, w] float32: VAE posterior mean x scaling factor

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """What the DiT reads for float32 latents [B, C, T, h, w]."""
        image = self.latent.to(latents.device)
        if self.kind == "token_replace":
            return torch.cat([image, latents[:, :, 1:]], dim=2)  # the first frame is the clean image
        frames = latents.shape[2]
        first_frame_only = torch.zeros(frames, device=latents.device, dtype=latents.dtype)
        first_frame_only[0] = 1
        condition = image * first_frame_only[:, None, None]  # [B, C, T, h, w]: the image latent, then zeros
        mask = first_frame_only[:, None, None].expand(latents.shape[0], 1, frames, *latents.shape[3:])
        return torch.cat([latents, condition, mask], dim=1)  # [B, 2C + 1, T, h, w]

    def step(self, latents: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, index: int) -> torch.Tensor:
        """The Euler step; under token_replace only the frames after the first move."""
        if self.kind == "token_replace":
            later = euler_step(latents[:, :, 1:], velocity[:, :, 1:], sigmas, index)
            return torch.cat([self.latent.to(latents.device), later], dim=2)
        return euler_step(latents, velocity, sigmas, index)


@torch.inference_mode()
def encode_image(vae: CausalVAE, pixels: torch.Tensor, device, vae_encode: Callable | None = None) -> torch.Tensor:
    """One frame [B, 3, 1, H, W] in [-1, 1] -> scaled latent [B, C, 1, H/8, W/8] float32 (the
    posterior mean x scaling factor, as both official and diffusers). `vae_encode` replaces
    `vae.encode` (lowvram/ passes a tiled encoder)."""
    vae_dtype = next(vae.parameters()).dtype
    mean = (vae_encode or vae.encode)(pixels.to(device, vae_dtype))
    return mean.float() * vae.config.scaling_factor


def image_initial_latents(noise: torch.Tensor, image: ImageCondition, stability: bool) -> torch.Tensor:
    """The initial latents of an I2V run from float32 noise [B, C, T, h, w]: with stability mode
    0.999 noise + 0.001 image latent (on every frame), else the noise itself."""
    if not stability:
        return noise
    keep = torch.tensor([STABILITY_NOISE], device=noise.device)  # float32, as both implementations
    return noise * keep + image.latent.to(noise.device) * (1 - keep)


@torch.inference_mode()
def denoise(
    dit, embeddings: TextEmbeddings, latents: torch.Tensor, request: GenerationRequest, device,
    start_step: int = 0, on_step: Callable[[int, torch.Tensor], None] | None = None,
    blocks_for_step: Callable[[int], Iterable[torch.nn.Module]] | None = None, step_cache: TeaCache | None = None,
    image: ImageCondition | None = None, on_prediction: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Euler steps start_step..steps-1 from float32 `latents`; on_step(i, latents) after each.
    blocks_for_step(i): the DiT's blocks for step i (streamed ones just in time); None: its own.
    step_cache: decides per step whether the blocks run (and asks blocks_for_step only then).
    image: the conditioning image of an I2V DiT (None for text-to-video).
    on_prediction(i, clean): step i's prediction of the clean latents (a live preview), before on_step."""
    if (image is None) != (dit.config.image_condition_type is None) or (image and image.kind != dit.config.image_condition_type):
        raise ValueError(f"a {dit.config.image_condition_type or 'text-to-video'} DiT got "
                         f"{'no image' if image is None else 'a ' + image.kind + ' image'}")
    if image is not None and step_cache is not None:
        raise ValueError("the step cache's coefficients were fit on the text-to-video DiT; run I2V without it")
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
            model_input = latents if image is None else image.model_input(latents)
            velocity = dit(model_input, timesteps[i : i + 1], text_states, text_mask, text_states_2, guidance, blocks=blocks,
                           riflex=riflex)
        if on_prediction is not None:
            on_prediction(i, predicted_clean(latents, velocity, sigmas[i]))
        latents = euler_step(latents, velocity, sigmas, i) if image is None else image.step(latents, velocity, sigmas, i)
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
