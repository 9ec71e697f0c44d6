"""The causal VAE against diffusers' AutoencoderKLHunyuanVideo (the oracle), on the tiny config."""

import pytest
import torch

from hyvideo.config import VAE_CONFIGS
from hyvideo.errors import HyVideoError
from hyvideo.vae import CausalVAE, FrameCausalAttention, latent_shape, level_factors
from tests.diffusers_oracle import diffusers_vae
from tests.helpers import max_rel_err, randomize_

TINY = VAE_CONFIGS["tiny"]
# fp32 on both sides with the same op order (measured: bit-identical on CPU). Only SDPA (bool vs
# additive -inf mask) or conv algorithm choice could differ, ~1e-7 relative each; 1e-5 leaves room
# for that over ~20 layers while any real layout/order bug shows up as >1e-2.
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def pair():
    oracle = diffusers_vae(TINY)
    randomize_(oracle, seed=0)
    ours = CausalVAE(TINY).eval()
    ours.load_state_dict(oracle.state_dict(), strict=True)  # key names and shapes must match exactly
    return ours, oracle


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(pair, frames):
    ours, oracle = pair
    gen = torch.Generator().manual_seed(frames)
    video = torch.rand(2, 3, frames, 32, 48, generator=gen) * 2 - 1  # batch 2, non-square
    with torch.no_grad():
        got = ours.encode(video)
        want = oracle.encode(video).latent_dist.mean
    assert got.shape == (2, 16, (frames - 1) // 4 + 1, 4, 6)
    assert max_rel_err(got, want) <= REL_TOL


@pytest.mark.parametrize("latent_frames", [1, 2, 3])  # decode to 1, 5, 9 frames
def test_decode_matches_diffusers(pair, latent_frames):
    ours, oracle = pair
    gen = torch.Generator().manual_seed(100 + latent_frames)
    z = torch.randn(2, 16, latent_frames, 4, 6, generator=gen)
    with torch.no_grad():
        got = ours.decode(z)
        want = oracle.decode(z).sample
    assert got.shape == (2, 3, 4 * (latent_frames - 1) + 1, 32, 48)
    assert max_rel_err(got, want) <= REL_TOL


def test_decode_is_stateless(pair):
    """decode(z) depends only on z, so a tiler may call it on pieces in any order. (It is NOT causal
    end to end: GroupNorm statistics span all frames, so decoding z[:, :, :2] alone differs from the
    first 5 frames of decoding z; the official temporal tiler blends tile seams for that reason.)"""
    ours, _ = pair
    gen = torch.Generator().manual_seed(7)
    z, other = torch.randn(2, 1, 16, 3, 4, 6, generator=gen)
    with torch.no_grad():
        first = ours.decode(z)
        ours.decode(other)
        again = ours.decode(z)
    assert torch.equal(first, again)  # bit-identical: same input, same ops, nothing carried over


def test_bfloat16_runs_in_module_dtype(pair):
    """Half precision keeps its dtype end to end (the upsampler's fp32 interpolate casts back)."""
    ours, _ = pair
    half = CausalVAE(TINY).to(torch.bfloat16).eval()
    half.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(11)
    video = torch.rand(1, 3, 5, 32, 48, generator=gen) * 2 - 1
    z = torch.randn(1, 16, 2, 4, 6, generator=gen)
    with torch.no_grad():
        lat, out = half.encode(video.bfloat16()), half.decode(z.bfloat16())
        lat32, out32 = ours.encode(video), ours.decode(z)
    assert lat.dtype == out.dtype == torch.bfloat16
    # bf16 rounds each op to 2^-9 relative; ~40 chained layers measured ~1.7e-2, so 5e-2 catches real bugs
    assert max_rel_err(lat.float(), lat32) <= 5e-2
    assert max_rel_err(out.float(), out32) <= 5e-2


def test_full_config_parameter_count():
    with torch.device("meta"):
        model = CausalVAE(VAE_CONFIGS["884-16c-hy"])
    # Official "884-16c-hy" numbers (facts §3.1).
    assert sum(p.numel() for p in model.parameters()) == 246_478_803
    assert len(model.state_dict()) == 248
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["encoder.conv_in.conv.weight"] == (128, 3, 3, 3, 3)
    assert shapes["encoder.conv_out.conv.weight"] == (32, 512, 3, 3, 3)
    assert shapes["quant_conv.weight"] == (32, 32, 1, 1, 1)
    assert shapes["post_quant_conv.weight"] == (16, 16, 1, 1, 1)
    assert shapes["decoder.conv_in.conv.weight"] == (512, 16, 3, 3, 3)
    assert shapes["decoder.up_blocks.2.resnets.0.conv_shortcut.conv.weight"] == (256, 512, 1, 1, 1)
    assert shapes["decoder.up_blocks.3.resnets.0.conv_shortcut.conv.weight"] == (128, 256, 1, 1, 1)
    assert shapes["decoder.conv_out.conv.weight"] == (3, 128, 3, 3, 3)
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in shapes
    assert "encoder.down_blocks.2.downsamplers.0.conv.conv.weight" in shapes
    assert "encoder.down_blocks.3.downsamplers.0.conv.conv.weight" not in shapes
    assert "decoder.up_blocks.2.upsamplers.0.conv.conv.weight" in shapes
    assert "decoder.up_blocks.3.upsamplers.0.conv.conv.weight" not in shapes


def test_level_factors():
    # facts §3.3/§3.4: (1,2,2), (2,2,2), (2,2,2), none
    assert level_factors(VAE_CONFIGS["884-16c-hy"]) == [(1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1)]


def test_latent_shape():
    # Official default 129 frames at 720p -> 33 latent frames of 90x160 (facts §3.3).
    assert latent_shape(129, 720, 1280, VAE_CONFIGS["884-16c-hy"]) == (16, 33, 90, 160)
    assert latent_shape(1, 8, 8, TINY) == (16, 1, 1, 1)  # a single image is one latent frame
    with pytest.raises(HyVideoError):
        latent_shape(128, 720, 1280, TINY)  # not 4k+1
    with pytest.raises(HyVideoError):
        latent_shape(129, 720, 1284, TINY)  # not a multiple of 8


def test_mid_block_attention_is_frame_causal():
    """The per-frame loop equals attention with the frame-causal N x N mask (frame f sees frames
    <= f, full attention within a frame)."""
    torch.manual_seed(0)
    attn = FrameCausalAttention(8, 4).eval()
    x = torch.randn(1, 8, 3, 2, 2)  # [B, C, T, H, W]
    with torch.no_grad():
        h = attn.group_norm(x).flatten(2).transpose(1, 2)  # [B, N, C]
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        frame = torch.arange(3).repeat_interleave(4)
        mask = frame[:, None] >= frame[None, :]
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        expected = x + attn.to_out[0](ref).transpose(1, 2).reshape(x.shape)
        out = attn(x)
    assert torch.allclose(out, expected, atol=1e-6)  # float32, same ops in another grouping
