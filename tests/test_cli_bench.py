"""`lowvram bench` at tiny size on the CPU: it writes the random model once, runs the generate path
(run folder, manifest, caches), and reports measured vs planned per stage."""

import json
from pathlib import Path

import pytest

from lowvram.generation.preflight import plan_for_run, resumable_files
from lowvram.generation.run_folder import Run
from tests.helpers import as_json, invoke, one_line_error

GIB = 2**30
TINY_BENCH = ["--model-size", "tiny", "--size", "128x96", "--frames", "17", "--steps", "3", "--device", "cpu"]


@pytest.mark.slow
def test_bench_tiny_measures_every_stage_against_the_plan(tmp_path):
    result = invoke("bench", "--scratch", tmp_path, "--profile", "16gb", "--json", *TINY_BENCH)
    assert result.exit_code == 0, result.output
    data = as_json(result)
    assert data["profile"] == "16gb" and data["model"]["size"] == "tiny" and "noise" in data["note"]
    # "planned" is the plan of the run the bench made (its stored profile at its size, this model)
    run = Run.open(Path(data["video_path"]).parent)
    planned = plan_for_run(run, resumable_files(run)).stages
    for name in ("text", "dit", "vae"):
        stage = data["stages"][name]
        assert planned[name].vram_bytes > 0  # each stage's weights and activations are planned on the GPU
        assert stage["planned_vram_gb"] == round(planned[name].vram_bytes / GIB, 3)
        assert stage["planned_ram_gb"] == round(planned[name].ram_bytes / GIB, 3) > 0
        assert stage["seconds"] > 0 and stage["ram_gb"] > 0
        assert stage["vram_gb"] is None and stage["vram_reserved_gb"] is None  # no VRAM on the CPU; host RAM measured
    assert len(data["step_seconds"]) == 3 and data["s_per_step"] > 0
    assert data["estimate"]["steps"] == 50 and data["estimate"]["seconds"] > 50 * data["s_per_step"]
    # the generate path: a run folder with a manifest, the FP8 cache built beside the model
    assert run.state == "done" and run.settings["profile"]["name"] == "16gb"
    assert (Path(data["model"]["folder"]) / "lowvram-cache/dit-fp8.safetensors").is_file()

    again = invoke("bench", "--scratch", tmp_path, "--profile", "demo.toml", "--json", *TINY_BENCH)
    assert again.exit_code == 2 and "profile file not found" in one_line_error(again)


