"""HunyuanVideo-1.5's causal 3D VAE (official `AutoencoderKLConv3D`, diffusers'
`AutoencoderKLHunyuanVideo15`).

Video [B, 3, F, H, W] in [-1, 1] with F = 4k + 1  <->  latents [B, 32, k + 1, H/16, W/16].

Unlike the 13B VAE it normalizes with a channel RMS norm (no groups), resamples by moving pixels
into channels (space-to-depth / depth-to-space, DC-AE style) with a parameter-free shortcut around
every resampler, and has no quant convs. Every conv is causal in time: the first frame is coded on
its own, each later latent frame covers 4 video frames. Module names are the official
checkpoint's (`v15_vae_keys` maps diffusers' names onto them).

Latents here are unscaled; the DiT works in `latents * config.scaling_factor` (no shift).

Tiling (for lowvram/tiled_vae.py): `decode(z)` and `encode(video)` keep no state between calls, so
any spatial or temporal piece can be coded alone. The receptive field is wide (3x3x3 convs at five
levels plus a full-frame attention in the middle block), so tiles need overlap and blending exactly
as for the 13B VAE; only the scales differ (16x space: a latent tile of L covers 16L px). A temporal
tile that does not start at frame 0 must start one latent frame early and drop its first decoded
frame (the causal first-frame rule), as for the 13B VAE. Officially: spatial tiles of 256 px with
overlap 0.125 (GPUs over 21 GB) or 128 px with overlap 0.25, float16.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import HyVideoError
from .v15_config import V15VAEConfig
from .vae import CausalConv3d


def latent_shape(frames: int, height: int, width: int, config: V15VAEConfig) -> tuple[int, int, int, int]:
    """(C, T', h, w) of the latents for a video of this size, e.g. 121x720x1280 -> (32, 31, 45, 80)."""
    t, s = config.time_compression_ratio, config.spatial_compression_ratio
    if (frames - 1) % t or height % s or width % s:
        raise HyVideoError(f"video size {frames}x{height}x{width} must be ({t}k+1) frames x multiples of {s} pixels")
    return config.latent_channels, (frames - 1) // t + 1, height // s, width // s


def space_to_depth(x: torch.Tensor, t: int) -> torch.Tensor:
    """[B, C, t*F, 2H, 2W] -> [B, t*2*2*C, F, H, W]; channel index = ((rt*2 + ry)*2 + rx)*C + c."""
    B, C, T, H, W = x.shape
    x = x.view(B, C, T // t, t, H // 2, 2, W // 2, 2).permute(0, 3, 5, 7, 1, 2, 4, 6)
    return x.reshape(B, t * 4 * C, T // t, H // 2, W // 2)


def depth_to_space(x: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of space_to_depth: [B, t*2*2*C, F, H, W] -> [B, C, t*F, 2H, 2W]."""
    B, packed, T, H, W = x.shape
    C = packed // (t * 4)
    x = x.view(B, t, 2, 2, C, T, H, W).permute(0, 4, 5, 1, 6, 2, 7, 3)
    return x.reshape(B, C, T * t, H * 2, W * 2)


class RMSNorm3d(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma, normalized in float32."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


class ResnetBlock(nn.Module):
    """RMS -> SiLU -> conv -> RMS -> SiLU -> conv, plus the input (1x1x1 conv if widths differ)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = RMSNorm3d(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = RMSNorm3d(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.nin_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head attention over all (t, y, x) positions, frame f seeing frames <= f; 1x1x1 conv
    projections, RMS pre-norm, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm3d(channels)
        self.q = nn.Conv3d(channels, channels, 1)
        self.k = nn.Conv3d(channels, channels, 1)
        self.v = nn.Conv3d(channels, channels, 1)
        self.proj_out = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        B, C, T, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))  # [B, 1, N, C]
        # Frame-causal without an N x N mask: the queries of frame f attend to frames 0..f.
        per_frame = H * W
        out = torch.empty_like(q)
        for f in range(T):
            rows = slice(f * per_frame, (f + 1) * per_frame)
            out[:, :, rows] = F.scaled_dot_product_attention(q[:, :, rows], k[:, :, : rows.stop], v[:, :, : rows.stop])
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, T, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H, W (and T unless `temporal` is False) by space-to-depth, into `out_channels`.

    conv output (out/factor channels) is packed to `out_channels`; the shortcut packs the input and
    averages groups of channels down to `out_channels`. Time: the first frame is packed alone
    (spatially; its channels doubled), the rest in pairs, so F = 1 + 2k frames become 1 + k.
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        factor = 8 if temporal else 4
        self.temporal = temporal
        self.out_channels = out_channels
        self.conv = CausalConv3d(in_channels, out_channels // factor)
        self.group = factor * in_channels // out_channels  # input channels averaged per output channel

    def _shortcut(self, x: torch.Tensor, t: int, group: int) -> torch.Tensor:
        packed = space_to_depth(x, t)
        B, _, T, H, W = packed.shape
        return packed.view(B, self.out_channels, group, T, H, W).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if not self.temporal:
            return space_to_depth(h, 1) + self._shortcut(x, 1, self.group)
        first, rest = h[:, :, :1], h[:, :, 1:]
        first = space_to_depth(first, 1)
        h = torch.cat([torch.cat([first, first], dim=1), space_to_depth(rest, 2)], dim=2)
        shortcut = torch.cat([self._shortcut(x[:, :, :1], 1, self.group // 2), self._shortcut(x[:, :, 1:], 2, self.group)], dim=2)
        return h + shortcut


class Upsample(nn.Module):
    """Double H, W (and T unless `temporal` is False) by depth-to-space, into `out_channels`.

    The shortcut repeats input channels and unpacks them. Time: the first latent frame becomes one
    frame (half of its unpacked channels kept), the others two each, so 1 + k frames become 1 + 2k.
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        factor = 8 if temporal else 4
        self.temporal = temporal
        self.conv = CausalConv3d(in_channels, out_channels * factor)
        self.repeats = factor * out_channels // in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if not self.temporal:
            return depth_to_space(h, 1) + depth_to_space(x.repeat_interleave(self.repeats, dim=1), 1)
        first = depth_to_space(h[:, :, :1], 1)
        h = torch.cat([first[:, : first.shape[1] // 2], depth_to_space(h[:, :, 1:], 2)], dim=2)
        shortcut = torch.cat([
            depth_to_space(x[:, :, :1], 1).repeat_interleave(self.repeats // 2, dim=1),
            depth_to_space(x[:, :, 1:], 2).repeat_interleave(self.repeats, dim=1),
        ], dim=2)
        return h + shortcut


class Level(nn.Module):
    """One resolution level: `block` resnets, then an optional `downsample` / `upsample`."""

    def __init__(self, channels: list[int], resampler: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(a, b) for a, b in zip(channels[:-1], channels[1:])])
        self.resampler_name = name
        if resampler is not None:
            setattr(self, name, resampler)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.block:
            x = resnet(x)
        resampler = getattr(self, self.resampler_name, None)
        return x if resampler is None else resampler(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def resampling_levels(config: V15VAEConfig, decoder: bool) -> list[tuple[bool, bool]]:
    """(space, time) resampling of each level in the encoder's (or decoder's) order: space in the
    first log2(16) = 4 levels; time in encoder levels 2, 3 and decoder levels 0, 1 (official rule)."""
    levels = len(config.block_out_channels)
    n_space = config.spatial_compression_ratio.bit_length() - 1
    n_time = config.time_compression_ratio.bit_length() - 1
    if not n_time <= n_space < levels:
        raise ValueError(f"{levels} levels cannot give {config.spatial_compression_ratio}x/{config.time_compression_ratio}x")
    if decoder:
        return [(i < n_space, i < n_time) for i in range(levels)]
    return [(i < n_space, n_space - n_time <= i < n_space) for i in range(levels)]


class Encoder(nn.Module):
    def __init__(self, config: V15VAEConfig):
        super().__init__()
        widths, layers = config.block_out_channels, config.layers_per_block
        self.conv_in = CausalConv3d(config.in_channels, widths[0])
        self.down = nn.ModuleList()
        width = widths[0]
        for i, (space, time) in enumerate(resampling_levels(config, decoder=False)):
            channels = [width] + [widths[i]] * layers
            width = widths[i]
            resampler = None
            if space:
                out = widths[i + 1] if config.downsample_match_channel else width
                resampler, width = Downsample(width, out, temporal=time), out
            self.down.append(Level(channels, resampler, "downsample"))
        self.mid = MidBlock(width)
        self.norm_out = RMSNorm3d(width)
        self.conv_out = CausalConv3d(width, 2 * config.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, F, H, W] -> moments [B, 2C, T', h, w]
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        B, width, T, H, W = h.shape
        shortcut = h.view(B, self.conv_out.conv.out_channels, -1, T, H, W).mean(dim=2)
        return self.conv_out(F.silu(self.norm_out(h))) + shortcut


class Decoder(nn.Module):
    def __init__(self, config: V15VAEConfig):
        super().__init__()
        widths, layers = tuple(reversed(config.block_out_channels)), config.layers_per_block + 1
        self.conv_in = CausalConv3d(config.latent_channels, widths[0])
        self.mid = MidBlock(widths[0])
        self.up = nn.ModuleList()
        width = widths[0]
        for i, (space, time) in enumerate(resampling_levels(config, decoder=True)):
            channels = [width] + [widths[i]] * layers
            width = widths[i]
            resampler = None
            if space or time:
                out = widths[i + 1] if config.upsample_match_channel else width
                resampler, width = Upsample(width, out, temporal=time), out
            self.up.append(Level(channels, resampler, "upsample"))
        self.norm_out = RMSNorm3d(width)
        self.conv_out = CausalConv3d(width, config.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, C, T', h, w] -> [B, 3, F, H, W]
        h = self.conv_in(z) + z.repeat_interleave(self.conv_in.conv.out_channels // z.shape[1], dim=1)
        h = self.mid(h)
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class HunyuanVideo15VAE(nn.Module):
    def __init__(self, config: V15VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [-1, 1], F = 4k+1 -> posterior mean [B, 32, k+1, H/16, W/16] (unscaled)."""
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise HyVideoError(f"expected a video [B, {self.config.in_channels}, F, H, W], got {tuple(video.shape)}")
        latent_shape(*video.shape[2:], self.config)  # validates F, H, W
        return self.encoder(video)[:, : self.config.latent_channels]  # mean; the log-variance half is unused

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, 32, T', h, w] -> video [B, 3, 4(T'-1)+1, 16h, 16w], nominally in [-1, 1]."""
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise HyVideoError(f"expected latents [B, {self.config.latent_channels}, T, h, w], got {tuple(z.shape)}")
        return self.decoder(z)
