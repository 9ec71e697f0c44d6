"""`lowvram generate/resume --gpus N` as real processes on the CPU (ranks talk gloo): the split run
equals a one-process run within float32 rounding, a SIGKILL of a rank leaves a run that resumes
bit-identically on the same number of ranks and closely on another, and impossible requests are
one-line errors before any rank starts."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app

from tests.helpers import (
    PROMPT, ROOT, env, final_latents, invoke, lowvram, manifest, run, start_and_wait_for_step, uninterrupted_latents,
)

pytest.importorskip("yunchang")

# 64x48 px (a 4 x 3 token grid: its 4 rows halve), 9 frames, 12 steps: 0.1-0.3 s per step on two
# CPU ranks, a window of 1-3 s to kill a rank in after step 1 is saved.
STEPS = 12
ARGS = ["--size", "64x48", "--frames", "9", "--steps", str(STEPS), "--seed", "21", "--device", "cpu"]
# A streamed FP8 profile at the tiny model's scale (one block resident, the rest through the ring,
# per-token work in chunks): each rank places its DiT this way.
STREAMED = """name = "streamed"
description = "tiny FP8 DiT, one block resident"
vram_budget_gb = 2.0
dit_scheme = "fp8"
resident_blocks = 1
prefetch_depth = 1
token_chunk = 16
encoder_scheme = "bf16"
vae_spatial_tile = 8
vae_temporal_tile = 4
pin_memory = true
pinned_ram_cap_gb = 1.0
"""
# Float32 on both sides; the ranks add the same terms in another order each step (keys permuted by
# the all-to-all, ring blocks merged by log-sum-exp) and the Euler steps carry it on: measured
# 5e-7 on latents of about 4 (Ulysses and ring alike). 1e-4 leaves room and still fails on any real mistake
# (a token in the wrong place or a text key counted twice changes latents by ~1e-1).
ATOL = 1e-4


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the launcher's child that runs `rank` (its environment says RANK=<rank>)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == launcher_pid and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (OSError, IndexError, ValueError):
            continue
    raise AssertionError(f"no rank {rank} under process {launcher_pid}")


@pytest.fixture(scope="module")
def one_process(tiny_official, tmp_path_factory):
    return uninterrupted_latents(tiny_official, tmp_path_factory.mktemp("one"), ARGS)


@pytest.fixture(scope="module")
def two_ranks_batch(tiny_official, tmp_path_factory) -> list[dict]:
    """A batch of two clips on two ranks, mixed sizes: the ARGS clip, then the same at 64x64 (one
    launch serves every test here that needs an uninterrupted run on two ranks)."""
    folder = tmp_path_factory.mktemp("two")
    prompts = folder / "prompts.txt"
    prompts.write_text(f'{PROMPT}\n{{"prompt": "{PROMPT}", "size": "64x64"}}\n')
    batch = run("generate", "--prompts", prompts, "--model-dir", tiny_official, "--runs-dir", folder, "--json", *ARGS,
                "--gpus", "2")
    assert batch.returncode == 0, batch.stderr
    return json.loads(batch.stdout)["runs"]


@pytest.fixture(scope="module")
def two_ranks(two_ranks_batch):
    """Final latents of the ARGS run on two ranks: the batch's first clip. That a clip of a batch
    gives what it gives alone, bit for bit, is checked where a single run is resumed to these
    latents (test_a_rank_killed_or_ctrl_c_then_resume)."""
    return load_file(two_ranks_batch[0]["final_latents"])["latents"]


@pytest.mark.slow
def test_two_ranks_equal_one_process(two_ranks, one_process):
    torch.testing.assert_close(two_ranks, one_process, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_a_batch_on_two_ranks(two_ranks_batch):
    """A batch places the DiT once on every rank and sends each clip in turn, each at its size."""
    first, second = two_ranks_batch
    assert (first["settings"]["width"], first["settings"]["height"]) == (64, 48)
    assert (second["settings"]["width"], second["settings"]["height"]) == (64, 64)
    assert first["state"] == second["state"] == "done"
    assert first["settings"]["parallel"]["ranks"] == second["settings"]["parallel"]["ranks"] == 2


@pytest.mark.slow
def test_ring_on_a_streamed_fp8_profile_with_a_step_cache(tiny_official, tmp_path):
    """Each rank places the DiT per the profile (FP8, one block resident, the rest streamed); the
    step cache decides on sums over every rank's tokens, so the ranks skip the same steps as one
    process does."""
    profile = tmp_path / "streamed.toml"
    profile.write_text(STREAMED)
    args = ARGS + ["--profile", profile, "--cache", "fast", "--cache-dir", tmp_path / "fp8"]  # not beside the shared model
    alone = invoke("generate", PROMPT, "--model-dir", tiny_official, "--runs-dir", tmp_path / "one", "--json", *args)
    split = run("generate", PROMPT, "--model-dir", tiny_official, "--runs-dir", tmp_path / "two", "--json", *args,
                "--gpus", "2", "--parallel", "ring")
    assert alone.exit_code == 0, alone.output
    assert split.returncode == 0, split.stderr
    result = json.loads(split.stdout)  # one JSON document: the followers print nothing on stdout
    assert result["settings"]["parallel"] == {"ranks": 2, "ulysses": 1, "ring": 2}
    assert result["stats"]["dit"]["streamed_blocks"] == 3
    assert result["stats"]["dit"]["computed_steps"] == json.loads(alone.stdout)["stats"]["dit"]["computed_steps"]
    assert len(result["stats"]["dit"]["computed_steps"]) < STEPS
    torch.testing.assert_close(final_latents(split.stdout), final_latents(alone.stdout), rtol=0, atol=ATOL)


def wait_for_step_after(runs: Path, step: int, process: subprocess.Popen) -> None:
    """Until the run's manifest says a step after `step` is saved (the process must still run)."""
    while (manifest(runs) or {}).get("step", 0) <= step or manifest(runs)["state"] != "denoising":
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)


