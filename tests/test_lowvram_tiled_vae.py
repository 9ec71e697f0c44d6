"""Tiled VAE: tile geometry (pure), tiled decode and encode against diffusers' tiled implementation
of the same official algorithm, the bound against untiled coding, exact shapes, and memory that
does not grow with the video's length."""

import pytest
import torch

from hyvideo.config import VAE_CONFIGS
from hyvideo.errors import HyVideoError
from hyvideo.vae import CausalVAE
from bench.memtrack import PeakTracker
from lowvram.tiled_vae import (
    TiledVAE, blend_, decode_tiling, encode_tiling, spatial_decode_tiles, spatial_encode_tiles, temporal_decode_tiles,
)
from tests.diffusers_oracle import diffusers_vae
from tests.helpers import max_rel_err, randomize_

TINY = VAE_CONFIGS["tiny"]
# Tiles for the tiny VAE: 4 latents (32 px) every 3 spatially, 4+1 latent frames every 3 in time;
# the same ratios as the official 32 / 16.
L, LT = 4, 4
# Both sides are float32 and run the same decoder on the same tiles; only the blend arithmetic
# differs (float32 ramp computed once vs Python-float scalars per row), ~1 ulp per blend: 1e-5
# relative leaves room for that and catches any geometry or weighting error (those are O(1)).
REL_TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Geometry


def test_official_temporal_decode_geometry_for_33_latents():
    spans = temporal_decode_tiles(33)  # 129 frames, official defaults (16+1 every 12)
    assert [(s.src_start, s.src_stop) for s in spans] == [(0, 17), (12, 29), (24, 33)]
    assert [s.keep for s in spans] == [49, 48, 32] and sum(s.keep for s in spans) == 129
    assert [s.drop for s in spans] == [0, 1, 1]
    assert [s.blend for s in spans] == [0, 16, 16]
    assert [s.dst for s in spans] == [0, 49, 97]


def test_official_spatial_decode_geometry():
    spans = spatial_decode_tiles(90)  # 720 px: tiles of 32 latents every 24, crop 192 px, blend 64 px
    assert [s.src_start for s in spans] == [0, 24, 48, 72]
    assert [s.keep for s in spans] == [192, 192, 192, 144]
    assert [s.blend for s in spans] == [0, 64, 64, 64]
    assert sum(s.keep for s in spatial_decode_tiles(160)) == 1280


@pytest.mark.parametrize("tile", [4, 8, 16, 32])
def test_geometry_covers_every_output_exactly_once(tile):
    for t in range(1, 70):
        spans = temporal_decode_tiles(t, tile)
        assert sum(s.keep for s in spans) == 4 * (t - 1) + 1
        assert all(b.dst == a.dst + a.keep for a, b in zip(spans, spans[1:]))
        assert all(s.keep > 0 and s.blend <= s.out_len for s in spans)
    for n in range(1, 100):
        spans = spatial_decode_tiles(n, tile)
        assert sum(s.keep for s in spans) == 8 * n and spans[-1].src_stop == n


def test_tiling_thresholds_and_validation():
    t, h, w = decode_tiling((16, 32, 32))  # fits one official tile: untiled
    assert len(t) == len(h) == len(w) == 1
    t, h, w = decode_tiling((17, 30, 40))  # w > 32 tiles both axes, as official
    assert len(t) == 2 and len(h) == 2 and len(w) == 2
    with pytest.raises(HyVideoError, match="multiple of 4"):
        spatial_decode_tiles(64, tile=6)


def test_blend_ramp():
    a = torch.zeros(1, 1, 6)
    b = torch.ones(1, 1, 4)
    blend_(b, a, extent=4, dim=-1)
    assert b.flatten().tolist() == [0.0, 0.25, 0.5, 0.75]  # weight of b is x/E


# ---------------------------------------------------------------------------------------------
# Numerics on the tiny VAE (random weights)


@pytest.fixture(scope="module")
def vae():
    ours = CausalVAE(TINY).eval()
    randomize_(ours, seed=0)
    return ours


