"""Every `lowvram` command through Typer's CliRunner, on the tiny model (float32 on the CPU).

Bad input must give one line saying what to do and exit code 2 before anything is computed; each
case has a test here (disk full and the SIGKILL/SIGINT cases are in test_generation_runs.py and
test_cli_interrupted.py)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel, LlamaForCausalLM

from hyvideo.config import DIT_CONFIGS
from hyvideo.errors import HyVideoError
from lowvram.setup.synthetic_checkpoint import write_text_encoder
from lowvram import stages as stages_module
from lowvram.setup.download import default_model_dir
from lowvram.profiles import load_profile
from lowvram.generation.run_folder import Run
from quant.nf4 import nf4_unavailable_reason
from tests.helpers import TINY_ARGS, as_json, invoke, one_line_error

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def done(tiny_official, runs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "fox.mp4"
    result = invoke("generate", "a red fox running through snow", "--model-dir", tiny_official, "--runs-dir", runs_dir,
                    "--out", out, "--json", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    return as_json(result)


# --- generate, runs, resume ------------------------------------------------------------------


def test_generate_json_and_the_mp4_decodes(done):
    assert done["ok"] and done["state"] == "done" and done["step"] == done["steps"] == 2
    assert done["settings"]["seed"] == 5 and done["settings"]["profile"]["name"] == "plain"
    av = pytest.importorskip("av")  # optional here: `pytest -m cuda` must collect without it
    for path in (done["video"], done["out"]):
        with av.open(path) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert len(frames) == 9 and frames[0].shape == (48, 64, 3)
    assert Path(done["first_frame"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_table_and_json(done, runs_dir):
    listed = as_json(invoke("runs", "--runs-dir", runs_dir, "--json"))["runs"]
    row = next(r for r in listed if r["id"] == done["run_id"])
    assert row["size"] == "64x48x9" and (row["step"], row["steps"]) == (2, 2) and row["state"] == "done"
    assert row["output"] == done["out"]  # the --out copy when there is one, else the run's video.mp4
    table = invoke("runs", "--runs-dir", runs_dir)
    assert table.exit_code == 0 and done["run_id"][:15] in table.stdout and "64x48x9" in table.stdout


def test_resume_a_done_run_and_nothing_to_resume(done, runs_dir, tmp_path):
    result = invoke("resume", done["run_id"], "--runs-dir", runs_dir, "--json")
    assert result.exit_code == 0 and as_json(result)["resumed_from"] == "done"
    empty = invoke("resume", "--runs-dir", tmp_path)
    assert empty.exit_code == 2 and "no unfinished run" in one_line_error(empty)


@pytest.mark.slow
def test_step_cache_progress_shows_computed_and_reused_steps(tiny_official, tmp_path):
    args = [*TINY_ARGS[:4], "--steps", "6", "--seed", "5", "--device", "cpu", "--cache", "fast"]
    result = invoke("generate", "a fox", "--model-dir", tiny_official, "--runs-dir", tmp_path, *args)
    assert result.exit_code == 0, result.output
    last = [line for line in result.stderr.splitlines() if "step 6/6" in line][-1]
    computed = Run.open(next(tmp_path.iterdir())).manifest["stats"]["dit"]["computed_steps"]
    assert f"DiT ran {len(computed)}, reused {6 - len(computed)}" in last and len(computed) < 6


@pytest.mark.slow
def test_a_warning_is_said_once_per_invocation(tiny_official, tmp_path):
    """Each clip of a batch chooses its attention kernel: the CPU fallback note is printed once."""
    args = [*TINY_ARGS[:4], "--steps", "1", "--device", "cpu", "--seeds", "1,2", "--attention", "sage"]
    result = invoke("generate", "a fox", "--model-dir", tiny_official, "--runs-dir", tmp_path, *args)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("attention 'sage' needs CUDA; using sdpa on the CPU") == 1


def test_quiet_prints_only_the_result_path(tiny_official, tmp_path):
    result = invoke("generate", "a lighthouse", "--model-dir", tiny_official, "--runs-dir", tmp_path, "--quiet",
                    "--size", "32x32", "--frames", "5", "--steps", "1", "--device", "cpu")
    assert result.exit_code == 0
    assert result.stdout.strip().endswith("video.mp4") and len(result.stdout.strip().splitlines()) == 1


def test_one_frame_writes_a_png_and_runs_lists_it(tiny_official, tmp_path):
    out = tmp_path / "lighthouse.png"
    result = invoke("generate", "a lighthouse", "--model-dir", tiny_official, "--runs-dir", tmp_path / "runs", "--out", out,
                    "--size", "32x32", "--frames", "1", "--steps", "1", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    done = as_json(result)
    assert done["image"].endswith("image.png") and done["video"] is None and done["out"] == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.read_bytes() == Path(done["image"]).read_bytes()
    listed = as_json(invoke("runs", "--runs-dir", tmp_path / "runs", "--json"))["runs"]
    assert [(r["size"], r["output"]) for r in listed] == [("32x32x1", str(out))]
    text = invoke("resume", done["run_id"], "--runs-dir", tmp_path / "runs")
    assert text.exit_code == 0 and f"image: {done['image']}" in text.stdout and "video:" not in text.stdout


@pytest.mark.slow
def test_long_prompt_from_a_file_warns_and_continues(tiny_official, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("snow " * 400)  # far beyond the LLM's 256 tokens
    result = invoke("generate", "--prompt-file", prompt, "--model-dir", tiny_official, "--runs-dir", tmp_path / "runs",
                    "--size", "32x32", "--frames", "1", "--steps", "1", "--device", "cpu", "--json")
    assert result.exit_code == 0
    assert any("longer than 256 tokens" in w for w in as_json(result)["warnings"])
    assert "warning:" in result.stderr


@pytest.mark.slow
def test_interrupted_run_resumes_through_the_cli(tiny_official, tmp_path, done, monkeypatch):
    """Ctrl-C during the decode (KeyboardInterrupt) -> exit 130 and the resume command."""
    real_decode = stages_module.Stages.decode

    def ctrl_c(self, vae, latents, on_progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages_module.Stages, "decode", ctrl_c)
    stopped = invoke("generate", "a red fox running through snow", "--model-dir", tiny_official, "--runs-dir", tmp_path, *TINY_ARGS)
    assert stopped.exit_code == 130
    run_id = Run.open(next(tmp_path.iterdir())).id
    assert f"lowvram resume {run_id}" in stopped.stderr
    monkeypatch.setattr(stages_module.Stages, "decode", real_decode)
    resumed = invoke("resume", "--runs-dir", tmp_path, "--json")
    assert resumed.exit_code == 0 and as_json(resumed)["resumed_from"] == "decoding"
    same = Path(as_json(resumed)["final_latents"]).read_bytes() == Path(done["final_latents"]).read_bytes()
    assert same  # same settings and seed as `done`: the same final latents, bit for bit


@pytest.mark.slow
def test_disk_full_is_one_line_and_resumable(tiny_official, tmp_path, monkeypatch):
    import errno
    import os

    real_save_step = Run.save_step

    def save_step(self, step, latents, cache=None):
        if step == 2:
            monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        return real_save_step(self, step, latents, cache)

    monkeypatch.setattr(Run, "save_step", save_step)
    result = invoke("generate", "a fox", "--model-dir", tiny_official, "--runs-dir", tmp_path, *TINY_ARGS)
    assert result.exit_code == 2
    assert "the disk is full" in one_line_error(result) and "lowvram resume" in one_line_error(result)
    monkeypatch.undo()
    assert invoke("resume", "--runs-dir", tmp_path).exit_code == 0


@pytest.mark.slow
def test_generate_with_a_profile_on_the_cpu(tiny_official, tmp_path):
    """A shipped profile runs its real code path (its DiT scheme, from the quantize-once cache,
    blocks through the streamer, tiled VAE) on the tiny model; NF4 falls back to bf16 where
    bitsandbytes cannot run it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_official, model)
    result = invoke("generate", "a fox", "--model-dir", model, "--runs-dir", tmp_path / "runs", "--profile", "16gb", "--json", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    data = as_json(result)
    scheme = load_profile("16gb").dit_scheme
    assert data["settings"]["profile"]["name"] == "16gb" and data["settings"]["profile"]["dit_scheme"] == scheme
    if scheme in ("fp8", "int8"):
        assert (model / "lowvram-cache" / f"dit-{scheme}.safetensors").is_file()
    assert any("memory budget is not checked" in w for w in data["warnings"])


# --- bad input: one line, exit code 2 --------------------------------------------------------


@pytest.fixture(scope="module")
def partial_model(tiny_official, tmp_path_factory):
    model = tmp_path_factory.mktemp("partial") / "ckpts"
    shutil.copytree(tiny_official, model)
    (model / "hunyuan-video-t2v-720p/vae/pytorch_model.pt").unlink()
    return model


@pytest.fixture(scope="module")
def full_size_config_model(tiny_diffusers, tmp_path_factory):
    """The tiny diffusers checkpoint with the 13B transformer config: the CUDA check reads the
    config, so this is a "real-size" model without 25 GB of weights."""
    model = tmp_path_factory.mktemp("big") / "ckpts"
    shutil.copytree(tiny_diffusers, model)
    (model / "transformer/config.json").write_text(json.dumps(DIT_CONFIGS["HYVideo-T/2-cfgdistill"].to_diffusers()))
    return model


@pytest.fixture(scope="module")
def bad_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "broken.toml"
    path.write_text('name = "broken"\nvram_budget_gb = [16\n')
    return path


BAD_GENERATE = [
    (["--frames", "8"], r"--frames must be 4k\+1.*try 5 or 9"),
    (["--size", "100x48"], "width must be a positive multiple of 16; got 100, try 112"),
    (["--size", "8000x8000"], "larger than any HunyuanVideo bucket"),
    (["--size", "big"], "--size must be WIDTHxHEIGHT"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--size", "64x48", "--resolution", "540p"], "either --size or --resolution"),
    (["--resolution", "1080p"], "--resolution must be one of 540p, 720p"),
    (["--profile", "nope"], "unknown profile 'nope'; available: plain, 24gb"),
    (["--out", "/nonexistent-dir/x.mp4"], "cannot write --out .*does not exist"),
    (["--cache", "faster"], "--cache must be one of off, safe, fast"),
    (["--attention", "xformers"], "--attention must be one of auto, sdpa, sage, flash"),
    (["--out", "x.png"], "--frames 9 makes an mp4 video; name it x.mp4 or pass a folder"),
    (["--frames", "1", "--out", "x.mp4"], "--frames 1 makes a PNG image; name it x.png"),
]


@pytest.mark.parametrize("args,message", BAD_GENERATE, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD_GENERATE)])
def test_bad_generate_arguments(tiny_official, tmp_path, args, message):
    base = ["--frames", "9", "--steps", "2", "--device", "cpu"]
    if "--size" not in args and "--resolution" not in args:
        base += ["--size", "64x48"]
    result = invoke("generate", "a fox", "--model-dir", tiny_official, "--runs-dir", tmp_path, *base, *args)
    assert result.exit_code == 2, result.output
    assert re.search(message, one_line_error(result)), one_line_error(result)
    assert not any(tmp_path.iterdir())  # nothing started