def killed_rank(launcher: subprocess.Popen, victim: int, resume_hint: str, runs: Path) -> dict:
    """SIGKILL one rank of `launcher`: the launcher stops the other and says how to continue."""
    os.kill(rank_pid(launcher.pid, victim), signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert f"rank {victim} was killed by signal 9 (SIGKILL)" in last and resume_hint in last, stderr
    assert "Traceback" not in stderr
    killed = manifest(runs)
    assert killed["state"] in ("denoising", "failed") and 1 <= killed["step"] < STEPS
    return killed


@pytest.mark.slow
def test_a_rank_killed_or_ctrl_c_then_resume(tiny_official, tmp_path, two_ranks, one_process):
    """One run interrupted three ways, each continued by the next: a follower killed (SIGKILL),
    the terminal's Ctrl-C during the resume, rank 0 killed during the resume after that. A killed
    rank: the launcher stops the other and says how to continue. Ctrl-C reaches every process of
    the group: rank 0 finishes the step, every rank stops after it, rank 0 says how to continue.
    The last checkpoint continues bit-identically on 2 ranks, and on 1 process within float32
    rounding. (One run for all three: each interruption costs one launch of three processes.)"""
    runs = tmp_path / "run"
    launcher, _ = start_and_wait_for_step(runs, tiny_official, args=ARGS + ["--gpus", "2"])
    killed = killed_rank(launcher, 1, "lowvram resume --gpus 2", runs)
    elsewhere = tmp_path / "on-one"
    shutil.copytree(runs, elsewhere)  # the same checkpoint, continued on one process at the end

    resume = lowvram("resume", "--runs-dir", runs)  # as many ranks as the run used
    launcher = subprocess.Popen(resume, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    wait_for_step_after(runs, killed["step"], launcher)
    os.killpg(launcher.pid, signal.SIGINT)  # what the terminal does
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, stderr
    assert "continue with: lowvram resume" in stderr and "Traceback" not in stderr and "rank 1" not in stderr
    stopped = manifest(runs)
    assert stopped["state"] == "denoising" and killed["step"] < stopped["step"] < STEPS

    launcher = subprocess.Popen(resume, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step_after(runs, stopped["step"], launcher)
    killed_rank(launcher, 0, f"lowvram resume {stopped['id']} --gpus 2", runs)

    resumed = run("resume", "--runs-dir", runs, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.equal(final_latents(resumed.stdout), two_ranks)
    alone = invoke("resume", "--runs-dir", elsewhere, "--json", "--gpus", "1")
    assert alone.exit_code == 0, alone.output
    warnings = json.loads(alone.stdout)["warnings"]
    assert any("on 2 ranks (Ulysses 2 x ring 1), now on 1 process" in w for w in warnings), warnings
    torch.testing.assert_close(final_latents(alone.stdout), one_process, rtol=0, atol=ATOL)


@pytest.mark.parametrize("extra, words", [
    (["--gpus", "3", "--parallel", "ulysses"], "2 heads do not divide into 3"),
    (["--gpus", "2", "--size", "48x48"], "3x3 token grid"),
    (["--gpus", "0"], "--gpus must be at least 1"),
])
def test_impossible_requests_fail_before_any_rank_starts(tiny_official, tmp_path, extra, words):
    args = [*ARGS, *extra] if "--size" not in extra else [*ARGS[2:], *extra]  # ARGS[:2] is its --size
    result = CliRunner().invoke(app, ["generate", PROMPT, "--model-dir", str(tiny_official), "--runs-dir",
                                      str(tmp_path), *map(str, args)])
    assert result.exit_code == 2, result.output
    assert words in result.output and result.output.count("error:") == 1, result.output
    assert not list(tmp_path.iterdir())  # no run folder


def test_more_gpus_than_visible_is_one_line(tiny_official, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = CliRunner().invoke(app, ["generate", PROMPT, "--model-dir", str(tiny_official), "--runs-dir", str(tmp_path),
                                      "--device", "cuda", "--gpus", "3"])
    assert result.exit_code == 2
    assert "--gpus 3, but 2 CUDA GPUs are visible" in result.output and "use --gpus 2" in result.output


@pytest.mark.cuda
@pytest.mark.slow
def test_two_gpus_equal_one(tiny_official, tmp_path):
    """The NCCL path on two real GPUs, the tiny model in bf16: within 2 % of one GPU's latents (the
    ranks round bf16 sums in another order: 0.4 % per rounding, a few per block and step)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    args = [a if a != "cpu" else "cuda" for a in ARGS] + ["--cache-dir", tmp_path / "cache"]
    alone = run("generate", PROMPT, "--model-dir", tiny_official, "--runs-dir", tmp_path / "one", "--json", *args)
    split = run("generate", PROMPT, "--model-dir", tiny_official, "--runs-dir", tmp_path / "two", "--json", *args, "--gpus", "2")
    assert alone.returncode == 0 and split.returncode == 0, split.stderr
    one, two = final_latents(alone.stdout), final_latents(split.stdout)
    assert float((two - one).norm() / one.norm()) < 0.02