@pytest.fixture(scope="module")
def vaes(vae):
    """Ours and diffusers' AutoencoderKLHunyuanVideo with the same weights and tile sizes."""
    oracle = diffusers_vae(TINY)
    oracle.load_state_dict(vae.state_dict(), strict=True)  # key names and shapes match exactly
    ours = vae
    oracle.enable_tiling(tile_sample_min_height=8 * L, tile_sample_min_width=8 * L, tile_sample_min_num_frames=4 * LT,
                         tile_sample_stride_height=6 * L, tile_sample_stride_width=6 * L, tile_sample_stride_num_frames=3 * LT)
    oracle.use_framewise_decoding = oracle.use_framewise_encoding = True
    return ours, oracle


def latents(*shape, seed=0):
    return torch.randn(1, 16, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(5, 6, 5), (9, 3, 3), (2, 9, 9)])  # time+space, time only, space only
@pytest.mark.slow
def test_tiled_decode_matches_diffusers_tiled_decode(vaes, shape):
    """diffusers' AutoencoderKLHunyuanVideo tiled decode implements the official algorithm (same
    tiles, in-place blends, crops) independently; with tile sizes set to ours they must agree."""
    ours, oracle = vaes
    z = latents(*shape)
    with torch.no_grad():
        tiled = TiledVAE(ours, L, LT).decode(z)
        expected = oracle.decode(z).sample
    assert tiled.shape == expected.shape == (1, 3, 4 * (shape[0] - 1) + 1, 8 * shape[1], 8 * shape[2])
    assert max_rel_err(tiled, expected) <= REL_TOL


def test_one_tile_is_exactly_untiled(vae):
    ours = vae
    z = latents(4, 3, 4)  # fits in one tile: the tiled path calls decode once on the whole input
    with torch.no_grad():
        assert torch.equal(TiledVAE(ours, L, LT).decode(z), ours.decode(z))


@pytest.mark.slow
def test_constant_latents_tile_seamlessly(vae):
    """A constant latent decodes to the same constant video whatever the tile (replicate padding,
    nearest upsampling, per-tile GroupNorm statistics and attention all see identical values), so
    any difference would come from stitching (wrong position, crop or blend weights). In float64,
    because GroupNorm over a nearly constant field amplifies rounding noise by up to
    1/sqrt(eps) = 1000x (float32 would leave ~1e-3 noise); float64 leaves ~1e-12."""
    ours = vae
    double = CausalVAE(TINY).double().eval()
    double.load_state_dict(ours.state_dict())
    z = torch.full((1, 16, 5, 6, 5), 0.3, dtype=torch.float64)
    with torch.no_grad():
        assert max_rel_err(TiledVAE(double, L, LT).decode(z), double.decode(z)) <= 1e-9


def _covering_envelope(code, z, t_spans, h_spans, w_spans):
    """Per output sample, min and max over the tiles that cover it of their independent codings
    (`code`: the VAE's decode or encode)."""
    lo = hi = None
    for ts in t_spans:
        for hs in h_spans:
            for ws in w_spans:
                tile = code(z[:, :, ts.src_start:ts.src_stop, hs.src_start:hs.src_stop, ws.src_start:ws.src_stop])
                tile = tile[:, :, ts.drop:]
                if lo is None:
                    size = (sum(s.keep for s in t_spans), sum(s.keep for s in h_spans), sum(s.keep for s in w_spans))
                    lo = torch.full((*tile.shape[:2], *size), float("inf"))
                    hi = torch.full((*tile.shape[:2], *size), float("-inf"))
                region = [slice(s.dst, min(s.dst + s.out_len, n)) for s, n in zip((ts, hs, ws), lo.shape[2:])]
                part = tile[:, :, : region[0].stop - region[0].start, : region[1].stop - region[1].start,
                            : region[2].stop - region[2].start]
                lo[(..., *region)] = torch.minimum(lo[(..., *region)], part)
                hi[(..., *region)] = torch.maximum(hi[(..., *region)], part)
    return lo, hi