def test_empty_and_missing_prompt(tiny_official, tmp_path):
    empty = invoke("generate", "  ", "--model-dir", tiny_official, "--runs-dir", tmp_path, *TINY_ARGS)
    assert empty.exit_code == 2 and "the prompt is empty" in one_line_error(empty)
    missing = invoke("generate", "--model-dir", tiny_official, "--runs-dir", tmp_path, *TINY_ARGS)
    assert missing.exit_code == 2 and "no prompt" in one_line_error(missing)


def test_missing_and_partial_weights_name_the_file_and_the_download(tmp_path, partial_model):
    empty = invoke("generate", "a fox", "--model-dir", tmp_path / "nothing", "--runs-dir", tmp_path, *TINY_ARGS)
    assert empty.exit_code == 2 and "does not exist" in one_line_error(empty) and "lowvram download" in one_line_error(empty)
    partial = invoke("generate", "a fox", "--model-dir", partial_model, "--runs-dir", tmp_path / "runs", *TINY_ARGS)
    line = one_line_error(partial)
    assert partial.exit_code == 2 and "hunyuan-video-t2v-720p/vae/pytorch_model.pt" in line and "lowvram download" in line


def test_malformed_profile_toml(tiny_official, tmp_path, bad_profile):
    result = invoke("generate", "a fox", "--model-dir", tiny_official, "--runs-dir", tmp_path, "--profile", bad_profile, *TINY_ARGS)
    assert result.exit_code == 2 and "not valid TOML" in one_line_error(result) and "broken.toml" in one_line_error(result)


