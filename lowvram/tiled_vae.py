"""Tiled VAE decode and encode with the official overlap and linear blending (facts §3.8).

Geometry (pure functions, one axis at a time) with the official sizes as defaults: decode tiles of
32x32 latents every 24, blended over 64 px and cropped to 192 px; temporal tiles of 16+1 latent
frames every 12, the first decoded frame of later tiles dropped, blended over 16 frames, 49 frames
kept of the first tile and 48 of later ones. For a tile size L (a multiple of 4) the official
ratios give: stride 3L/4, blend 2L px / L frames, crop 6L px / 3L frames.

Encode (image-to-video's conditioning image, one frame; spatial tiles only) follows diffusers'
`AutoencoderKLHunyuanVideo.tiled_encode`: pixel tiles of 8L px every 6L px (official 256 every 192),
each encoded to L latents, blended over L/4 latents and cropped to 3L/4 (official 8 and 24), the
same in-place blend as decode; tiled as soon as either side exceeds 8L px.

Blend ramp (every axis): for x in [0, E), b[x] = a[-E + x] * (1 - x/E) + b[x] * (x/E), where a is
the previous tile's output *after its own blending* (the official code blends in place),
E = min(blend, len(a), len(b)).

Memory: tiles are decoded one at a time; the kept part of each is written into a preallocated
output on `output_device` (the host by default). Only what later blends need stays on the compute
device: the bottom strips of the previous row of spatial tiles, the right strip of the previous
tile, the tail frames of the previous temporal tile, and the current temporal tile assembled at full
frame size. None of it grows with the video's length.

Differences from the official loop: a temporal tile that would start on the last latent frame
(and so contribute no frame after dropping its first) is not decoded; blending runs in float32 (float64
for float64 tiles) then rounds once to the tile's dtype.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hyvideo.errors import HyVideoError

SPATIAL_TILE = 32  # latents (256 px)
TEMPORAL_TILE = 16  # latent frames (64 frames + 1)
PROFILE_TILE_PIXELS = 8  # a profile's vae_spatial_tile counts latents of the 13B VAE: 8 px each


def spatial_tile_for(profile_tile: int, spatial_compression: int) -> int:
    """A profile's spatial tile in latents of a VAE with this compression: the same pixels (the
    1.5 VAE's 16x latents: 32 -> 16, i.e. 256 px as Tencent tiles it on a card over 21 GB)."""
    return profile_tile * PROFILE_TILE_PIXELS // spatial_compression


@dataclass(frozen=True)
class TileSpan:
    """One tile along one axis. Input [src_start, src_stop); its output, after dropping `drop`
    leading samples, has `out_len` samples; the first `blend` are blended with the previous tile's
    tail and the first `keep` go to output positions [dst, dst + keep)."""

    src_start: int
    src_stop: int
    drop: int
    out_len: int
    keep: int
    dst: int
    blend: int


def _check_tile(tile: int, what: str) -> None:
    if tile < 4 or tile % 4:
        raise HyVideoError(f"{what} must be a positive multiple of 4 latents, got {tile}")


def _spans(length: int, tile_in: int, stride: int, out_len: Callable[[int, int], int], keep_first: int,
           keep_later: int, blend: int, drop_later: int, skip_last_single: bool) -> list[TileSpan]:
    spans, dst = [], 0
    for start in range(0, length, stride):
        if start > 0 and skip_last_single and start == length - 1:
            break  # would contribute nothing after dropping its first output
        stop = min(start + tile_in, length)
        drop = drop_later if start > 0 else 0
        n_out = out_len(start, stop) - drop
        keep = min(keep_later if start > 0 else keep_first, n_out)
        extent = 0 if not spans else min(blend, spans[-1].out_len, n_out)
        spans.append(TileSpan(start, stop, drop, n_out, keep, dst, extent))
        dst += keep
    return spans


def whole_span(length: int, out_len: int) -> list[TileSpan]:
    return [TileSpan(0, length, 0, out_len, out_len, 0, 0)]


