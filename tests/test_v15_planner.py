"""HunyuanVideo-1.5 in the planner: its sizes from configs on the meta device, real CFG (two forwards
a step: batch-1 activations, every streamed block copied twice), the 16x VAE's tiles and decode estimate."""

import pytest
import torch

from bench.memtrack import PeakTracker
from hyvideo.v15_config import V15_DIT_CONFIGS, V15_VAE_CONFIGS
from hyvideo.v15_vae import HunyuanVideo15VAE
from lowvram.activations import v15_vae_decode_tile_bytes
from lowvram.planner import plan, released_model_sizes
from lowvram.profiles import load_profile
from lowvram.stages import parameter_count
from quant.bytes import weight_bytes


def test_released_sizes_counted_on_meta():
    config = V15_DIT_CONFIGS["hunyuanvideo-1.5"]
    assert parameter_count(config) == 8_326_608_160  # "8.3B" (Tencent's README)
    fp8 = weight_bytes(config, "fp8")
    assert fp8.quantized_elements > 0.95 * parameter_count(config)  # the 540 block linears hold nearly all
    sizes = released_model_sizes("1.5-720p_t2v", 1280, 720)
    llm, byt5 = sizes["text_encoders"]
    assert llm.linear + llm.other == 7_070_619_136  # Qwen2.5-VL-7B's language model, no LM head
    assert sizes["forwards_per_step"] == 2 and sizes["text_tokens"] == 1000 + 256
    assert released_model_sizes("1.5-720p_t2v_distilled", 1280, 720)["forwards_per_step"] == 1
    i2v = released_model_sizes("1.5-480p_i2v", 848, 480)
    assert [(e.name, e.phase) for e in i2v["text_encoders"]] == [("llm", 0), ("byt5", 0), ("vision", 1)]  # SigLIP after Qwen is freed
    assert i2v["image_size"] == (480, 848)  # the VAE encodes the image in SigLIP's phase
    assert i2v["text_tokens"] == 1000 + 256 + 729  # SigLIP 384 px in 14 px patches: 27 x 27


def test_cfg_copies_streamed_blocks_twice_per_step_with_batch1_activations():
    one = released_model_sizes("1.5-480p_t2v_distilled", 848, 480)
    two = released_model_sizes("1.5-480p_t2v", 848, 480)
    a, b = (plan(load_profile("8gb"), 848, 480, 121, **sizes) for sizes in (one, two))
    assert a.schedule.streamed and a.schedule.resident == b.schedule.resident
    assert b.schedule.streamed_bytes_per_step == 2 * a.schedule.streamed_bytes_per_step
    assert b.stages["dit"].parts["activations"] == a.stages["dit"].parts["activations"]
    latent = 32 * 31 * 30 * 53 * 4  # 121 x 480 x 848: 31 x 30 x 53 latents, float32
    assert b.stages["dit"].parts["latents"] - a.stages["dit"].parts["latents"] == 2 * latent


def test_profile_tiles_cover_the_same_pixels():
    sizes = released_model_sizes("1.5-720p_t2v", 1280, 720)
    found = plan(load_profile("16gb"), 1280, 720, 121, **sizes)  # tile 32 latents of the 13B VAE = 256 px
    per_tile = v15_vae_decode_tile_bytes(V15_VAE_CONFIGS["hunyuanvideo-1.5"], 17, 16, 16)
    assert found.stages["vae"].parts["tile activations"] == per_tile


@pytest.mark.parametrize("shape", [(5, 4, 4), (3, 16, 16)])
def test_v15_decode_estimate_bounds_the_measured_peak(shape):
    """The 1.5 decoder's estimate on the tiny VAE in float32 is an upper bound: measured 16-19 %
    above PeakTracker (the float32 norm temporaries and resampler copies are counted at their widest)."""
    vae = HunyuanVideo15VAE(V15_VAE_CONFIGS["tiny"]).eval()
    z = torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), PeakTracker() as tracker:
        vae.decode(z)
    predicted = v15_vae_decode_tile_bytes(V15_VAE_CONFIGS["tiny"], *shape, act_bytes=4, cudnn_copies=False)
    assert 1.0 <= predicted / tracker.peak_bytes <= 1.25


@pytest.mark.parametrize("chunk", [None, 64])
def test_v15_dit_activations_predicted_vs_measured(chunk):
    """One 1.5 forward's activations (tiny DiT, float32, 5 x 12 x 12 latents + 26 text tokens) by
    the 13B formula: within 2 % in chunks (as every profile runs), an upper bound unchunked (it
    counts the single-stream block's MLP path, which 1.5 has not: measured 32 % above)."""
    from hyvideo.v15_dit import HunyuanVideo15DiT
    from lowvram.activations import dit_activation_bytes

    config = V15_DIT_CONFIGS["tiny"]
    torch.manual_seed(0)
    model = HunyuanVideo15DiT(config).eval()
    model.token_chunk = chunk
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2 * config.latent_channels + 1, 5, 12, 12, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        vec = model.conditioning(t, None)
        txt, mask = model.text_tokens(t, torch.randn(1, 20, config.text_states_dim, generator=g), torch.ones(1, 20),
                                      torch.randn(1, 6, config.byt5_states_dim, generator=g), torch.ones(1, 6), None)
        with PeakTracker() as tracker:
            model.transform(x, vec, txt, mask)
    predicted = dit_activation_bytes(config, 5 * 12 * 12, chunk, 26, act_bytes=4)
    if chunk:
        assert abs(predicted / tracker.peak_bytes - 1) <= 0.02
    else:
        assert 1.0 <= predicted / tracker.peak_bytes <= 1.4