@pytest.mark.parametrize("shape", [(9, 3, 3), (5, 6, 5)])  # time only; time and space (4-tile corners)
@pytest.mark.slow
def test_tiled_vs_untiled_bound(vae, shape):
    """The bound: every tiled output sample is a convex combination (blend weights in [0, 1],
    summing to 1) of the independent decodes of the tiles that cover it, at the same position. So
    |tiled - untiled| <= max over covering tiles of |tile - untiled|, pointwise: tiling adds no
    error beyond each tile's own. (The per-tile error itself cannot be bounded usefully with
    random weights: GroupNorm statistics and attention are per tile and a temporal tile restarts
    the causal convs; with random weights these differences are O(1).)"""
    ours = vae
    z = latents(*shape, seed=2)
    with torch.no_grad():
        tiled = TiledVAE(ours, L, LT).decode(z)
        untiled = ours.decode(z)
        lo, hi = _covering_envelope(ours.decode, z, *decode_tiling(shape, L, LT))
    eps = 1e-5 * untiled.abs().max()  # float32 rounding of the blend
    assert torch.isfinite(lo).all()  # every sample is covered by some tile
    assert (tiled >= lo - eps).all() and (tiled <= hi + eps).all()
    bound = torch.maximum((lo - untiled).abs(), (hi - untiled).abs())
    assert ((tiled - untiled).abs() <= bound + eps).all()


@pytest.mark.slow
def test_default_tiles_on_33_latents_give_129_frames(vae):
    ours = vae
    z = latents(33, 2, 2)  # official temporal tiles (16+1 every 12), tiny spatial size
    with torch.no_grad():
        video = TiledVAE(ours).decode(z)
    assert video.shape == (1, 3, 129, 16, 16)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_length(vae):
    """Tensor bytes alive at the peak, minus the (preallocated) output, are the same for 9 and 13
    latent frames (3 and 4 temporal tiles; 5 frames, with a short second tile, need less): one
    tile at a time plus the tails kept for blending."""
    ours = vae
    tiled = TiledVAE(ours, L, LT)
    for space, lengths in (((4, 4), (5, 9, 13)), ((5, 6), (9, 13))):
        working = []
        for frames in lengths:
            z = latents(frames, *space)
            with torch.no_grad(), PeakTracker() as tracker:
                out = tiled.decode(z)
            working.append(tracker.peak_bytes - out.numel() * out.element_size())
        assert working[-1] == working[-2] >= working[0], working