@pytest.mark.skipif(CUDA, reason="checks the no-CUDA message")
def test_real_size_model_without_cuda(full_size_config_model, tmp_path):
    result = invoke("generate", "a fox", "--model-dir", full_size_config_model, "--runs-dir", tmp_path, "--size", "64x48",
                    "--frames", "9")
    line = one_line_error(result)
    assert result.exit_code == 2 and "12.8 B parameters" in line and "needs an NVIDIA GPU with CUDA" in line
    assert "lowvram demo" in line
    cuda = invoke("generate", "a fox", "--model-dir", full_size_config_model, "--runs-dir", tmp_path, "--device", "cuda")
    assert cuda.exit_code == 2 and "sees no CUDA" in one_line_error(cuda)


def test_a_profile_that_does_not_fit_names_one_that_would():
    """The 13B model at 720p x 129 on an 8 GiB card: 24gb does not fit; 12gb would."""
    from lowvram.planner import resolve
    from lowvram.profiles import settle_profile

    memory = {"vram_bytes": 8 * 2**30, "ram_bytes": 64 * 2**30}
    with pytest.raises(HyVideoError, match=r"profile 24gb does not fit 1280x720x129 here.*try --profile \w+"):
        resolve(settle_profile("24gb"), 1280, 720, 129, alternatives=settle_profile("auto"), **memory)
    assert resolve(settle_profile("auto"), 1280, 720, 129, **memory)[0].name != "24gb"


