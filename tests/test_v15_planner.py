"""HunyuanVideo-1.5 in the planner: its sizes from configs on the meta device, real CFG (two forwards
a step: batch-1 activations, every streamed block copied twice), the 16x VAE's tiles and decode estimate."""

import pytest
import torch

from bench.memtrack import PeakTracker
from hyvideo.v15_config import V15_DIT_CONFIGS, V15_VAE_CONFIGS
from hyvideo.v15_vae import HunyuanVideo15VAE
from lowvram.activations import v15_vae_decode_tile_bytes
from lowvram.families import released_model_sizes
from lowvram.planner import plan
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


def test_v15_size_buckets_are_the_image_buckets():
    """lowvram.sizes.V15_SIZE_BUCKETS: at each aspect, the bucket of bucket_sizes(640 | 960, 16)
    that hyvideo/v15_image.py would give an image of that aspect."""
    from hyvideo.image import bucket_sizes, closest_bucket
    from hyvideo.v15_image import TARGET_SIZE
    from lowvram.sizes import V15_SIZE_BUCKETS

    for tier, buckets in V15_SIZE_BUCKETS.items():
        for aspect, size in buckets.items():
            w, h = (int(x) for x in aspect.split(":"))
            height, width = closest_bucket(h * 100, w * 100, bucket_sizes(TARGET_SIZE[tier], 16), wide_may_equal=True)
            assert size == (width, height), (tier, aspect)


def test_v15_plan_that_does_not_fit_suggests_a_v15_size():
    """A 1.5 plan at 720p x 121 short of RAM: the suggestion is 1.5's 480p bucket (848x480, as --size:
    the 13B's --resolution 540p would be the wrong model's size), whose plan fits. The RAM given lies
    between what 480p x 121 and 720p x 65 (the suggestion tried before it) need, both planned here."""
    from lowvram.generation.preflight import PlanQuery, plan_only

    def query(width, height, frames, ram):
        found = PlanQuery(width, height, frames, profile="8gb", vram_bytes=6 * 2**30, ram_bytes=ram)
        found.model = "1.5-720p_t2v"
        return plan_only(found).result

    small, short = query(848, 480, 121, 64 * 2**30), query(1280, 720, 65, 64 * 2**30)
    assert small["peak_ram_gb"] < short["peak_ram_gb"]
    ram = int((small["peak_ram_gb"] + short["peak_ram_gb"]) / 2 * 2**30)
    result = query(1280, 720, 121, ram)
    assert not result["fits"] and result["suggestion"].startswith("--size 848x480 --profile ")
    profile = result["suggestion"].split()[-1]
    again = PlanQuery(848, 480, 121, profile=profile, vram_bytes=6 * 2**30, ram_bytes=ram)
    again.model = "1.5-720p_t2v"
    assert plan_only(again).result["fits"]


@pytest.mark.parametrize("model, description", [("t2v", "HunyuanVideo 13B text-to-video"),
                                                ("i2v", "HunyuanVideo-I2V 13B (token_replace)"),
                                                ("1.5-480p_t2v_distilled", "HunyuanVideo-1.5 480p_t2v_distilled")])
def test_plan_and_profiles_say_which_model(model, description):
    from tests.helpers import as_json, invoke

    planned = invoke("plan", "--model", model, "--size", "848x480", "--frames", "33", "--vram", "24", "--ram", "64", "--json")
    assert planned.exit_code == 0, planned.output
    assert as_json(planned)["model"] == {"name": model, "description": description}
    table = invoke("plan", "--model", model, "--size", "848x480", "--frames", "33", "--vram", "24", "--ram", "64")
    assert f"{description}: " in " ".join(table.output.split())  # the table's title (wrapped as the terminal allows)
    assert as_json(invoke("profiles", "--json"))["models"][model] == description


@pytest.mark.slow
def test_readme_models_table_is_the_planners():
    """README's "Models" table, row by row: each cell is `lowvram plan --model M --size WxH --frames F
    --vram G --ram 32 --json` (auto), so the README shows plans, none written by hand."""
    import re
    from pathlib import Path

    from lowvram.generation.preflight import PlanQuery, plan_only

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| [^|]+ \(`([\w.-]+)`\) \| (\d+)x(\d+)x(\d+) \|(.+)\|$", readme, re.MULTILINE)
    assert {row[0] for row in rows} >= {"t2v", "i2v", "i2v-33ch", "1.5-720p_t2v", "1.5-480p_t2v"}
    for model, width, height, frames, cells in rows:
        expected = []
        for vram in (24, 16, 12, 8):
            query = PlanQuery(int(width), int(height), int(frames), vram_bytes=vram * 2**30, ram_bytes=32 * 2**30)
            query.model = model
            found = plan_only(query).result
            assert found["fits"], (model, vram)  # every cell of the table fits; a row that does not would say so
            expected.append(f"{found['peak_vram_gb']:.1f} / {found['peak_ram_gb']:.1f}, {found['profile']}, fits")
        assert [cell.strip() for cell in cells.split("|")] == expected, model


@pytest.mark.parametrize("args, video", [
    ([], {"width": 848, "height": 480, "frames": 121}),  # 480p_t2v's own size at 16:9, 1.5's trained length
    (["--aspect", "9:16"], {"width": 480, "height": 848, "frames": 121}),
    (["--size", "1280x720", "--frames", "61"], {"width": 1280, "height": 720, "frames": 61}),  # given: kept
])
def test_plan_takes_a_v15_transformers_own_size_and_length_where_none_is_given(args, video):
    from tests.helpers import as_json, invoke

    result = invoke("plan", "--model", "1.5-480p_t2v", "--vram", "8", "--ram", "32", "--json", *args)
    assert result.exit_code in (0, 1), result.output
    assert as_json(result)["video"] == video
