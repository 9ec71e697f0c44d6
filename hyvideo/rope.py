"""3D rotary position embedding for image tokens (facts §1.6).

Pure functions: the frequency table depends only on the latent grid, so it is built once per
forward and shared by every block. Text tokens never get RoPE.
"""

import torch


def rope_frequencies(
    grid: tuple[int, int, int], axes_dim: tuple[int, int, int], theta: float = 256.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for a (t, y, x) token grid, each [N, sum(axes_dim)] in float32.

    Tokens are ordered t slowest, x fastest (the patch-embed flatten order). Along each axis of
    dim d there are d/2 frequencies 1/theta^(2k/d); every frequency fills two adjacent channels.
    """
    positions = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij")
    cos_parts, sin_parts = [], []
    for pos, dim in zip(positions, axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32)[: dim // 2] / dim)
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