@pytest.mark.slow
def test_tile_progress_callback(vae):
    """on_tile reports every tile once, in order, with the total (the CLI's decode progress)."""
    seen = []
    tiled = TiledVAE(vae, spatial_tile=4, temporal_tile=4, on_tile=lambda done, total: seen.append((done, total)))
    z = torch.randn(1, 16, 9, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tiled.decode(z)
    total = seen[0][1]
    assert total > 1 and seen == [(i + 1, total) for i in range(total)]


# ---------------------------------------------------------------------------------------------
# Encode (image-to-video's conditioning image: one frame, spatial tiles)


def test_official_spatial_encode_geometry():
    """diffusers' tiled_encode at 720 px: 256 px tiles every 192, 32 latents each, blended over 8
    latents and cropped to 24 (the last tile's 18 latents kept whole)."""
    spans = spatial_encode_tiles(720)
    assert [(s.src_start, s.src_stop) for s in spans] == [(0, 256), (192, 448), (384, 640), (576, 720)]
    assert [s.out_len for s in spans] == [32, 32, 32, 18]
    assert [s.keep for s in spans] == [24, 24, 24, 18] and [s.blend for s in spans] == [0, 8, 8, 8]
    for tile in (4, 8, 32):
        for pixels in range(8, 800, 8):
            spans = spatial_encode_tiles(pixels, tile)
            assert sum(s.keep for s in spans) == pixels // 8 and spans[-1].src_stop == pixels
            assert all(b.dst == a.dst + a.keep for a, b in zip(spans, spans[1:]))
    t, h, w = encode_tiling((1, 256, 256))  # one official tile: whole
    assert len(t) == len(h) == len(w) == 1 and t[0].out_len == 1
    t, h, w = encode_tiling((1, 200, 264))  # either side over 256 px tiles both, as diffusers
    assert (len(t), len(h), len(w)) == (1, 2, 2)
    assert [len(s) for s in encode_tiling((1, 720, 1280), spatial=0)] == [1, 1, 1]


def image(height, width, seed=0):
    return torch.rand(1, 3, 1, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("size", [
    (40, 48),  # 2 x 2 tiles, the second of each axis short
    (72, 56),  # 3 x 2 tiles, corners blended from both sides
    (48, 16),  # tall: 2 x 1 tiles (the narrow side one tile)
])
def test_tiled_encode_matches_diffusers_tiled_encode(vaes, size):
    """diffusers' tiled_encode (same tile sizes: 32 px every 24, blended over 1 latent and cropped
    to 3) against ours on the same weights, float32: the same tiles through the same encoder, only
    the blend arithmetic may round differently (REL_TOL, as decode; measured: 0.0)."""
    ours, oracle = vaes
    x = image(*size)
    with torch.no_grad():
        tiled = TiledVAE(ours, L, LT).encode(x)
        expected = oracle.encode(x).latent_dist.mean
    assert tiled.shape == expected.shape == (1, 16, 1, size[0] // 8, size[1] // 8)
    assert max_rel_err(tiled, expected) <= REL_TOL


def test_encode_in_one_tile_is_exactly_whole(vae):
    x = image(32, 24)  # fits one 32 px tile: encode runs once on the whole image
    with torch.no_grad():
        assert torch.equal(TiledVAE(vae, L, LT).encode(x), vae.encode(x))
        assert torch.equal(TiledVAE(vae, 0, 0).encode(image(72, 56)), vae.encode(image(72, 56)))  # tiles off


def test_tiled_vs_whole_encode_bound(vae):
    """Whole vs tiled on a random image cannot be close with random weights (GroupNorm statistics and
    the mid-block attention are per tile: O(1) apart, 0.42 relative measured at 72x56). The bound
    instead: each tiled latent is a convex blend of the independent encodes of the tiles covering
    it, so |tiled - whole| <= max over those tiles of |tile - whole|, up to float32 rounding of the
    blend (1e-5 of the largest value)."""
    x = image(40, 48, seed=3)  # 2 x 2 tiles: edges blended from one side, a corner from both
    with torch.no_grad():
        tiled, whole = TiledVAE(vae, L, LT).encode(x), vae.encode(x)
        lo, hi = _covering_envelope(vae.encode, x, *encode_tiling(tuple(x.shape[2:]), L))
    eps = 1e-5 * whole.abs().max()
    assert torch.isfinite(lo).all()  # every latent is covered by some tile
    assert (tiled >= lo - eps).all() and (tiled <= hi + eps).all()
    assert ((tiled - whole).abs() <= torch.maximum((lo - whole).abs(), (hi - whole).abs()) + eps).all()


def test_constant_image_encodes_the_same_whole_or_tiled(vae):
    """A constant image encodes to the same constant latent whole or in any tile (replicate padding,
    per-tile statistics of identical values), so tiled == whole up to float64 rounding (1e-9
    relative: GroupNorm over a nearly constant field amplifies rounding ~1000x, see the decode test);
    a stitching gap or blend weights not summing to 1 would show."""
    double = CausalVAE(TINY).double().eval()
    double.load_state_dict(vae.state_dict())
    constant = torch.full((1, 3, 1, 72, 56), -0.4, dtype=torch.float64)
    with torch.no_grad():
        assert max_rel_err(TiledVAE(double, L, LT).encode(constant), double.encode(constant)) <= 1e-9
