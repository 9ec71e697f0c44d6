"""HunyuanVideo-1.5 VAE: parity with diffusers' AutoencoderKLHunyuanVideo15 on a tiny config, key
layouts, and the real config on the meta device."""

import pytest
import torch
pytest.importorskip("diffusers")  # the oracle: `pytest -m cuda` collects without it (tests/test_cuda_collection.py)
from diffusers import AutoencoderKLHunyuanVideo15

from hyvideo.errors import HyVideoError
from hyvideo.v15_config import V15_VAE_CONFIGS, V15VAEConfig
from hyvideo.v15_keys import vae_diffusers_to_ours, vae_ours_to_diffusers
from hyvideo.v15_vae import HunyuanVideo15VAE, depth_to_space, latent_shape, space_to_depth
from tests.helpers import randomize_

TINY = V15_VAE_CONFIGS["tiny"]
# float32 on CPU; the attention differs in form (per-frame SDPA calls vs one masked call), the rest
# is the same ops: observed 1.5e-7 (encode) and 1.0e-6 (decode); a formula difference shows at 1e-2 or more.
TOL = 1e-5


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def pair():
    ours = HunyuanVideo15VAE(TINY).eval()
    randomize_(ours, seed=3)
    reference = AutoencoderKLHunyuanVideo15(**TINY.to_diffusers()).eval()
    reference.load_state_dict(vae_ours_to_diffusers(ours.state_dict()), strict=True)
    return ours, reference


@pytest.mark.parametrize("frames", [1, 9])
def test_encode_matches_diffusers(pair, frames):
    ours, reference = pair
    video = torch.rand(1, 3, frames, 32, 48, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        latents = ours.encode(video)
        expected = reference.encode(video).latent_dist.mode()
    assert latents.shape == (1, *latent_shape(frames, 32, 48, TINY))
    assert rel_err(latents, expected) <= TOL


@pytest.mark.parametrize("latent_frames", [1, 3])
def test_decode_matches_diffusers(pair, latent_frames):
    ours, reference = pair
    z = torch.randn(1, TINY.latent_channels, latent_frames, 2, 3, generator=torch.Generator().manual_seed(latent_frames))
    with torch.no_grad():
        video = ours.decode(z)
        expected = reference.decode(z).sample
    assert video.shape == (1, 3, 4 * (latent_frames - 1) + 1, 32, 48)
    assert rel_err(video, expected) <= TOL


def test_decode_is_causal(pair):
    """The first video frames depend on the first latent frames only (what temporal tiles rely on)."""
    ours, _ = pair
    z = torch.randn(1, TINY.latent_channels, 3, 2, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole, head = ours.decode(z), ours.decode(z[:, :, :2])
    assert rel_err(whole[:, :, :5], head) <= TOL


def test_space_to_depth_round_trip():
    x = torch.randn(2, 3, 5, 4, 6)
    assert torch.equal(depth_to_space(space_to_depth(x[:, :, 1:], 2), 2), x[:, :, 1:])
    assert torch.equal(depth_to_space(space_to_depth(x, 1), 1), x)


def test_bad_shapes_raise(pair):
    ours, _ = pair
    with pytest.raises(HyVideoError):
        ours.encode(torch.zeros(1, 3, 8, 32, 48))  # 8 frames is not 4k + 1
    with pytest.raises(HyVideoError):
        ours.decode(torch.zeros(1, 3, 1, 2, 3))  # wrong latent channels


def test_key_layouts_round_trip(pair):
    ours, reference = pair
    state = ours.state_dict()
    back = vae_diffusers_to_ours(reference.state_dict())
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_real_config_on_meta_device():
    config = V15_VAE_CONFIGS["hunyuanvideo-1.5"]
    with torch.device("meta"):
        ours = HunyuanVideo15VAE(config)
        reference = AutoencoderKLHunyuanVideo15(**config.to_diffusers())
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert latent_shape(121, 720, 1280, config) == (32, 31, 45, 80)
    assert set(vae_ours_to_diffusers(ours.state_dict())) == set(reference.state_dict())


def test_config_from_both_layouts():
    real = V15_VAE_CONFIGS["hunyuanvideo-1.5"]
    # The constructor arguments of Tencent's AutoencoderKLConv3D (vae/config.json); the tiling sizes
    # (sample_size, sample_tsize) are ignored here, their values illustrative.
    official = {"in_channels": 3, "out_channels": 3, "latent_channels": 32, "block_out_channels": [128, 256, 512, 1024, 1024],
                "layers_per_block": 2, "ffactor_spatial": 16, "ffactor_temporal": 4, "sample_size": 256, "sample_tsize": 64,
                "scaling_factor": 1.03682, "downsample_match_channel": True, "upsample_match_channel": True}
    assert V15VAEConfig.from_dict(official) == real
    assert V15VAEConfig.from_dict(real.to_diffusers()) == real


def test_half_precision_decode_runs(pair):
    """fp16 weights (the official VAE dtype) with fp16 latents: norms compute in float32, no dtype
    errors; the result stays near float32 (fp16 has 11 mantissa bits; observed 2.1e-3)."""
    ours, _ = pair
    half = HunyuanVideo15VAE(TINY).eval()
    half.load_state_dict(ours.state_dict())
    half.to(torch.float16)
    z = torch.randn(1, TINY.latent_channels, 2, 2, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = half.decode(z.half())
        expected = ours.decode(z)
    assert out.dtype == torch.float16
    assert rel_err(out.float(), expected) <= 1e-2