def test_corrupt_foreign_and_edited_run_folders(done, runs_dir, tmp_path):
    source = Path(done["folder"])
    corrupt = tmp_path / "corrupt"
    shutil.copytree(source, corrupt)
    (corrupt / "manifest.json").write_text("{not json")
    result = invoke("resume", corrupt, "--runs-dir", tmp_path)
    assert result.exit_code == 2 and "is corrupt" in one_line_error(result)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    result = invoke("resume", foreign, "--runs-dir", tmp_path)
    assert result.exit_code == 2 and "not a lowvram run folder" in one_line_error(result)

    edited = tmp_path / "edited"
    shutil.copytree(source, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["settings"]["prompt"] = "a different prompt"
    manifest["state"] = "denoising"
    (edited / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("resume", edited, "--runs-dir", tmp_path, "--json")
    assert result.exit_code == 2 and "changed after run" in as_json(result)["error"]

    table = as_json(invoke("runs", "--runs-dir", tmp_path, "--json"))["runs"]
    assert {r["id"]: r["state"] for r in table} == {"corrupt": "unreadable", "edited": "unreadable"}


# --- plan, profiles --------------------------------------------------------------------------


def test_plan_json_fits_on_24gb():
    result = invoke("plan", "--profile", "24gb", "--resolution", "720p", "--aspect", "16:9", "--frames", "129",
                    "--vram", "24", "--ram", "64", "--json")
    assert result.exit_code == 0, result.output
    plan = as_json(result)
    assert plan["fits"] is True and plan["profile"] == "24gb"
    assert plan["video"] == {"width": 1280, "height": 720, "frames": 129}
    for stage in ("text", "dit", "vae"):
        assert plan["stages"][stage]["vram_gb"] > 0 and plan["stages"][stage]["ram_gb"] > 0
    assert plan["peak_vram_gb"] == max(s["vram_gb"] for s in plan["stages"].values())


def test_plan_that_does_not_fit_exits_1_and_names_what_would():
    result = invoke("plan", "--profile", "24gb", "--vram", "8", "--ram", "64", "--json")
    assert result.exit_code == 1
    plan = as_json(result)
    assert plan["fits"] is False and plan["suggestion"].startswith("--profile")
    table = invoke("plan", "--profile", "24gb", "--vram", "8", "--ram", "64")
    assert table.exit_code == 1 and "peak" in table.stdout and "try --profile" in table.stderr


def test_plan_with_a_step_cache_shows_its_forwards_and_memory(tmp_path):
    """--cache adds the probe (block 0's FP8 image modulation, 3072 x 18432 + scales = 54 MiB) on the
    GPU and on the host the residual (118,800 tokens x 3072 x bf16 = 0.68 GiB, twice while written) and
    the previous step's latents."""
    args = ["plan", "--profile", "16gb", "--resolution", "720p", "--frames", "129", "--vram", "16", "--ram", "64"]
    off, fast = as_json(invoke(*args, "--json")), as_json(invoke(*args, "--cache", "fast", "--json"))
    assert off["step_cache"] == {"preset": "off", "steps": 50, "expected_dit_forwards": [50, 50]}
    assert fast["step_cache"] == {"preset": "fast", "steps": 50, "expected_dit_forwards": [22, 24]}
    dit = fast["stages"]["dit"]
    assert dit["parts_gb"]["step cache probe"] * 1024 == pytest.approx(54.1, abs=0.1)
    residual, previous_latents = 118_800 * 3072 * 2, 16 * 33 * 90 * 160 * 4  # bf16 tokens; float32 latents
    assert dit["ram_parts_gb"]["step cache"] * 2**30 == 2 * residual + previous_latents
    assert "step cache probe" not in off["stages"]["dit"]["parts_gb"]
    table = invoke(*args, "--cache", "safe")
    assert table.exit_code == 0 and "expected to run on 31-34 of 50 steps" in table.stdout
    profile = tmp_path / "cached.toml"
    profile.write_text('name = "cached"\nvram_budget_gb = 16\nstep_cache = "safe"\n')  # the same words as --cache
    from_file = as_json(invoke("plan", "--profile", profile, "--vram", "16", "--ram", "64", "--json"))["step_cache"]
    assert from_file == {"preset": "safe", "steps": 50, "expected_dit_forwards": [31, 34]}
    profile.write_text('name = "cached"\nvram_budget_gb = 16\nstep_cache = "magic"\n')
    bad = invoke("plan", "--profile", profile, "--vram", "16")
    assert bad.exit_code == 2 and "field 'step_cache' must be one of off, safe, fast" in one_line_error(bad)


def test_plan_counts_a_lora_for_the_13b_model(tmp_path):
    """A kohya LoRA of rank 8 on every double block's img_attn_qkv (3072 -> 9216): each double block
    gains 8 x (3072 + 9216) bf16 elements = 192 KiB in the resident blocks and the ring."""
    from safetensors.torch import save_file

    rank, path = 8, tmp_path / "style.safetensors"
    tensors = {}
    for i in range(20):
        key = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        tensors[f"{key}.lora_down.weight"] = torch.zeros(rank, 3072, dtype=torch.bfloat16)
        tensors[f"{key}.lora_up.weight"] = torch.zeros(9216, rank, dtype=torch.bfloat16)
    save_file(tensors, path)
    args = ["plan", "--profile", "24gb", "--resolution", "540p", "--frames", "33", "--vram", "80", "--ram", "64", "--json"]
    without, with_lora = as_json(invoke(*args))["stages"]["dit"], as_json(invoke(*args, "--lora", f"{path}:0.5"))["stages"]["dit"]
    blocks = lambda dit: dit["parts_gb"]["resident blocks"] + dit["parts_gb"]["ring"]
    assert (blocks(with_lora) - blocks(without)) * 2**30 == pytest.approx(20 * rank * (3072 + 9216) * 2)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(rank, 64)}, tmp_path / "bad.safetensors")
    bad = invoke("plan", "--profile", "24gb", "--vram", "24", "--lora", tmp_path / "bad.safetensors")
    assert bad.exit_code == 2 and one_line_error(bad).startswith("error:")