def spatial_decode_tiles(latent_len: int, tile: int = SPATIAL_TILE, scale: int = 8) -> list[TileSpan]:
    """Spatial decode tiles along one axis of `latent_len` latents (tiled; see `decode_tiling`)."""
    _check_tile(tile, "spatial tile")
    stride = 3 * tile // 4
    return _spans(latent_len, tile, stride, lambda a, b: (b - a) * scale, stride * scale, stride * scale,
                  int(tile * scale * 0.25), 0, False)


def temporal_decode_tiles(latent_frames: int, tile: int = TEMPORAL_TILE, scale: int = 4) -> list[TileSpan]:
    """Temporal decode tiles of tile+1 latent frames; one span when latent_frames <= tile."""
    _check_tile(tile, "temporal tile")
    if latent_frames <= tile:
        return whole_span(latent_frames, scale * (latent_frames - 1) + 1)
    stride = 3 * tile // 4
    keep = scale * stride
    return _spans(latent_frames, tile + 1, stride, lambda a, b: scale * (b - a - 1) + 1, keep + 1, keep,
                  int(tile * scale * 0.25), 1, True)


def spatial_encode_tiles(pixel_len: int, tile: int = SPATIAL_TILE, scale: int = 8) -> list[TileSpan]:
    """Spatial encode tiles along one axis of `pixel_len` pixels (a multiple of `scale`): `tile`
    latents (scale * tile px) every 3/4 tile, each kept for its first 3/4 tile of latents."""
    _check_tile(tile, "spatial tile")
    stride = 3 * tile // 4
    return _spans(pixel_len, tile * scale, stride * scale, lambda a, b: (b - a) // scale, stride, stride, tile // 4, 0, False)


def encode_tiling(shape: tuple[int, int, int], spatial: int = SPATIAL_TILE, time_scale: int = 4,
                  space_scale: int = 8) -> tuple[list[TileSpan], list[TileSpan], list[TileSpan]]:
    """(t, h, w) spans for encoding a video of shape (F, H, W): time whole, space tiled on both axes
    as soon as either exceeds the tile (as diffusers); spatial 0: one span."""
    f, h, w = shape
    ts = whole_span(f, (f - 1) // time_scale + 1)
    if spatial and (h > spatial * space_scale or w > spatial * space_scale):
        return ts, spatial_encode_tiles(h, spatial, space_scale), spatial_encode_tiles(w, spatial, space_scale)
    return ts, whole_span(h, h // space_scale), whole_span(w, w // space_scale)


def decode_tiling(shape: tuple[int, int, int], spatial: int = SPATIAL_TILE, temporal: int = TEMPORAL_TILE,
                  time_scale: int = 4, space_scale: int = 8) -> tuple[list[TileSpan], list[TileSpan], list[TileSpan]]:
    """(t, h, w) spans for decoding latents of shape (T', h, w). Spatial tiling applies to both
    axes as soon as either exceeds the tile (as official). A tile size of 0: that kind of tiling
    is off (one span)."""
    t, h, w = shape
    ts = temporal_decode_tiles(t, temporal, time_scale) if temporal else whole_span(t, time_scale * (t - 1) + 1)
    if spatial and (h > spatial or w > spatial):
        return ts, spatial_decode_tiles(h, spatial, space_scale), spatial_decode_tiles(w, spatial, space_scale)
    return ts, whole_span(h, h * space_scale), whole_span(w, w * space_scale)


def blend_(b: torch.Tensor, a_tail: torch.Tensor, extent: int, dim: int) -> None:
    """In place: b[:E] = a_tail[-E:] * (1 - x/E) + b[:E] * (x/E) along `dim`, x = 0..E-1."""
    if extent <= 0:
        return
    shape = [1] * b.ndim
    shape[dim] = extent
    compute = torch.promote_types(b.dtype, torch.float32)  # fp16/bf16 blend in float32
    ramp = (torch.arange(extent, device=b.device, dtype=compute) / extent).view(shape)
    head = b.narrow(dim, 0, extent)
    tail = a_tail.narrow(dim, a_tail.shape[dim] - extent, extent).to(b.device)
    head.copy_(tail.to(compute) * (1 - ramp) + head.to(compute) * ramp)


def _tail(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    length = min(length, x.shape[dim])
    return x.narrow(dim, x.shape[dim] - length, length).clone()


class TiledVAE:
    """Tiled decode and encode around a `CausalVAE` (any object with .decode(z), .encode(x) and .config).

    spatial_tile / temporal_tile: tile sizes in latents (multiples of 4; official 32 / 16; 0: untiled;
    encode tiles only in space).
    output_device: where the full output is assembled (default: the host).
    on_tile(done, total): called after each tile (progress).
    """

    def __init__(self, vae, spatial_tile: int = SPATIAL_TILE, temporal_tile: int = TEMPORAL_TILE, output_device="cpu",
                 on_tile: Callable[[int, int], None] | None = None):
        for tile, what in ((spatial_tile, "spatial tile"), (temporal_tile, "temporal tile")):
            if tile:
                _check_tile(tile, what)
        self.vae = vae
        self.spatial_tile = spatial_tile
        self.temporal_tile = temporal_tile
        self.output_device = torch.device(output_device)
        self.on_tile = on_tile
        config = vae.config
        self.time_scale, self.space_scale = config.time_compression_ratio, config.spatial_compression_ratio

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, T', h, w] (on the compute device) -> video [B, 3, F, 8h, 8w] on output_device."""
        spans = decode_tiling(tuple(z.shape[2:]), self.spatial_tile, self.temporal_tile, self.time_scale, self.space_scale)
        return self._run(z, self.vae.decode, spans)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, F, H, W] (on the compute device) -> posterior mean [B, C, T', H/8, W/8] on
        output_device, spatially tiled (one tile when it fits or spatial_tile is 0)."""
        spans = encode_tiling(tuple(x.shape[2:]), self.spatial_tile, self.time_scale, self.space_scale)
        return self._run(x, self.vae.encode, spans)

    def _run(self, x: torch.Tensor, vae_fn, spans) -> torch.Tensor:
        t_spans, h_spans, w_spans = spans
        total, done = len(t_spans) * len(h_spans) * len(w_spans), 0

        def fn(tile):
            nonlocal done
            result = vae_fn(tile)
            done += 1
            if self.on_tile is not None:
                self.on_tile(done, total)
            return result

        out = None
        tail = None
        for k, ts in enumerate(t_spans):
            frames = self._spatial(x[:, :, ts.src_start:ts.src_stop], fn, h_spans, w_spans)  # [B, C, n, H, W]
            frames = frames[:, :, ts.drop:]
            if k > 0:
                blend_(frames, tail, ts.blend, dim=2)
            if k + 1 < len(t_spans):
                tail = _tail(frames, 2, t_spans[k + 1].blend)
            if out is None:
                size = (sum(s.keep for s in t_spans), sum(s.keep for s in h_spans), sum(s.keep for s in w_spans))
                out = torch.empty(*frames.shape[:2], *size, dtype=frames.dtype, device=self.output_device)
            out[:, :, ts.dst:ts.dst + ts.keep] = frames[:, :, :ts.keep].to(self.output_device)
            del frames
        return out

    def _spatial(self, x: torch.Tensor, fn, h_spans: list[TileSpan], w_spans: list[TileSpan]) -> torch.Tensor:
        """One temporal slab through `fn`, spatially tiled; returns the assembled slab (compute device)."""
        if len(h_spans) == 1 and len(w_spans) == 1:
            return fn(x)
        assembled = None
        bottoms: list[torch.Tensor | None] = [None] * len(w_spans)  # previous row's bottom strips
        for i, hs in enumerate(h_spans):
            right = None
            for j, ws in enumerate(w_spans):
                tile = fn(x[..., hs.src_start:hs.src_stop, ws.src_start:ws.src_stop])
                if i > 0:
                    blend_(tile, bottoms[j], hs.blend, dim=-2)
                if j > 0:
                    blend_(tile, right, ws.blend, dim=-1)
                if i + 1 < len(h_spans):
                    bottoms[j] = _tail(tile, -2, h_spans[i + 1].blend)
                if j + 1 < len(w_spans):
                    right = _tail(tile, -1, w_spans[j + 1].blend)
                if assembled is None:
                    size = (sum(s.keep for s in h_spans), sum(s.keep for s in w_spans))
                    assembled = tile.new_empty(*tile.shape[:3], *size)
                assembled[..., hs.dst:hs.dst + hs.keep, ws.dst:ws.dst + ws.keep] = tile[..., :hs.keep, :ws.keep]
                del tile
        return assembled
