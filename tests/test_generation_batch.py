"""Batches (lowvram/generation/batch.py, runner.execute_runs) on the tiny model, float32 on the CPU: many clips
with each model loaded once give, clip for clip, the final latents of separate runs; a batch
stopped (Ctrl-C) or killed (SIGKILL) mid-way resumes to the same latents; a bad prompt-file line
is one error naming the line, before anything is created or loaded."""

import json
import re
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyvideo.errors import HyVideoError
from hyvideo.pipeline import GenerationRequest
from lowvram.generation.batch import Batch, clips_for, execute_batch, group_runs, parse_seeds, read_prompts, resume_all, start_batch
from lowvram.progress import Reporter
from lowvram.generation.preflight import RunOptions, start_run
from lowvram.generation.runner import RunInterrupted, StopRequest, execute
from lowvram.generation.run_folder import Run
from lowvram.stages import Stages

from tests.helpers import ROOT, env, invoke, lowvram, one_line_error

PROMPTS = ["a red fox running through snow", "a lighthouse at night", "waves on a pebble beach"]
SEEDS = [1, 2]
# (width, height, frames) per prompt: the third one's line overrides the size, so the batch mixes
# latent shapes (the DiT is placed by the larger clip's plan).
SIZES = {PROMPTS[0]: (64, 48, 9), PROMPTS[1]: (64, 48, 9), PROMPTS[2]: (48, 32, 5)}
# 64x48 px, 9 frames (latents [1, 16, 3, 6, 8]), 2 steps: the smallest clip that exercises every stage.
DEFAULTS = GenerationRequest("", width=64, height=48, frames=9, steps=2, seed=None)


def options(model_dir, runs_dir, request=DEFAULTS) -> RunOptions:
    return RunOptions(request, model_dir, runs_dir, device="cpu")


def latents(result) -> torch.Tensor:
    return load_file(result.final_latents)["latents"]


def run_alone(model_dir, runs_dir, request: GenerationRequest, profile: str = "auto"):
    """(settings, final latents) of `request` run alone, loading its own models. The final latents
    are saved before the decode, which is skipped here (blank frames): it takes most of a tiny run's
    time and cannot change them."""
    def blank_decode(stages, vae, latents, on_progress):
        stages.stats["vae"] = {"tiles": 0}
        return torch.zeros(request.frames, 8, 8, 3, dtype=torch.uint8)

    run, files, plan = start_run(replace(options(model_dir, runs_dir, request), profile=profile))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Stages, "decode", blank_decode)
        return run.settings, latents(execute(run, files, plan))