def test_plan_auto_picks_a_profile():
    result = invoke("plan", "--resolution", "540p", "--aspect", "9:16", "--vram", "16", "--ram", "64", "--json")
    assert result.exit_code == 0 and as_json(result)["video"] == {"width": 544, "height": 960, "frames": 129}


def test_profiles_list_show_and_unknown(bad_profile):
    listed = as_json(invoke("profiles", "--json"))["profiles"]
    assert {"24gb", "16gb"} <= {p["name"] for p in listed}
    assert "24gb" in invoke("profiles").stdout
    shown = as_json(invoke("profiles", "show", "16gb", "--json"))
    assert shown["name"] == "16gb" and shown["vram_budget_gb"] == 16
    assert "dit_scheme =" in invoke("profiles", "show", "16gb").stdout
    unknown = invoke("profiles", "show", "nope")
    assert unknown.exit_code == 2 and "unknown profile" in one_line_error(unknown)
    broken = invoke("profiles", "show", bad_profile)
    assert broken.exit_code == 2 and "not valid TOML" in one_line_error(broken)


# --- doctor, download, quantize, demo ---------------------------------------------------------


def test_doctor_json(tiny_official, partial_model, tmp_path):
    result = invoke("doctor", "--model-dir", tiny_official, "--runs-dir", tmp_path, "--json")
    report = as_json(result)
    names = {c["name"]: c for c in report["checks"]}
    assert {"torch", "CUDA", "bitsandbytes", "optimum-quanto", "flash-attn", "pinned memory limit (ulimit -l)", "weights"} <= names.keys()
    assert names["weights"]["status"] == "ok" and all(f["status"] == "ok" for f in report["files"])
    assert result.exit_code == (0 if report["ok"] else 1)
    if CUDA:
        assert {"GPU", "VRAM", "compute capability", "FP8 tensor cores"} <= names.keys()
    partial = as_json(invoke("doctor", "--model-dir", partial_model, "--json"))
    weights = next(c for c in partial["checks"] if c["name"] == "weights")
    assert weights["status"] == "fail" and "pytorch_model.pt: missing" in weights["detail"]
    assert "weights" in invoke("doctor", "--model-dir", tiny_official).stdout


