"""Planner: plans for the 13B model, and its predictions against memory measured on the CPU with
small configs of the same architecture.

Measurement (bench/memtrack.py): a TorchDispatchMode counts the bytes of every tensor storage an
op creates and releases them when the tensors die, so its peak is the most tensor bytes alive at
once. Weights and inputs exist before it starts and are counted from the modules themselves. CUDA
adds allocator rounding and library workspaces on top, which the planner's reserve covers."""

import json

import pytest
import torch

from hyvideo.config import DIT_CONFIGS, VAE_CONFIGS, VAEConfig
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.errors import HyVideoError
from hyvideo.vae import CausalVAE
from lowvram.activations import dit_activation_bytes, vae_decode_tile_bytes
from bench.memtrack import PeakTracker
from quant.fp8 import swap_linears_fp8
from lowvram.stages import configure_dit
from lowvram.streaming import dit_trunk, place_dit, release_dit
from lowvram.planner import plan
from lowvram.profiles import load_profile, profile_from_dict
from lowvram.streaming import leaf_bytes
from quant.bytes import block_bytes, trunk_bytes
from lowvram.units import GIB
from tests.helpers import SMALL, small_dit, small_inputs

# ---------------------------------------------------------------------------------------------
# Plans for the 13B model


def test_plan_json_has_the_cli_fields():
    p = plan(load_profile("24gb"), 1280, 720, 129, host_ram_bytes=32 * GIB)
    d = json.loads(json.dumps(p.to_dict()))
    assert {"fits", "peak_vram_gb", "peak_ram_gb", "profile", "stages"} <= set(d)
    assert set(d["stages"]) == {"text", "dit", "vae"}
    assert all({"vram_gb", "ram_gb"} <= set(stage) for stage in d["stages"].values())
    assert d["profile"] == "24gb" and d["fits"] is True
    assert p.tokens == 118_800 and p.latent == (33, 90, 160)  # facts §5.4
    assert len(p.schedule.resident) == 60  # the RTX 4090 reference: FP8 DiT fully resident
    assert d["peak_vram_gb"] == max(s["vram_gb"] for s in d["stages"].values())
    rows = p.table_rows()
    assert rows[0][0] == "stage" and [r[0] for r in rows[1:]] == ["text", "dit", "vae", "peak"]


def test_16gb_streams_at_720p_and_not_at_540p():
    p720 = plan(load_profile("16gb"), 1280, 720, 129)
    p540 = plan(load_profile("16gb"), 960, 544, 129)
    assert p720.fits and p540.fits
    assert 0 < len(p720.schedule.streamed) < 30  # most blocks stay resident
    assert len(p540.schedule.streamed) == 0
    assert p720.stages["dit"].vram_bytes + p720.reserve_bytes <= 16 * GIB
    assert p720.stages["dit"].ram_bytes > p540.stages["dit"].ram_bytes  # streamed blocks live in RAM


def test_activation_accounting_at_720p():
    # one bf16 hidden state at 118,800 + 256 tokens = 0.73 GB; q, k, v and the attention output
    # are 4 more; a 4096-token chunk costs 4096 x 30 x 3072 B < one more hidden state.
    config = DIT_CONFIGS["HYVideo-T/2-cfgdistill"]
    hidden = (118_800 + 256) * 3072 * 2
    rope = 2 * 118_800 * 128 * 4
    assert dit_activation_bytes(config, 118_800, 4096) == 5 * hidden + rope
    assert dit_activation_bytes(config, 118_800, 8192) == 4 * hidden + rope + 8192 * 30 * 3072
    assert dit_activation_bytes(config, 118_800, None) > 3 * dit_activation_bytes(config, 118_800, 4096)


def test_plan_rounds_sizes_and_rejects_bad_frames():
    p = plan(load_profile("16gb"), 1270, 714, 129)
    assert (p.width, p.height) == (1280, 720)  # up to multiples of 16, as the sampler does
    with pytest.raises(HyVideoError, match="4k\\+1"):
        plan(load_profile("16gb"), 1280, 720, 128)


