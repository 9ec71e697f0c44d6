"""Conditioning embedders of the DiT (facts §1.3, §1.5).

Each module's attribute names are the official checkpoint's (`mlp.0`, `in_layer`, `proj`, ...), so
official state dicts load without renaming.
"""

import math

import torch
import torch.nn as nn


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[B] float timesteps -> [B, dim] float32 features, cos half first (official order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoid(256) -> Linear -> SiLU -> Linear. Used for the timestep and the embedded guidance."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The sinusoid is computed in float32, then cast to the compute dtype (as official).
        return self.mlp(timestep_sinusoid(t, self.frequency_dim).to(dtype))


class MLPEmbedder(nn.Module):
    """CLIP pooled vector -> hidden (`vector_in`, from Flux): Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_size)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class PatchEmbed(nn.Module):
    """Latents [B, C, T, h, w] -> tokens [B, T*(h/2)*(w/2), hidden] in (t, y, x) order."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)