@pytest.mark.slow
def test_bench_reuses_the_model_and_refuses_a_cap_without_cuda(tmp_path):
    first = invoke("bench", "--scratch", tmp_path, "--json", "--steps", "1", *TINY_BENCH[:-4], "--device", "cpu")
    assert first.exit_code == 0, first.output
    folder = Path(as_json(first)["model"]["folder"])
    stamp = (folder / "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt").stat().st_mtime_ns
    capped = invoke("bench", "--scratch", tmp_path, "--cap-gb", "8", *TINY_BENCH)
    assert capped.exit_code == 2 and "needs CUDA" in one_line_error(capped)
    second = invoke("bench", "--scratch", tmp_path, "--json", "--steps", "1", *TINY_BENCH[:-4], "--device", "cpu")
    assert second.exit_code == 0 and json.loads(second.stdout)["model"]["folder"] == str(folder)
    assert (folder / "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_bench_image_to_video_tiny(tmp_path):
    """bench/run_gpu.sh's I2V line at tiny size: `--image` benches the I2V model (token_replace,
    official layout: the FP8 DiT from the quantize-once cache), conditioned on the image."""
    from PIL import Image

    image = tmp_path / "first.png"
    Image.new("RGB", (160, 90), (200, 40, 90)).save(image)
    args = ["--model-size", "tiny", "--size", "64x48", "--frames", "5", "--steps", "1", "--device", "cpu", "--image", image]
    result = invoke("bench", "--scratch", tmp_path / "scratch", "--profile", "16gb", "--json", *args)
    assert result.exit_code == 0, result.output
    data = as_json(result)
    assert data["model"]["size"] == "tiny-i2v" and data["model"]["image"] == str(image)
    run = Run.open(Path(data["video_path"]).parent)
    assert run.settings["image"] == str(image) and data["stats"]["image_encode"]["tiles"] == 1
    assert all(data["stages"][name]["seconds"] > 0 for name in ("text", "dit", "vae"))
    assert (Path(data["model"]["folder"]) / "lowvram-cache/i2v/dit-fp8.safetensors").is_file()  # the I2V DiT's own cache folder
    refused = invoke("bench", "--scratch", tmp_path / "scratch", "--layout", "official-fp8", *args)
    assert refused.exit_code == 2 and "I2V release has no FP8 DiT file" in one_line_error(refused)


@pytest.mark.slow
def test_bench_v15_text_to_video_tiny(tmp_path):
    """bench/run_gpu.sh's 1.5 line at tiny size: `--model 1.5-720p_t2v` writes the diffusers-layout
    1.5 folder with its random text encoders and runs generate's path on it: the variant's real CFG
    (2 forwards a step), the FP8 cache built, every stage measured."""
    args = ["--model", "1.5-720p_t2v", "--model-size", "tiny", "--size", "96x64", "--frames", "9", "--steps", "2",
            "--device", "cpu", "--profile", "16gb", "--json"]
    result = invoke("bench", "--scratch", tmp_path, *args)
    assert result.exit_code == 0, result.output
    data = as_json(result)
    assert data["model"]["name"] == "1.5-720p_t2v" and data["model"]["layout"] == "diffusers"
    assert data["model"]["size"] == "tiny-1.5-720p_t2v" and data["schedule"]["forwards_per_step"] == 2
    run = Run.open(Path(data["video_path"]).parent)
    assert run.settings["model"] == "1.5-720p_t2v" and run.settings["guidance"] == 6.0 and run.steps == 2
    assert all(data["stages"][name]["seconds"] > 0 for name in ("text", "dit", "vae"))
    assert (Path(data["model"]["folder"]) / "lowvram-cache/1.5-720p_t2v/dit-fp8.safetensors").is_file()  # per transformer


@pytest.mark.slow
def test_bench_v15_image_to_video_tiny(tmp_path, monkeypatch):
    """`--model 1.5-480p_i2v_step_distilled --image`: the diffusers-layout folder gets random SigLIP
    weights and its image processor too; the video takes the transformer's bucket for the image
    (the 480p base made 64 px here, as tests/test_v15_i2v.py: 80x48 for a 16:9 image), the MeanFlow
    transformer runs one forward a step."""
    from PIL import Image

    from hyvideo.v15_image import TARGET_SIZE

    monkeypatch.setitem(TARGET_SIZE, "480p", 64)
    image = tmp_path / "first.png"
    Image.new("RGB", (160, 90), (200, 40, 90)).save(image)
    args = ["--model", "1.5-480p_i2v_step_distilled", "--image", image, "--model-size", "tiny", "--frames", "5", "--steps", "1",
            "--device", "cpu", "--profile", "16gb", "--json"]
    result = invoke("bench", "--scratch", tmp_path / "scratch", *args)
    assert result.exit_code == 0, result.output
    data = as_json(result)
    assert data["model"]["size"] == "tiny-1.5-480p_i2v_step_distilled" and "forwards_per_step" not in data["schedule"]  # 1: not listed
    run = Run.open(Path(data["video_path"]).parent)
    assert run.settings["image"] == str(image) and (run.settings["width"], run.settings["height"]) == (80, 48)
    assert all(data["stages"][name]["seconds"] > 0 for name in ("text", "dit", "vae"))


@pytest.mark.parametrize("args, message", [
    (["--model", "1.5-720p_i2v"], "is an image-to-video transformer: pass --image"),
    (["--model", "1.5-7200p_t2v"], "1.5-720p_t2v"),  # the choices are listed
    (["--model", "1.5-480p_t2v", "--layout", "official"], "writes the diffusers layout"),
])
def test_bench_v15_refusals_before_writing_anything(tmp_path, args, message):
    result = invoke("bench", "--scratch", tmp_path / "scratch", "--model-size", "tiny", "--device", "cpu", *args)
    assert result.exit_code == 2 and message in one_line_error(result)
    assert not (tmp_path / "scratch").exists()


def test_bench_full_size_without_cuda_is_refused_before_writing_anything(tmp_path):
    result = invoke("bench", "--scratch", tmp_path / "scratch", "--device", "cpu")
    assert result.exit_code == 2 and "needs an NVIDIA GPU" in one_line_error(result)
    assert not (tmp_path / "scratch").exists()
