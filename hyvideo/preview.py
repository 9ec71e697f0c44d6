"""A rough picture of latents without the VAE: each latent pixel's 16 channels projected linearly to
RGB, for a live preview of a run (lowvram/generation/preview.py writes it) at a few multiply-adds
per latent pixel, against the VAE decoder's minutes.

The projection's numbers are the published HunyuanVideo latent-to-RGB factors of ComfyUI
(comfyanonymous/ComfyUI, `comfy/latent_formats.py`, class `HunyuanVideo`: `latent_rgb_factors`
[16][3] and `latent_rgb_factors_bias` [3]; ComfyUI's `latent_preview.py` applies them as
rgb = x0 . factors + bias, then maps [-1, 1] to [0, 255]). They act on the latents the DiT
denoises, i.e. the VAE's latents times its scaling factor 0.476986 (ComfyUI's `scale_factor` for
this format), which are ours between steps (hyvideo/pipeline.py divides by it only to decode).
A fit, not the decoder: colours and layout are right roughly, detail is not.

HunyuanVideo-1.5's VAE (32 channels, 16x) has no published factors, so `fit_latent_rgb` makes them
the same way such factors are made, from the VAE itself: the least-squares linear map from each
latent pixel to the mean colour of the pixels it encodes, over images of random flat-colour blocks
(one block per latent pixel), run through the VAE's encoder once per VAE (lowvram/ keeps the result).
"""

import torch

# rows: the 16 latent channels; columns: R, G, B (ComfyUI latent_formats.HunyuanVideo)
HUNYUAN_LATENT_RGB_FACTORS = (
    (-0.0395, -0.0331, 0.0445),
    (0.0696, 0.0795, 0.0518),
    (0.0135, -0.0945, -0.0282),
    (0.0108, -0.0250, -0.0765),
    (-0.0209, 0.0032, 0.0224),
    (-0.0804, -0.0254, -0.0639),
    (-0.0991, 0.0271, -0.0669),
    (-0.0646, -0.0422, -0.0400),
    (-0.0696, -0.0595, -0.0894),
    (-0.0799, -0.0208, -0.0375),
    (0.1166, 0.1627, 0.0962),
    (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355),
    (-0.0270, 0.0401, -0.0821),
    (-0.0616, -0.0997, -0.0727),
    (0.0249, -0.0469, -0.1703),
)
HUNYUAN_LATENT_RGB_BIAS = (0.0259, -0.0192, -0.0761)


def latent_rgb(
    latents: torch.Tensor,  # [1, C, T, h, w] scaled latents (on any device)
    factors=HUNYUAN_LATENT_RGB_FACTORS,  # [C][3]
    bias=HUNYUAN_LATENT_RGB_BIAS,  # [3]
) -> torch.Tensor:
    """uint8 frames [T, h, w, 3] on the latents' device: rgb = sum_c x_c * factors[c] + bias in
    float32, then clamp((rgb + 1) / 2, 0, 1) * 255 cast by truncation (as the decoded frames are,
    hyvideo/pipeline.latents_to_frames). Only these few bytes need to leave the GPU."""
    channels, frames, height, width = latents.shape[1:]
    weight = torch.tensor(factors, dtype=torch.float32, device=latents.device)  # [C, 3]
    shift = torch.tensor(bias, dtype=torch.float32, device=latents.device)  # [3]
    rgb = weight.T @ latents[0].reshape(channels, -1).float() + shift[:, None]  # [3, T*h*w]
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)
    return pixels.reshape(3, frames, height, width).permute(1, 2, 3, 0).contiguous()  # channels last, in uint8: cheap


def fit_latent_rgb(
    encode,  # pixels [N, 3, 1, H, W] in [-1, 1] (float32, CPU) -> the DiT's scaled latents [N, C, 1, H/ratio, W/ratio]
    ratio: int,  # the VAE's spatial compression
    images: int = 24,
    blocks: int = 4,
    seed: int = 0,
) -> tuple[tuple, tuple]:
    """(factors [C][3], bias [3]) for `latent_rgb`: least squares over `images` images of `blocks` x
    `blocks` random colours, each colour filling the ratio x ratio pixels of one latent pixel
    (images * blocks^2 samples, 384 by default: well over the C + 1 unknowns per colour channel).
    Deterministic: the same VAE gives the same factors."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(images, 3, 1, blocks, blocks, generator=generator) * 2 - 1  # [N, 3, 1, b, b]
    pixels = colours.repeat_interleave(ratio, dim=-2).repeat_interleave(ratio, dim=-1)  # [N, 3, 1, b*ratio, b*ratio]
    latents = encode(pixels).float()  # [N, C, 1, b, b]
    samples = latents.permute(0, 2, 3, 4, 1).reshape(-1, latents.shape[1])  # [N*b*b, C]
    targets = colours.permute(0, 2, 3, 4, 1).reshape(-1, 3)  # [N*b*b, 3]
    design = torch.cat([samples, torch.ones(len(samples), 1)], dim=1).double()  # the last column fits the bias
    solution = torch.linalg.lstsq(design, targets.double(), driver="gelsd").solution  # [C + 1, 3]
    return tuple(tuple(row) for row in solution[:-1].float().tolist()), tuple(solution[-1].float().tolist())
