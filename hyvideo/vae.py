"""HunyuanVideo's causal 3D VAE ("884-16c-hy", official `AutoencoderKLCausal3D`), facts §3.

Video [B, 3, F, H, W] in [-1, 1] with F = 4k + 1  <->  latents [B, 16, k + 1, H/8, W/8].

Every conv is causal in time (it only sees the current and earlier frames), so the first frame is
encoded on its own, like an image, and each later latent frame covers 4 video frames. Module and
attribute names follow the official checkpoint so its state dict loads with strict=True.

The decoder keeps no state between calls: `decode(z)` depends only on `z`, so a tiled decoder can
call it on any temporal or spatial piece of a latent video.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VAEConfig
from .errors import HyVideoError

NORM_EPS = 1e-6  # every GroupNorm in the official VAE


# ---------------------------------------------------------------------------------------------
# Pure helpers: shapes, per-level resampling factors, attention mask


def latent_shape(frames: int, height: int, width: int, config: VAEConfig) -> tuple[int, int, int, int]:
    """(C, T', h, w) of the latents for a video of this size, e.g. 129x720x1280 -> (16, 33, 90, 160)."""
    t, s = config.time_compression_ratio, config.spatial_compression_ratio
    if frames < 1 or (frames - 1) % t:
        raise HyVideoError(f"frame count {frames} must be {t}k+1 (e.g. 1, {t + 1}, {2 * t + 1}, ...)")
    if height < 1 or width < 1 or height % s or width % s:
        raise HyVideoError(f"height and width ({height}x{width}) must be positive multiples of {s}")
    return config.latent_channels, (frames - 1) // t + 1, height // s, width // s


def level_factors(config: VAEConfig) -> list[tuple[int, int, int]]:
    """(t, h, w) resampling factor of each block level; (1, 1, 1) means the level has no resampler.

    Encoder down block i and decoder up block i use the same factor (official rule): space is halved
    in the first log2(spatial) levels, time in the log2(time) levels just before the last one.
    For 884: [(1,2,2), (2,2,2), (2,2,2), (1,1,1)].
    """
    levels = len(config.block_out_channels)
    n_space = int(math.log2(config.spatial_compression_ratio))
    n_time = int(math.log2(config.time_compression_ratio))
    factors = []
    for i in range(levels):
        last = i == levels - 1
        space = 2 if i < n_space else 1
        time = 2 if i >= levels - 1 - n_time and not last else 1
        factors.append((time, space, space))
    if (math.prod(f[0] for f in factors), math.prod(f[1] for f in factors)) != (
        config.time_compression_ratio, config.spatial_compression_ratio
    ):
        raise ValueError(f"{levels} block levels cannot give compression {config.time_compression_ratio}x"
                         f"/{config.spatial_compression_ratio}x with the official layout")
    return factors


# ---------------------------------------------------------------------------------------------
# Layers


class CausalConv3d(nn.Module):
    """Conv3d that never looks at future frames: replicate-pad k-1 frames in front, k//2 around H, W.

    The wrapped conv is the attribute `.conv` (official keys end in `.conv.weight`) and pads nothing.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int | tuple[int, int, int] = 1):
        super().__init__()
        k = kernel_size
        self.padding = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)  # (W left, W right, H top, H bottom, T front, T back)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        if any(self.padding):
            x = F.pad(x, self.padding, mode="replicate")
        return self.conv(x)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv -> GN -> SiLU -> conv, plus the input (through a 1x1x1 conv if widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, T, H, W] -> [B, C_out, T, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 in the official config
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample(nn.Module):
    """Strided causal conv. Stride 2 in time maps T -> (T-1)/2 + 1, so frame 0 stays alone."""

    def __init__(self, channels: int, stride: tuple[int, int, int]):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling, then a causal conv.

    Frame 0 is only upsampled in space; frames 1.. by the full factor, so T -> 1 + t * (T - 1),
    mirroring the encoder's T -> (T-1)/t + 1. bf16 is interpolated in fp32 (as the official code
    does; nearest in bf16 is unsupported or slow on some backends).
    """

    def __init__(self, channels: int, factor: tuple[int, int, int]):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        dtype = x.dtype
        if dtype == torch.bfloat16:
            x = x.float()
        first = F.interpolate(x[:, :, 0], scale_factor=self.factor[1:], mode="nearest")[:, :, None]
        if x.shape[2] > 1:
            # contiguous(): nearest interpolate of a non-contiguous 5D view has been wrong in some torch
            # versions (pytorch#81665)
            rest = F.interpolate(x[:, :, 1:].contiguous(), scale_factor=self.factor, mode="nearest")
            x = torch.cat([first, rest], dim=2)  # [B, C, 1 + t(T-1), sH, sW]
        else:
            x = first
        return self.conv(x.to(dtype))


class FrameCausalAttention(nn.Module):
    """Single-head self-attention over all (t, y, x) positions; frame f sees frames <= f.

    Pre-norm (`group_norm`) and a residual connection; names match diffusers' `Attention`.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key `to_out.0` (index 1 was dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        B, C, T, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, N, C], N = T*H*W with t slowest
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, N, C]
        # Frame-causal without an N x N mask (225 GB at 720p, 0.3 GB per decode tile): the queries of
        # frame f attend to the keys of frames 0..f, one frame at a time.
        per_frame = H * W
        h = torch.empty_like(q)
        for f in range(T):
            rows = slice(f * per_frame, (f + 1) * per_frame)
            h[:, :, rows] = F.scaled_dot_product_attention(q[:, :, rows], k[:, :, : rows.stop], v[:, :, : rows.stop])
        h = self.to_out[0](h.squeeze(1))  # [B, N, C]
        return x + h.transpose(1, 2).reshape(B, C, T, H, W)


class MidBlock(nn.Module):
    """resnet -> frame-causal attention -> resnet, at the deepest width."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([FrameCausalAttention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """Resnets at one width, then (except at the deepest level) a strided downsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int,
                 factor: tuple[int, int, int]):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if j == 0 else out_channels, out_channels, groups) for j in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels, factor)] if factor != (1, 1, 1) else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    """Resnets at one width, then (except at the last level) an upsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int,
                 factor: tuple[int, int, int]):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if j == 0 else out_channels, out_channels, groups) for j in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels, factor)] if factor != (1, 1, 1) else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# Encoder, decoder, VAE


class Encoder(nn.Module):
    """Video [B, 3, F, H, W] -> moments [B, 2*16, T', H/8, W/8] (mean and log-variance, before quant_conv)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = CausalConv3d(config.in_channels, widths[0], 3)
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block, groups, factor)
            for i, factor in enumerate(level_factors(config))
        )
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = CausalConv3d(widths[-1], 2 * config.latent_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # [B, 128, F, H, W]
        for block in self.down_blocks:
            x = block(x)  # ends at [B, 512, T', H/8, W/8]
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # [B, 32, T', H/8, W/8]


class Decoder(nn.Module):
    """Latents [B, 16, T', h, w] (after post_quant_conv) -> video [B, 3, 4(T'-1)+1, 8h, 8w]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups  # deepest first
        self.conv_in = CausalConv3d(config.latent_channels, widths[0], 3)
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block + 1, groups, factor)
            for i, factor in enumerate(level_factors(config))
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = CausalConv3d(widths[-1], config.out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # [B, 512, T', h, w]
        for block in self.up_blocks:
            x = block(x)  # ends at [B, 128, F, H, W]
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # [B, 3, F, H, W]


class CausalVAE(nn.Module):
    """The official AutoencoderKLCausal3D: encoder + quant_conv, post_quant_conv + decoder.

    Latents here are unscaled; the DiT works in `latents * config.scaling_factor` (no shift).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv3d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv3d(c, c, 1)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [-1, 1], F = 4k+1 -> posterior mean [B, 16, k+1, H/8, W/8] (unscaled)."""
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise HyVideoError(f"expected a video [B, {self.config.in_channels}, F, H, W], got {tuple(video.shape)}")
        latent_shape(*video.shape[2:], self.config)  # validates F, H, W
        moments = self.quant_conv(self.encoder(video))  # [B, 32, T', h, w]
        return moments[:, : self.config.latent_channels]  # mean; the log-variance half is unused

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, 16, T', h, w] -> video [B, 3, 4(T'-1)+1, 8h, 8w], nominally in [-1, 1]."""
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise HyVideoError(f"expected latents [B, {self.config.latent_channels}, T, h, w], got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))