def test_explicit_resident_blocks_and_too_small_budget():
    values = load_profile("8gb").to_dict()
    p = plan(profile_from_dict({**values, "resident_blocks": 5}), 960, 544, 129)
    assert len(p.schedule.resident) == 5
    tiny_budget = profile_from_dict({**values, "vram_budget_gb": 3.0})
    assert not plan(tiny_budget, 1280, 720, 129).fits


# ---------------------------------------------------------------------------------------------
# Predictions against measurements (CPU)


def test_weight_bytes_match_real_modules():
    tiny = DIT_CONFIGS["tiny"]
    model = HunyuanVideoDiT(tiny).to(torch.bfloat16)
    assert block_bytes(tiny, "bf16", "blocks", "double").total == leaf_bytes(model.double_blocks[0])
    assert block_bytes(tiny, "bf16", "blocks", "single").total == leaf_bytes(model.single_blocks[0])
    assert trunk_bytes(tiny) == sum(leaf_bytes(m) for m in dit_trunk(model))
    swap_linears_fp8(model, "blocks")
    assert block_bytes(tiny, "fp8", "blocks", "double").total == leaf_bytes(model.double_blocks[0])
    assert block_bytes(tiny, "fp8", "blocks", "single").total == leaf_bytes(model.single_blocks[0])


@pytest.mark.parametrize("chunk", [None, 512, 128])
@pytest.mark.slow
def test_dit_activations_predicted_vs_measured(chunk):
    """Measured (bf16, 1024 image + 24 text tokens): 20.73 / 13.29 / 7.79 hidden states for chunks
    None / 512 / 128; predicted 20.95 / 13.28 / 7.79. Tolerance -2 % .. +5 %: the formula counts
    the tensors of the code's chunk paths exactly but rounds the float32 temporaries of the
    unchunked QKV path up (it overestimates that case by 1 %)."""
    model = small_dit()
    model.token_chunk = chunk
    inputs = small_inputs()
    with torch.no_grad(), PeakTracker() as tracker:
        model(*inputs)
    predicted = dit_activation_bytes(SMALL, 4 * 16 * 16, chunk, text_tokens=24)
    assert -0.02 <= predicted / tracker.peak_bytes - 1 <= 0.05


@pytest.mark.parametrize("chunk", [None, 512, 128])
@pytest.mark.parametrize("quant_rows", [1024, 64])
@pytest.mark.slow
def test_dit_activations_with_scaled_mm_predicted_vs_measured(chunk, quant_rows, monkeypatch):
    """FP8 linears on `_scaled_mm` (PyTorch's CPU kernel takes row-wise scales too): the formula
    with the single block's linear2 quantizing its input (e4m3 copy, scales, float32 scratch rows)
    against the measured peak. Measured here: within 0.1 % (1024 scratch rows: 6.46 / 3.70 / 1.99
    MiB), and +1.1 % for 64 rows unchunked, where the QKV path's float32 rounding-up dominates; the
    same tolerance as without _scaled_mm."""
    from quant.fp8 import FP8Linear

    monkeypatch.setattr("quant.fp8.QUANT_ROWS", quant_rows)
    monkeypatch.setattr("lowvram.activations.QUANT_ROWS", quant_rows)
    model = small_dit()
    swap_linears_fp8(model, "blocks")
    for layer in model.modules():
        if isinstance(layer, FP8Linear):
            layer.use_scaled_mm = True
    model.token_chunk = chunk
    inputs = small_inputs()
    with torch.no_grad(), PeakTracker() as tracker:
        model(*inputs)
    predicted = dit_activation_bytes(SMALL, 4 * 16 * 16, chunk, text_tokens=24, scaled_mm=True)
    assert -0.02 <= predicted / tracker.peak_bytes - 1 <= 0.05