class DryRunInfo:
    def __init__(self, filename, size):
        self.filename, self.file_size, self.will_download = filename, size, True


def test_download_dry_run_and_offline(monkeypatch, tmp_path):
    def hub(repo, local_dir, allow_patterns, dry_run=False, **kwargs):
        assert dry_run, "the dry run must not download"
        return [DryRunInfo("transformer/diffusion_pytorch_model-00001-of-00006.safetensors", 4_900_000_000),
                DryRunInfo("vae/config.json", 785)]

    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    result = invoke("download", "--model-dir", tmp_path, "--dry-run", "--json")
    assert result.exit_code == 0
    listing = as_json(result)
    assert listing["total_bytes"] == 4_900_000_785 and len(listing["files"]) == 2
    assert "4.90 GB" in invoke("download", "--model-dir", tmp_path, "--dry-run").stdout

    def no_network(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    offline = invoke("download", "--model-dir", tmp_path)
    assert offline.exit_code == 2 and "cannot download from huggingface.co" in one_line_error(offline)
    assert "hf download hunyuanvideo-community/HunyuanVideo" in offline.stderr and str(tmp_path) in offline.stderr


def test_quantize_builds_both_caches_once(tiny_official, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_official, model)
    shutil.rmtree(model / "text_encoder")  # widths bitsandbytes' CPU kernel takes (see test_quant_nf4.py)
    write_text_encoder(model / "text_encoder", "llm", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    nf4_reason = nf4_unavailable_reason("cuda" if CUDA else "cpu")
    first = invoke("quantize", "--model-dir", model, "--json")
    assert first.exit_code == 0, first.output
    data = as_json(first)
    assert data["cache_dir"] == str(model / "lowvram-cache")
    assert data["dit"]["found"] == "missing" and (model / "lowvram-cache/dit-fp8.safetensors").is_file()
    if nf4_reason is None:
        assert data["encoder"]["found"] == "missing" and (model / "lowvram-cache/llm-nf4/hyvideo-cache.json").is_file()
    else:  # no NF4 here: the DiT is still built, and the encoder's reason reported
        assert data["encoder"] == {"skipped": nf4_reason}

    again = as_json(invoke("quantize", "--model-dir", model, "--json"))
    assert again["dit"]["found"] == "fresh"
    assert (again["encoder"] == {"skipped": nf4_reason}) if nf4_reason else (again["encoder"]["found"] == "fresh")
    summary = invoke("quantize", "--model-dir", model, "--only", "dit").stdout
    assert summary.strip() == f"DiT: already cached in {model / 'lowvram-cache/dit-fp8.safetensors'}"
    only = as_json(invoke("quantize", "--model-dir", model, "--only", "dit", "--scheme", "fp8", "--policy", "blocks-no-mod", "--json"))
    assert "encoder" not in only and only["dit"]["found"] == "stale" and only["dit"]["reason"] == "policy changed"

    bad = invoke("quantize", "--model-dir", model, "--scheme", "int4")
    assert bad.exit_code == 2 and "unknown DiT quantization scheme" in one_line_error(bad)
    bad = invoke("quantize", "--model-dir", model, "--only", "vae")
    assert bad.exit_code == 2 and "--only takes dit or encoder" in one_line_error(bad)


@pytest.mark.slow
def test_quantize_cache_dir_is_what_generate_reads(tiny_official, tmp_path):
    """`quantize --cache-dir X` then `generate --cache-dir X`: the run loads that cache as it is
    (same dtype on this machine) and writes nothing beside the model."""
    model, cache = tmp_path / "model", tmp_path / "cache"
    shutil.copytree(tiny_official, model)
    built = invoke("quantize", "--model-dir", model, "--cache-dir", cache, "--only", "dit", "--json")
    assert built.exit_code == 0, built.output
    weights = cache / "dit-fp8.safetensors"
    stamp = weights.stat().st_mtime_ns
    result = invoke("generate", "a fox", "--model-dir", model, "--runs-dir", tmp_path / "runs", "--profile", "16gb",
                    "--cache-dir", cache, "--json", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    assert as_json(result)["settings"]["cache_dir"] == str(cache.resolve())
    assert weights.stat().st_mtime_ns == stamp and not (model / "lowvram-cache" / "dit-fp8.safetensors").exists()


def test_quantize_encoder_alone_says_why_not(tiny_official, tmp_path):
    """The default tiny LLM has 24-wide k/v layers; where NF4 cannot run them, `--only encoder`
    fails with the reason (and writes no cache)."""
    model = shutil.copytree(tiny_official, tmp_path / "model")
    result = invoke("quantize", "--model-dir", model, "--only", "encoder")
    if result.exit_code == 0:
        assert "text encoder: built" in result.stdout and "DiT" not in result.stdout
    else:
        assert result.exit_code == 2 and "cannot build the NF4 text encoder cache" in one_line_error(result)
        assert not (model / "lowvram-cache/llm-nf4").exists()


@pytest.mark.slow
def test_demo_saves_a_model_that_generate_uses(tmp_path):
    small = ["--size", "64x48", "--frames", "5", "--steps", "2", "--device", "cpu", "--json"]
    model = tmp_path / "tiny"
    result = invoke("demo", "--save-model", model, "--runs-dir", tmp_path / "runs", *small)
    assert result.exit_code == 0, result.output
    assert as_json(result)["state"] == "done" and as_json(result)["settings"]["model_dir"] == str(model.resolve())
    again = invoke("generate", "a fox", "--model-dir", model, "--runs-dir", tmp_path / "runs", "--json", *TINY_ARGS)
    assert again.exit_code == 0 and as_json(again)["state"] == "done"
    assert as_json(again)["settings"]["profile"]["name"] == "plain"  # auto on the CPU: all resident, one tile
    assert as_json(again)["stats"]["dit"]["blocks_copied_per_step"] == [0, 0] and as_json(again)["stats"]["vae"]["tiles"] == 1
    assert as_json(again)["stats"]["dit"]["fp8_matmul"] is None  # bf16: no quantized linears
    for folder, model_class in (("text_encoder", LlamaForCausalLM), ("text_encoder_2", CLIPTextModel)):  # standard files
        loading = model_class.from_pretrained(model / folder, output_loading_info=True)[1]
        assert not loading["missing_keys"] and not loading["unexpected_keys"], folder
    default = invoke("demo", "--runs-dir", tmp_path / "other", *small)  # kept in RUNS_DIR/demo-model
    assert default.exit_code == 0 and (tmp_path / "other/demo-model/hunyuan-video-t2v-720p").is_dir()


@pytest.mark.slow
def test_demo_takes_the_streamed_and_tiled_path(tmp_path):
    """The demo runs the low-VRAM code path users run: FP8 DiT from the quantize-once cache with 3 of
    its 4 blocks streamed every step, token chunks, and the VAE decoded in tiles."""
    result = invoke("demo", "--runs-dir", tmp_path, "--size", "128x96", "--frames", "17", "--steps", "2", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    data = as_json(result)
    assert data["settings"]["profile"]["name"] == "demo" and data["settings"]["profile"]["dit_scheme"] == "fp8"
    dit = data["stats"]["dit"]
    assert (dit["resident_blocks"], dit["streamed_blocks"]) == (1, 3)
    assert dit["blocks_copied_per_step"] == [3, 3] and all(b > 0 for b in dit["bytes_copied_per_step"])
    assert dit["fp8_matmul"] == "dequant"  # the demo profile's default; no FP8 tensor cores on the CPU
    # latents 5 x 12 x 16: 2 temporal tiles (4+1 frames every 3) x 2 x 3 spatial tiles (8 every 6)
    assert data["stats"]["vae"]["tiles"] == 12
    assert (tmp_path / "demo-model/lowvram-cache/dit-fp8.safetensors").is_file()


def test_help_lists_every_command():
    """The Commands panel of `lowvram --help`, name by name, in the order it shows them (a
    continuation line of a description starts with spaces, not a name)."""
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    panel = result.stdout.split("Commands", 1)[1]
    assert re.findall(r"^│ (\S+) ", panel, flags=re.M) == [
        "plan", "bench", "generate", "rewrite", "resume", "demo", "runs", "doctor", "download", "quantize", "profiles"]


def test_default_model_dir_prefers_ckpts_then_the_hub_cache(tiny_official, tiny_diffusers, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asked = []

    def cached(repo, local_files_only=False, **kwargs):
        asked.append(repo)
        assert local_files_only, "finding the default folder must not download"
        if repo == "hunyuanvideo-community/HunyuanVideo":
            return str(tiny_diffusers)
        raise FileNotFoundError(repo)

    monkeypatch.setattr("huggingface_hub.snapshot_download", cached)
    assert default_model_dir() == Path(tiny_diffusers) and asked == ["hunyuanvideo-community/HunyuanVideo"]
    shutil.copytree(tiny_official, tmp_path / "ckpts")
    assert default_model_dir() == Path("ckpts")
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo, **kw: (_ for _ in ()).throw(FileNotFoundError(repo)))
    shutil.rmtree(tmp_path / "ckpts")
    assert default_model_dir() == Path("ckpts")  # nothing anywhere: the error will name ./ckpts