@pytest.fixture(scope="module")
def separate(tiny_official, tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("separate")
    return {(p, s): run_alone(tiny_official, runs_dir, GenerationRequest(p, *SIZES[p], 2, s)) for p in PROMPTS for s in SEEDS}


class Loads:
    """Counts the Stages loaders that run (wrapped with monkeypatch, calling the real ones)."""

    def __init__(self, monkeypatch):
        self.counts = {"text_encoders": 0, "dit": 0, "vae": 0}
        for name in self.counts:
            real = getattr(Stages, name)

            def counted(stages, *args, real=real, name=name):
                self.counts[name] += 1
                return real(stages, *args)

            monkeypatch.setattr(Stages, name, counted)


@pytest.mark.slow
def test_batch_is_bit_identical_to_separate_runs_with_each_model_loaded_once(tiny_official, tmp_path, separate, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    third = json.dumps({"prompt": PROMPTS[2], "size": "48x32", "frames": 5})
    prompts.write_text("\n".join([PROMPTS[0], "", "# a comment", PROMPTS[1], third]) + "\n")
    clips = read_prompts(prompts, DEFAULTS, SEEDS)
    assert [(c.line, c.request.prompt, c.request.seed) for c in clips] == [
        (line, p, s) for line, p in zip((1, 4, 5), PROMPTS) for s in SEEDS]
    loads = Loads(monkeypatch)
    batch, runs, files, plan = start_batch(options(tiny_official, tmp_path / "runs"), clips, source=prompts)
    result = execute_batch(batch, runs, files, plan)
    assert loads.counts == {"text_encoders": 1, "dit": 1, "vae": 1}
    assert len(result.runs) == 6 and all(r.state == "done" and Path(r.video).is_file() for r in result.runs)
    for clip, done in zip(clips, result.runs):
        settings, expected = separate[clip.request.prompt, clip.request.seed]
        assert done.settings == settings  # the manifest a single `generate` writes
        assert torch.equal(latents(done), expected)
        assert len(done.stats["dit"]["blocks_copied_per_step"]) == 2  # this run's own forwards
    saved = Batch.open(batch.path)
    assert [(e["id"], e["line"], e["state"]) for e in saved.runs] == [(r.run_id, c.line, "done") for r, c in zip(result.runs, clips)]
    [(grouped, entries)] = group_runs(tmp_path / "runs")
    assert grouped.id == batch.id and [e.id for e in entries] == [r.run_id for r in result.runs]


@pytest.mark.slow
def test_where_the_blocks_sit_changes_no_result(tiny_official, tmp_path):
    """Why a batch may place the DiT by its largest clip's plan: an FP8 DiT with every block
    streamed and with every block resident gives the same latents, bit for bit."""
    model = tmp_path / "model"
    shutil.copytree(tiny_official, model)  # the FP8 cache is written next to the weights
    found = []
    for resident in (0, 4):
        profile = tmp_path / f"resident{resident}.toml"
        profile.write_text(f'name = "r{resident}"\nvram_budget_gb = 1\ndit_scheme = "fp8"\nencoder_scheme = "bf16"\n'
                           f'resident_blocks = {resident}\n')
        request = GenerationRequest(PROMPTS[0], 64, 48, 9, 2, 1)
        found.append(run_alone(model, tmp_path / "runs", request, str(profile))[1])
    assert torch.equal(*found)


class StopInClip(Reporter):
    """Asks the runner to stop (the first Ctrl-C) once clip `clip` has done `step` steps."""

    def __init__(self, stop: StopRequest, clip: int, step: int):
        self.stop, self.target, self.clip_number = stop, (clip, step), 0

    def clip(self, number, total, run_id, steps_left):
        self.clip_number = number

    def advance(self, completed, **info):
        if (self.clip_number, completed) == self.target and self.stop.stage == "denoising":
            self.stop.set()


@pytest.mark.slow
def test_stopped_batch_and_single_run_resume_with_all(tiny_official, tmp_path, separate, monkeypatch):
    """Ctrl-C in clip 2's denoising: clip 1 waits to be decoded, clip 2 is at step 1; a single run
    stopped too. `resume --all` finishes all three from their cached embeddings, bit-identically."""
    runs_dir = tmp_path / "runs"
    clips = clips_for(PROMPTS[0], DEFAULTS, SEEDS)
    batch, runs, files, plan = start_batch(options(tiny_official, runs_dir), clips)
    stop = StopRequest()
    with pytest.raises(RunInterrupted) as info:
        execute_batch(batch, runs, files, plan, StopInClip(stop, 2, 1), stop)
    assert info.value.resume == f"lowvram resume --batch {batch.id}"
    assert [(Run.open(r.folder).state, Run.open(r.folder).step) for r in runs] == [("decoding", 2), ("denoising", 1)]
    single, files, plan = start_run(options(tiny_official, runs_dir, GenerationRequest(PROMPTS[1], 64, 48, 9, 2, 1)))
    stop = StopRequest()
    with pytest.raises(RunInterrupted):
        execute(single, files, plan, StopInClip(stop, 0, 1), stop)

    loads = Loads(monkeypatch)
    results = resume_all(runs_dir)
    assert loads.counts == {"text_encoders": 0, "dit": 2, "vae": 2}  # the batch's DiT and VAE, then the single run's
    assert [r.resumed_from for r in results] == ["decoding", "step 1/2", "step 1/2"]
    for result, key in zip(results, [(PROMPTS[0], 1), (PROMPTS[0], 2), (PROMPTS[1], 1)]):
        assert torch.equal(latents(result), separate[key][1])
    assert [e["state"] for e in Batch.open(batch.path).runs] == ["done", "done"]
    listed = json.loads(invoke("runs", "--runs-dir", runs_dir, "--json").stdout)
    assert listed["batches"] == [{"id": batch.id, "source": None, "runs": [r.id for r in runs]}]
    assert [(r["id"], r["batch"]) for r in listed["runs"]] == [(r.id, batch.id) for r in runs] + [(single.id, None)]
    table = invoke("runs", "--runs-dir", runs_dir).stdout
    assert table.index(batch.id) < table.index(runs[0].id) < table.index("single runs") < table.index(single.id)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a fox", "size": "64x40"}', "height must be a positive multiple of 16; got 40"),
    ('{"prompt": "a fox", "frames": 8}', "--frames must be 4k+1"),
    ('{"prompt": "  "}', "the prompt is empty"),
    ('{"prompt": "a fox", "seed": 1', "not valid JSON"),
    ('{"prompt": "a fox", "sede": 1}', "unknown key 'sede'"),
    ('{"prompt": "a fox", "steps": "30"}', 'steps must be a whole number, not "30"'),
])
def test_a_bad_line_is_one_error_naming_it_before_anything_starts(tiny_official, tmp_path, line, message, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(f"a red fox\n\n{line}\na cat\n")
    with pytest.raises(HyVideoError, match=f"^prompts.jsonl line 3: {re.escape(message)}"):
        read_prompts(prompts, DEFAULTS)
    loads = Loads(monkeypatch)
    result = invoke("generate", "--prompts", prompts, "--model-dir", tiny_official, "--runs-dir", tmp_path / "runs",
                    "--device", "cpu")
    assert result.exit_code == 2 and one_line_error(result).startswith(f"error: prompts.jsonl line 3: {message}")
    assert not (tmp_path / "runs").exists() and loads.counts == {"text_encoders": 0, "dit": 0, "vae": 0}


def test_seeds_and_overrides():
    assert parse_seeds("1,2,3") == [1, 2, 3] and parse_seeds("10..13") == [10, 11, 12, 13] and parse_seeds("0,5..6") == [0, 5, 6]
    for bad in ("x", "3..1", "1,,2"):
        with pytest.raises(HyVideoError, match="--seeds"):
            parse_seeds(bad)
    [clip] = clips_for("a fox", DEFAULTS, [1, 2], overrides={"seed": 9, "resolution": "540p", "aspect": "1:1", "guidance": 5.0})
    assert (clip.request.seed, clip.request.width, clip.request.height, clip.request.guidance) == (9, 720, 720, 5.0)


@pytest.mark.slow
def test_sigkill_mid_batch_then_resume_batch_is_bit_identical(tiny_official, tmp_path):
    """Killed while clip 2 of 2 is denoising (clip 1 denoised, waiting for the VAE):
    `lowvram resume --batch ID` finishes both with the latents of each clip run alone."""
    steps = 12  # 0.02-0.2 s per step on 2 CPU cores: a window of a second or more in clip 2
    runs_dir = tmp_path / "runs"
    args = ["--size", "64x48", "--frames", "9", "--steps", steps, "--seeds", "3,4", "--device", "cpu"]
    process = subprocess.Popen(lowvram("generate", PROMPTS[0], "--model-dir", tiny_official, "--runs-dir", runs_dir, *args),
                               cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        steps_done = sorted(json.loads(p.read_text())["step"] for p in runs_dir.glob("*/manifest.json"))
        if len(steps_done) == 2 and steps_done[0] >= 1:  # both started denoising: clip 1 is done with it
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, progress = process.communicate()
    assert process.returncode == -signal.SIGKILL, "the batch ended before it was killed"
    assert "clip 2/2 denoising" in progress and "batch eta" in progress, progress
    [batch] = runs_dir.glob("*.batch.json")
    killed = [json.loads((runs_dir / e["id"] / "manifest.json").read_text()) for e in json.loads(batch.read_text())["runs"]]
    assert [m["state"] for m in killed] == ["decoding", "denoising"] and 1 <= killed[1]["step"] < steps

    resumed = invoke("resume", "--batch", batch.name.split(".")[0], "--runs-dir", runs_dir, "--json")
    assert resumed.exit_code == 0, resumed.output
    results = json.loads(resumed.stdout)["runs"]
    assert [r["resumed_from"] for r in results] == ["decoding", f"step {killed[1]['step']}/{steps}"]
    for result, seed in zip(results, (3, 4)):
        _, alone = run_alone(tiny_official, tmp_path / "alone", GenerationRequest(PROMPTS[0], 64, 48, 9, steps, seed))
        assert load_file(result["final_latents"])["latents"].equal(alone)


def test_a_line_records_what_it_sets_of_a_models_defaults():
    """What a line sets of steps, guidance, flow shift, frames and size (size, resolution or aspect)
    is the user's, even where it equals the command line's value; the rest a HunyuanVideo-1.5
    transformer fills with its own (`preflight.v15_request`)."""
    from hyvideo.pipeline import GenerationRequest
    from lowvram.generation.batch import clips_for

    defaults = GenerationRequest("", steps=50, seed=1)
    [clip] = clips_for("a fox", defaults, None, 3, {"steps": 50, "aspect": "9:16", "seed": 4})
    assert clip.given == {"steps", "size"} and (clip.request.width, clip.request.height, clip.request.seed) == (720, 1280, 4)
    assert clips_for("a fox", defaults, None, 4)[0].given == frozenset()