def test_the_planner_counts_scaled_mm_when_the_profile_may_use_it():
    """fp8_matmul scaled_mm or auto: the DiT stage's activations include linear2's quantization;
    dequant: they do not. (The small model at 256x256x13, where it is the peak: for the 13B model
    at 720p the three hidden states of the QKV path stay above it at any chunk size.)"""
    values = {**load_profile("16gb").to_dict(), "token_chunk": 512}
    activations = {matmul: plan(profile_from_dict({**values, "fp8_matmul": matmul}), 256, 256, 13, dit_config=SMALL,
                                text_encoders=()).stages["dit"].parts["activations"]
                   for matmul in ("dequant", "scaled_mm", "auto")}
    assert activations["scaled_mm"] == activations["auto"] > activations["dequant"]
    full = {matmul: plan(profile_from_dict({**values, "fp8_matmul": matmul}), 1280, 720, 129,
                         text_encoders=()).stages["dit"].parts["activations"] for matmul in ("dequant", "scaled_mm")}
    assert full["scaled_mm"] == full["dequant"]


@pytest.mark.parametrize("compute", [True, False])
@pytest.mark.slow
def test_step_cache_adds_no_activation_peak(compute):
    """The planner adds only the probe's weights for a step cache: its decision (two image-token
    states) and a reused step (tokens + residual) run while no block's activations exist, and a
    computed step holds nothing extra while the blocks run. Measured peaks (bf16, 1024 + 24 tokens)
    must stay within the uncached forward's; the tokens' bytes are what an extra state would add."""
    import copy

    from hyvideo.step_cache import TeaCache

    model = small_dit()
    model.token_chunk = 128
    x, t, text, mask, pooled, guidance = small_inputs()
    with torch.no_grad(), PeakTracker() as plain:
        model(x, t, text, mask, pooled, guidance)
    timesteps = torch.tensor([1000.0, 500.0, 0.0])
    cache = TeaCache(-1.0 if compute else 1e9, 3, copy.deepcopy(model.double_blocks[0].img_mod))
    moved = x * 0.9  # the next step's latents, allocated outside the measurement as `x` is
    with torch.no_grad():
        cache.forward(model, 0, x, timesteps, text, mask, pooled, guidance)  # step 0 always computes
        with PeakTracker() as cached:
            cache.forward(model, 1, moved, timesteps, text, mask, pooled, guidance)
    assert cache.state.computed == ([0, 1] if compute else [0])
    one_state = 1024 * SMALL.hidden_size * 2
    assert cached.peak_bytes <= plain.peak_bytes + one_state // 8, (cached.peak_bytes, plain.peak_bytes)  # 1/8: small temporaries


@pytest.mark.parametrize("shape", [(5, 4, 4), (9, 8, 8), (3, 16, 16)])
def test_vae_tile_activations_predicted_vs_measured(shape):
    """The tensors PyTorch holds while decoding a tile (tiny VAE, float32): predicted within 1 %
    (measured 0.1 % above the prediction: small tensors such as GroupNorm statistics)."""
    vae = CausalVAE(VAE_CONFIGS["tiny"]).eval()
    z = torch.randn(1, 16, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), PeakTracker() as tracker:
        vae.decode(z)
    predicted = vae_decode_tile_bytes(VAE_CONFIGS["tiny"], *shape, act_bytes=4, cudnn_copies=False)
    assert abs(predicted / tracker.peak_bytes - 1) <= 0.01


def test_tiled_image_encode_shrinks_the_i2v_text_stage():
    """I2V at 1280x720 (the 13B VAE built on the meta device): the conditioning image encoded whole
    needs 2.43 GiB of activations, the text stage's largest; in the 16gb profile's spatial tiles
    (32 latents = 256 px, as its decode) 0.18 GiB, under the LLM's 0.41 GiB, which is then the
    stage's activation peak."""
    from lowvram.families import released_model_sizes
    from lowvram.planner import image_encode_bytes

    tiled_profile = load_profile("16gb")
    whole_profile = profile_from_dict({**tiled_profile.to_dict(), "vae_spatial_tile": 0})
    vae_config = VAE_CONFIGS["884-16c-hy"]
    whole, tiled = (image_encode_bytes(p, vae_config, (720, 1280)) for p in (whole_profile, tiled_profile))
    assert 2.3 * GIB < whole < 2.6 * GIB and 0.15 * GIB < tiled < 0.2 * GIB
    sizes = released_model_sizes("i2v", 1280, 720)
    assert sizes["image_size"] == (720, 1280)
    text = {name: plan(p, 1280, 720, 129, **sizes).stages["text"] for name, p in (("whole", whole_profile), ("tiled", tiled_profile))}
    llm = sizes["text_encoders"][0].activation_bytes
    assert text["whole"].parts["activations"] == whole and text["tiled"].parts["activations"] == llm > tiled
    assert text["whole"].vram_bytes - text["tiled"].vram_bytes == whole - llm
    assert text["tiled"].parts["image encode"] == text["whole"].parts["image encode"]  # the whole VAE, fp16, either way


