"""3D rotary position embedding for image tokens (facts §1.6), and RIFLEx for clips longer than
the model was trained on.

Pure functions: the frequency table depends only on the latent grid, so it is built once per
forward and shared by every block. Text tokens never get RoPE.

RIFLEx (Zhao et al., "RIFLEx: A Free Lunch for Length Extrapolation in Video Diffusion
Transformers", arXiv 2502.15894; reference code thu-ml/RIFLEx `riflex_utils.py`): past the trained
length a video DiT repeats itself because one temporal RoPE component, the "intrinsic frequency",
completes a period within the clip. That component k is the one whose period N_j = round(2 pi /
f_j) is closest to the latent frame N at which repetition is first seen (paper Eq. 7; for
HunyuanVideo N = 48, giving k = 4, period 50 latent frames, with theta 256 and 16 temporal
dimensions). RIFLEx sets it to f_k = 0.9 * 2 pi / L' for a clip of L' latent frames (Eq. 8 with
the reference code's 0.9: the clip spans 90 % of one period) and leaves every other frequency as it
was.
"""

import math

import torch

# The latent frame at which HunyuanVideo's clips are seen to repeat (RIFLEx `identify_k` docstring:
# "the repetition occurs approximately 8s (N=48 in latent space)").
REPETITION_LATENT_FRAMES = 48
RIFLEX_PERIOD_FRACTION = 0.9  # the clip covers 90 % of the lowered component's period (reference code)


def axis_frequencies(dim: int, theta: float, device=None) -> torch.Tensor:
    """The dim/2 frequencies 1/theta^(2j/dim), j = 0..dim/2-1, of one RoPE axis, float32."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32)[: dim // 2] / dim)


def intrinsic_index(dim: int, theta: float, repetition_frames: int = REPETITION_LATENT_FRAMES) -> int:
    """RIFLEx's k (1-based, as the paper counts): the temporal component whose period, rounded to
    whole latent frames, is closest to where repetition is seen (the first such on a tie)."""
    periods = [round(2 * math.pi * theta ** (2 * j / dim)) for j in range(dim // 2)]
    distances = [abs(period - repetition_frames) for period in periods]
    return distances.index(min(distances)) + 1


def riflex_frequencies(dim: int, theta: float, latent_frames: int, device=None) -> torch.Tensor:
    """The temporal axis's frequencies with RIFLEx for a clip of `latent_frames`: component k
    lowered to 0.9 * 2 pi / latent_frames, the others unchanged. Never raised: a clip that one
    period already covers (HunyuanVideo: up to 45 latent frames, 177 frames) keeps the trained
    frequency, since RIFLEx exists to lower it (the reference code applies the formula to any
    length, where it raises the frequency for clips under 90 % of a period)."""
    freqs = axis_frequencies(dim, theta, device)
    k = intrinsic_index(dim, theta) - 1
    freqs[k] = min(float(freqs[k]), RIFLEX_PERIOD_FRACTION * 2 * math.pi / latent_frames)
    return freqs


def rope_frequencies(
    grid: tuple[int, int, int], axes_dim: tuple[int, int, int], theta: float = 256.0, device=None, riflex: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for a (t, y, x) token grid, each [N, sum(axes_dim)] in float32.

    Tokens are ordered t slowest, x fastest (the patch-embed flatten order). Along each axis of
    dim d there are d/2 frequencies 1/theta^(2k/d); every frequency fills two adjacent channels.
    riflex: the temporal axis's intrinsic component lowered for a clip of grid[0] latent frames.
    """
    positions = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij")
    cos_parts, sin_parts = [], []
    for axis, (pos, dim) in enumerate(zip(positions, axes_dim)):
        if axis == 0 and riflex:
            freqs = riflex_frequencies(dim, theta, grid[0], device)
        else:
            freqs = axis_frequencies(dim, theta, device)
        angles = pos.reshape(-1, 1) * freqs  # [N, d/2]
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos_parts, dim=1), torch.cat(sin_parts, dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x_2i, x_2i+1) of x [B, N, H, D] by the [N, D] tables.

    out_2i = x_2i cos - x_2i+1 sin; out_2i+1 = x_2i+1 cos + x_2i sin, computed in float32.
    """
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))  # [B, N, H, D/2, 2]
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # [B, N, H, D]
    out = xf * cos[:, None, :] + rotated * sin[:, None, :]
    return out.to(x.dtype)
