"""`lowvram` as real processes on the tiny model: killed with SIGKILL mid-run, or stopped with
Ctrl-C (SIGINT), a run resumes from its last complete step and ends with final latents identical,
bit for bit, to an uninterrupted run's. Only what needs a process is one (the run that is killed or
stopped, `python -m cli` and the console script); the reference runs and the resumes run here."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import (
    PROMPT, ROOT, as_json, final_latents, invoke, killed_after_a_step, manifest, run, start_and_wait_for_step,
    uninterrupted_latents,
)

pytestmark = pytest.mark.slow  # every test starts `lowvram` as a process

# 64x48 px, 9 frames, 30 steps: 0.02-0.1 s per step on 2 CPU cores, a window of 1-3 s to
# interrupt in, after at least one step is saved and before the last.
STEPS = 30
ARGS = ["--size", "64x48", "--frames", "9", "--steps", str(STEPS), "--seed", "21", "--device", "cpu"]


@pytest.fixture(scope="module")
def reference(tiny_official, tmp_path_factory):
    return uninterrupted_latents(tiny_official, tmp_path_factory.mktemp("reference"), ARGS)


@pytest.mark.parametrize("step_cache", [None, "fast"])
def test_resume_after_sigkill_is_bit_identical(tiny_official, tmp_path, reference, step_cache):
    """Also with a step cache, whose state (residual, previous latents, distance) is checkpointed."""
    args = ARGS + (["--cache", step_cache] if step_cache else [])
    if step_cache:
        reference = uninterrupted_latents(tiny_official, tmp_path / "reference", args)
    runs_dir = tmp_path / "runs"
    killed = killed_after_a_step(runs_dir, tiny_official, args)
    assert killed["state"] == "denoising" and 1 <= killed["step"] < STEPS, killed["step"]
    assert ("cache" in killed["checkpoints"][-1]) == bool(step_cache)

    resumed = invoke("resume", "--runs-dir", runs_dir, "--json")
    assert resumed.exit_code == 0, resumed.output
    result = as_json(resumed)
    assert result["state"] == "done" and result["resumed_from"].startswith("step ")
    assert int(result["resumed_from"].split()[1].split("/")[0]) >= killed["step"]
    assert final_latents(resumed.stdout).equal(reference)
    if step_cache:
        assert len(result["stats"]["dit"]["computed_steps"]) < STEPS  # steps were skipped
    folder = Path(result["folder"])
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name]  # a killed write's temp file is cleaned up


def test_ctrl_c_saves_prints_resume_and_exits_130(tiny_official, tmp_path, reference):
    process, _ = start_and_wait_for_step(tmp_path, tiny_official, args=ARGS)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    stopped = manifest(tmp_path)
    assert f"lowvram resume {stopped['id']}" in stderr and "stopping after this step" in stderr
    assert 1 <= stopped["step"] <= STEPS and stopped["state"] == "denoising"

    resumed = invoke("resume", stopped["id"], "--runs-dir", tmp_path, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert final_latents(resumed.stdout).equal(reference)

    listed = as_json(invoke("runs", "--runs-dir", tmp_path, "--json"))["runs"]
    assert [(r["id"], r["state"], r["step"]) for r in listed] == [(stopped["id"], "done", STEPS)]


def test_console_script_and_module_help():
    helped = run("--help", timeout=60)
    assert helped.returncode == 0 and "generate" in helped.stdout and "resume" in helped.stdout
    script = shutil.which("lowvram", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the `lowvram` console script is not installed (pip install -e .)")
    installed = subprocess.run([script, "profiles", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert installed.returncode == 0 and json.loads(installed.stdout)["profiles"]


def streaming_profile(folder: Path) -> Path:
    """The 16gb profile with one of the tiny model's 4 blocks resident (under 16gb itself all 4 fit,
    and nothing would stream), small token chunks and VAE tiles, and one SDPA kernel pinned: with
    `auto` each process picks its kernel by timing, and two runs may then differ in the last bit."""
    from lowvram.profiles import load_profile

    values = {**load_profile("16gb").to_dict(), "name": "16gb-streamed", "resident_blocks": 1, "prefetch_depth": 1,
              "token_chunk": 64, "vae_spatial_tile": 8, "vae_temporal_tile": 4, "attention": "sdpa:efficient"}
    path = folder / "16gb-streamed.toml"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


@pytest.mark.cuda
def test_cuda_resume_after_sigkill_is_bit_identical(tiny_official, tmp_path):
    """The GPU path (the 16gb profile's FP8 DiT from the cache, three of four blocks streamed from
    pinned memory on the side stream, tiled VAE, one attention kernel): SIGKILL mid-run, resume,
    the same final latents as an uninterrupted run."""
    args = [*ARGS[:-1], "cuda", "--profile", streaming_profile(tmp_path)]
    model = tmp_path / "model"
    shutil.copytree(tiny_official, model)
    done = run("generate", PROMPT, "--model-dir", model, "--runs-dir", tmp_path / "reference", "--json", *args)
    assert done.returncode == 0, done.stderr
    reference = json.loads(done.stdout)
    assert reference["settings"]["attention"] == "sdpa:efficient"
    dit = reference["stats"]["dit"]
    assert dit["streamed_blocks"] == 3 and dit["pinned_bytes"] > 0, dit
    expected = load_file(reference["final_latents"])["latents"]
    assert killed_after_a_step(tmp_path / "killed", model, args)["state"] == "denoising"
    resumed = run("resume", "--runs-dir", tmp_path / "killed", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert load_file(json.loads(resumed.stdout)["final_latents"])["latents"].equal(expected)


def test_the_cuda_resume_profile_streams_the_tiny_model_with_one_pinned_kernel(tmp_path):
    """What the CUDA resume test relies on, checked here: its profile plans 3 of the tiny model's 4
    blocks streamed at its size (16gb itself keeps all 4 resident) and names one SDPA kernel."""
    from hyvideo.config import DIT_CONFIGS
    from lowvram.attention_choice import candidates, check_choice
    from lowvram.planner import plan
    from lowvram.profiles import load_profile

    profile = load_profile(str(streaming_profile(tmp_path)))
    tiny = DIT_CONFIGS["tiny"]
    assert len(plan(profile, 64, 48, 9, dit_config=tiny, text_encoders=()).schedule.streamed) == 3
    assert not plan(load_profile("16gb"), 64, 48, 9, dit_config=tiny, text_encoders=()).schedule.streamed
    check_choice(profile.attention)
    assert candidates(profile.attention)[0] == "sdpa:efficient"