@pytest.mark.slow
def test_image_encode_prediction_bounds_the_measured_peak():
    """The tiny VAE encoding a 64x96 image on the CPU, whole and in 32 px tiles: the prediction
    bounds the measured peak (it also counts cuDNN's copies of the largest conv and the input,
    which the CPU measurement leaves out: measured 1.44x / 1.67x above), and tiling lowers both
    (measured 1.60 MB whole, 0.28 MB tiled)."""
    from lowvram.planner import image_encode_bytes
    from lowvram.tiled_vae import TiledVAE

    config = VAE_CONFIGS["tiny"]
    vae = CausalVAE(config).eval()
    x = torch.rand(1, 3, 1, 64, 96, generator=torch.Generator().manual_seed(0))
    measured, predicted = {}, {}
    for tile in (0, 4):
        with torch.no_grad(), PeakTracker() as tracker:
            TiledVAE(vae, tile).encode(x)
        profile = profile_from_dict({**load_profile("16gb").to_dict(), "vae_spatial_tile": tile})
        measured[tile], predicted[tile] = tracker.peak_bytes, image_encode_bytes(profile, config, (64, 96), act_bytes=4)
        assert measured[tile] <= predicted[tile] <= 2 * measured[tile]
    assert measured[4] < measured[0] / 4 and predicted[4] < predicted[0] / 2


# Measured on an NVIDIA H200 (torch 2.11, bench/bench_streaming.py, random weights, FP8 DiT with
# quant/fp8.py's FP8Linear): torch.cuda.max_memory_allocated in GiB. The planner must stay within
# 2 % of these (re-checked by the planner tests below); the 0.75 GiB reserve covers the CUDA context.
GPU_MEASURED = {
    "vae tile 17x32x32 fp16": 13.20,
    "dit 544x960x129 resident, chunk 8192": 14.83,
    "dit 720x1280x129 resident, chunk 8192": 16.08,
    "dit 720x1280x129 49 resident, chunk 4096": 15.20,
}


def test_vae_tile_prediction_matches_gpu_measurement():
    """On CUDA, cuDNN adds channels-last copies of the largest conv's padded input and output
    (4.1 GiB for the official tile, the full-resolution upsampler conv)."""
    predicted = vae_decode_tile_bytes(VAE_CONFIGS["884-16c-hy"], 17, 32, 32) / GIB
    assert abs(predicted / GPU_MEASURED["vae tile 17x32x32 fp16"] - 1) <= 0.02


@pytest.mark.parametrize("case, size, resident, chunk", [
    ("dit 544x960x129 resident, chunk 8192", (960, 544), 60, 8192),
    ("dit 720x1280x129 resident, chunk 8192", (1280, 720), 60, 8192),
    ("dit 720x1280x129 49 resident, chunk 4096", (1280, 720), 49, 4096),
])
def test_dit_prediction_matches_gpu_measurement(case, size, resident, chunk):
    values = {**load_profile("16gb").to_dict(), "resident_blocks": resident, "token_chunk": chunk}
    p = plan(profile_from_dict(values), *size, 129, text_encoders=())
    assert abs(p.stages["dit"].vram_bytes / GIB / GPU_MEASURED[case] - 1) <= 0.02


@pytest.mark.slow
def test_dit_stage_predicted_vs_measured_with_streaming():
    """The whole DiT stage through the profile path (plan -> prepare_dit -> streamed forward):
    device weights (trunk + resident blocks + ring, counted from the modules) plus the measured
    activation peak, against the plan's DiT stage less its "latents" part (3 float32 latent
    tensors the sampler holds outside the forward, not measured here). Measured 6,653,056 B vs
    predicted 6,651,264 B; tolerance +-3 % (the activation formula's, see above)."""
    profile = profile_from_dict({"name": "small", "vram_budget_gb": 1.0, "resident_blocks": 2,
                                 "prefetch_depth": 1, "token_chunk": 128, "dit_scheme": "bf16"})
    p = plan(profile, 256, 256, 13, dit_config=SMALL, vae_config=VAE_CONFIGS["tiny"], text_encoders=())
    model = small_dit()
    configure_dit(model, p, torch.device("cpu"), "sdpa")
    streamer = place_dit(model, p, "cpu")
    assert model.token_chunk == 128 and len(streamer.schedule.streamed) == 2
    inputs = small_inputs(frames=4, h=32, w=32, text=256)
    with torch.no_grad(), PeakTracker() as tracker:
        model(*inputs, blocks=streamer.blocks_for_step(prefetch_next_step=False))
    weights = sum(leaf_bytes(m) for m in dit_trunk(model)) + streamer.gpu_bytes
    measured = weights + tracker.peak_bytes
    predicted = p.stages["dit"].vram_bytes - p.stages["dit"].parts["latents"]
    assert abs(predicted / measured - 1) <= 0.03
    release_dit(model, streamer, keep_on_host=True)


def test_chunked_equals_unchunked_through_the_profile_path():
    """token_chunk comes from the profile (prepare_dit sets it); chunked per-token work is the same
    math per token, so only float32 GEMM blocking over fewer rows can differ: 1e-6 relative."""
    model = small_dit(dtype=torch.float32)
    inputs = small_inputs(frames=3, h=6, w=10, text=12)
    with torch.no_grad():
        whole = model(*inputs)
    profile = profile_from_dict({"name": "chunky", "vram_budget_gb": 1.0, "token_chunk": 7, "dit_scheme": "bf16"})
    p = plan(profile, 80, 48, 9, dit_config=SMALL, vae_config=VAE_CONFIGS["tiny"], text_encoders=())
    configure_dit(model, p, torch.device("cpu"), "sdpa")
    streamer = place_dit(model, p, "cpu")
    assert model.token_chunk == 7  # straddles the image/text boundary (45 image tokens)
    with torch.no_grad():
        chunked = model(*inputs, blocks=streamer.blocks_for_step(prefetch_next_step=False))
    assert ((chunked - whole).abs().max() / whole.abs().max()).item() <= 1e-6


def test_vae_config_sizes_are_used():
    vae_config = VAEConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4)
    small = plan(load_profile("8gb"), 1280, 720, 129, vae_config=vae_config)
    assert small.stages["vae"].vram_bytes < plan(load_profile("8gb"), 1280, 720, 129).stages["vae"].vram_bytes


def test_a_profile_short_of_ram_is_refused_before_loading():
    """8 GiB of VRAM is enough for profile 8gb at 720p x 129, 6 GiB of RAM is not (its streamed
    blocks are pinned on the host): one line that says RAM, and how to pin less."""
    from lowvram.planner import resolve

    with pytest.raises(HyVideoError) as info:
        resolve([load_profile("8gb")], 1280, 720, 129, vram_bytes=8 * GIB, ram_bytes=6 * GIB)
    message = str(info.value)
    assert "GiB RAM (6.0 GiB available)" in message and "pinned_ram_cap_gb" in message and "\n" not in message
    profile, found = resolve([load_profile("8gb")], 1280, 720, 129, vram_bytes=8 * GIB, ram_bytes=16 * GIB)
    assert found.fits and found.stages["dit"].pinned_bytes > 0
    assert found.stages["dit"].ram_parts["first use (DiT cache)"] > 0 and found.stages["dit"].page_cache_bytes > 0
