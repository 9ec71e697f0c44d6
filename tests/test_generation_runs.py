"""Run folders, resume, video files, weight checks and downloads, below the CLI (lowvram/generation/run_folder.py,
runner.py, video.py, download.py, doctor.py) on the tiny model, float32 on the CPU."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hyvideo.checkpoint import OFFICIAL_DIT, OFFICIAL_VAE
from hyvideo.errors import HyVideoError
from hyvideo.files import fingerprint_mismatch
from hyvideo.pipeline import GenerationRequest
from lowvram.generation.preflight import start_run
from lowvram.generation.run_folder import KEEP_CHECKPOINTS, Run, find_run, list_runs
from lowvram.generation.runner import RunInterrupted, StopRequest, execute, resume_run
from lowvram.generation.video import png_bytes, write_mp4
from lowvram.setup import download as dl
from lowvram.setup.model_folder import check_model_folder
from lowvram.setup.doctor import run_doctor
from lowvram.stages import Stages
from tests.helpers import REQUEST, StopAfter, new_run, run_options


@pytest.fixture(scope="module")
def uninterrupted(tiny_official, tmp_path_factory):
    run, files, plan = new_run(tiny_official, tmp_path_factory.mktemp("runs"))
    result = execute(run, files, plan)
    return result, load_file(result.final_latents)["latents"]


# --- the whole run ---------------------------------------------------------------------------


def test_run_folder_contents(uninterrupted):
    result, latents = uninterrupted
    folder = Path(result.folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["state"] == "done" and manifest["step"] == REQUEST.steps
    assert manifest["settings"]["seed"] == REQUEST.seed and manifest["settings"]["prompt"] == REQUEST.prompt
    assert manifest["model"]["fingerprint"] and all("size" in p and "mtime_ns" in p for p in manifest["model"]["fingerprint"])
    assert {"torch", "transformers", "python"} <= manifest["versions"].keys()
    assert latents.shape == (1, 16, 3, 6, 8) and latents.dtype == torch.float32
    # only the newest checkpoints are kept
    assert len(list(folder.glob("latents-step*.safetensors"))) == KEEP_CHECKPOINTS
    assert (folder / "embeddings.safetensors").is_file() and (folder / "first_frame.png").is_file()
    av = pytest.importorskip("av")
    with av.open(result.video) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == REQUEST.frames and frames[0].shape == (REQUEST.height, REQUEST.width, 3)


def test_stop_and_resume_is_bit_exact_and_skips_text_encoding(tiny_official, tmp_path, uninterrupted, monkeypatch):
    run, files, plan = new_run(tiny_official, tmp_path)
    stop = StopRequest()
    with pytest.raises(RunInterrupted) as info:
        execute(run, files, plan, StopAfter(stop, 2), stop)
    assert info.value.run.step == 2 and Run.open(run.folder).state == "denoising"

    def no_text_encoders(self):
        raise AssertionError("a resume must use the cached embeddings")

    monkeypatch.setattr(Stages, "text_encoders", no_text_encoders)
    result = resume_run(tmp_path, run.id)
    assert result.resumed_from == "step 2/4" and result.state == "done"
    assert torch.equal(load_file(result.final_latents)["latents"], uninterrupted[1])


@pytest.mark.slow
def test_interrupted_decode_resumes_without_the_dit(tiny_official, tmp_path, uninterrupted, monkeypatch):
    run, files, plan = new_run(tiny_official, tmp_path)
    real_decode = Stages.decode

    def ctrl_c(self, vae, latents, on_progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(Stages, "decode", ctrl_c)
    with pytest.raises(RunInterrupted):
        execute(run, files, plan)
    assert Run.open(run.folder).state == "decoding"

    def no_dit(self):
        raise AssertionError("a resume in decoding must not load the DiT")

    monkeypatch.setattr(Stages, "decode", real_decode)
    monkeypatch.setattr(Stages, "dit", no_dit)
    result = resume_run(tmp_path)  # newest unfinished run
    assert result.resumed_from == "decoding" and Path(result.video).is_file()
    assert torch.equal(load_file(result.final_latents)["latents"], uninterrupted[1])


@pytest.mark.slow
def test_stopped_after_the_last_step_resumes_without_the_dit(tiny_official, tmp_path, uninterrupted, monkeypatch):
    """Stopped (or killed) after the step-4 checkpoint but before the final latents were saved."""
    run, files, plan = new_run(tiny_official, tmp_path)
    stop = StopRequest()
    with pytest.raises(RunInterrupted):
        execute(run, files, plan, StopAfter(stop, REQUEST.steps), stop)
    assert Run.open(run.folder).step == REQUEST.steps and Run.open(run.folder).manifest["final_latents"] is None

    def no_dit(self):
        raise AssertionError("every step is done: the DiT is not needed")

    monkeypatch.setattr(Stages, "dit", no_dit)
    result = resume_run(tmp_path, run.id)
    assert torch.equal(load_file(result.final_latents)["latents"], uninterrupted[1])


@pytest.mark.slow
def test_one_frame_is_an_image_and_resumes(tiny_official, tmp_path, monkeypatch):
    """--frames 1 writes image.png (no mp4), copies it to an --out folder as <run-id>.png, and a
    run stopped in its decode, or already done, resumes to the same image."""
    request = GenerationRequest("a lighthouse at dusk", width=64, height=48, frames=1, steps=2, seed=3)
    out = tmp_path / "out"
    out.mkdir()
    run, files, plan = new_run(tiny_official, tmp_path / "runs", request, out=out)

    def ctrl_c(self, vae, latents, on_progress):
        raise KeyboardInterrupt

    real_decode = Stages.decode
    monkeypatch.setattr(Stages, "decode", ctrl_c)
    with pytest.raises(RunInterrupted):
        execute(run, files, plan)
    monkeypatch.setattr(Stages, "decode", real_decode)
    result = resume_run(tmp_path / "runs", run.id)
    assert result.resumed_from == "decoding" and result.video is None and result.first_frame is None
    assert Path(result.image) == run.folder / "image.png" and not (run.folder / "video.mp4").exists()
    assert Run.open(run.folder).manifest["outputs"] == {"image": "image.png", "out": str(out / f"{run.id}.png")}
    av = pytest.importorskip("av")
    with av.open(result.image) as container:  # an independent PNG decoder
        image = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert image.shape == (48, 64, 3) and (out / f"{run.id}.png").read_bytes() == Path(result.image).read_bytes()
    again = resume_run(tmp_path / "runs", run.id)
    assert again.resumed_from == "done" and again.image == result.image
    assert list_runs(tmp_path / "runs")[0].summary()["output"] == str(out / f"{run.id}.png")


def test_out_must_name_the_kind_of_file_the_run_makes(tiny_official, tmp_path):
    for frames, out, message in ((1, "x.mp4", "--frames 1 makes a PNG image; name it x.png"),
                                 (9, "x.png", "--frames 9 makes an mp4 video; name it x.mp4")):
        request = GenerationRequest("a fox", width=64, height=48, frames=frames, steps=1)
        with pytest.raises(HyVideoError, match=message):
            new_run(tiny_official, tmp_path / "runs", request, out=tmp_path / out)
    assert not (tmp_path / "runs").exists()  # refused before the run folder


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny_official, tmp_path, uninterrupted):
    run, files, plan = new_run(tiny_official, tmp_path)
    stop = StopRequest()
    with pytest.raises(RunInterrupted):
        execute(run, files, plan, StopAfter(stop, 3), stop)
    newest = Run.open(run.folder).manifest["checkpoints"][-1]
    path = run.folder / newest["file"]
    path.write_bytes(path.read_bytes()[:-8] + b"garbage!")  # same size, wrong checksum
    reporter = StopAfter(StopRequest(), 99)
    result = resume_run(tmp_path, run.id, reporter=reporter)
    assert result.resumed_from == "step 2/4"
    assert any("damaged" in w for w in reporter.warnings)
    assert torch.equal(load_file(result.final_latents)["latents"], uninterrupted[1])


def test_resume_refuses_other_weights(tiny_official, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_official, model)
    run, files, plan = new_run(model, tmp_path / "runs")
    stop = StopRequest()
    with pytest.raises(RunInterrupted):
        execute(run, files, plan, StopAfter(stop, 1), stop)
    vae = model / "hunyuan-video-t2v-720p/vae/pytorch_model.pt"
    os.utime(vae, ns=(vae.stat().st_atime_ns, vae.stat().st_mtime_ns + 10**9))  # "re-downloaded"
    with pytest.raises(HyVideoError, match="other weights: hunyuan-video-t2v-720p/vae/pytorch_model.pt was modified"):
        resume_run(tmp_path / "runs", run.id)


@pytest.mark.slow
def test_disk_full_keeps_the_previous_checkpoint(tiny_official, tmp_path, uninterrupted, monkeypatch):
    run, files, plan = new_run(tiny_official, tmp_path)
    real_save_step = Run.save_step

    def save_step(self, step, latents, cache=None):
        if step == 3:  # the disk fills up while writing the step 3 checkpoint
            def no_space(fd):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(os, "fsync", no_space)
        return real_save_step(self, step, latents, cache)

    monkeypatch.setattr(Run, "save_step", save_step)
    with pytest.raises(HyVideoError, match=r"the disk is full: could not save the step 3 checkpoint .*kept at step 2/4.*lowvram resume"):
        execute(run, files, plan)
    monkeypatch.undo()  # space freed
    saved = Run.open(run.folder)
    # the manifest could not be updated either (still full when the failure was recorded): it
    # still describes step 2, whose checkpoint is intact
    assert saved.state == "denoising" and saved.step == 2
    assert not [p for p in run.folder.iterdir() if ".tmp-" in p.name]
    result = resume_run(tmp_path, run.id)
    assert result.resumed_from == "step 2/4"
    assert torch.equal(load_file(result.final_latents)["latents"], uninterrupted[1])


def test_sigint_handler_finishes_the_step_first():
    stop = StopRequest()
    stop.stage = "denoising"
    assert stop.on_sigint() is True and stop.is_set()
    with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C stops at once
        stop.on_sigint()
    other = StopRequest()
    other.stage = "decoding"
    with pytest.raises(KeyboardInterrupt):
        other.on_sigint()


def test_long_prompt_warns_and_continues(tiny_official, tmp_path):
    request = GenerationRequest("snow " * 400, width=32, height=32, frames=1, steps=1, seed=0)
    run, files, plan = new_run(tiny_official, tmp_path, request)
    reporter = StopAfter(StopRequest(), 99)
    assert execute(run, files, plan, reporter).state == "done"
    assert any("longer than 256 tokens" in w for w in reporter.warnings)


@pytest.mark.slow
def test_streamed_profile_stop_and_resume_is_bit_exact(tiny_official, tmp_path):
    """A profile run (FP8 DiT from the quantize-once cache, 2 of 4 blocks streamed, tiled VAE)
    stopped after step 2 and resumed gives the same final latents as the same run uninterrupted."""
    model = tmp_path / "model"
    shutil.copytree(tiny_official, model)  # the FP8 cache is written next to the weights
    profile = tmp_path / "cpu.toml"
    profile.write_text('name = "cpu-streamed"\nvram_budget_gb = 1\ndit_scheme = "fp8"\nencoder_scheme = "bf16"\n'
                       'resident_blocks = 2\nvae_spatial_tile = 4\nvae_temporal_tile = 4\n')
    reporter = StopAfter(StopRequest(), 99)
    run, files, plan = start_run(run_options(model, tmp_path / "a", profile=str(profile)), reporter)
    assert run.settings["profile"]["name"] == "cpu-streamed"
    whole = load_file(execute(run, files, plan, reporter).final_latents)["latents"]

    run, files, plan = start_run(run_options(model, tmp_path / "b", profile=str(profile)))
    stop = StopRequest()
    with pytest.raises(RunInterrupted):
        execute(run, files, plan, StopAfter(stop, 2), stop)
    resumed = resume_run(tmp_path / "b", run.id)
    assert resumed.resumed_from == "step 2/4"
    assert torch.equal(load_file(resumed.final_latents)["latents"], whole)


@pytest.mark.slow
def test_cache_off_is_the_uncached_run(tiny_official, tmp_path, uninterrupted):
    run, files, plan = new_run(tiny_official, tmp_path, step_cache="off")
    result = execute(run, files, plan)
    assert run.settings["profile"]["step_cache"] == "off" and result.stats["dit"]["computed_steps"] == [0, 1, 2, 3]
    assert torch.equal(load_file(result.final_latents)["latents"], uninterrupted[1])
    assert "cache" not in Run.open(run.folder).manifest["checkpoints"][-1]


@pytest.mark.slow
def test_compile_and_attention_choices_reach_the_run(tiny_official, tmp_path, uninterrupted, monkeypatch):
    """--compile compiles the blocks (aot_eager here: dynamo's tracing without generating C++, which
    tests/test_lowvram_compile.py covers) and records it; --attention sage on the CPU says why not and runs SDPA."""
    import torch._dynamo

    from lowvram import stages as stages_module
    from lowvram.compile import compile_blocks

    monkeypatch.setattr(stages_module, "compile_blocks", lambda streamer, cache_dir: compile_blocks(streamer, cache_dir, "aot_eager"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    reporter = StopAfter(StopRequest(), 99)
    run, files, plan = start_run(run_options(tiny_official, tmp_path, compile=True, attention="sage"), reporter)
    assert run.settings["profile"]["compile"] is True and run.settings["attention"] == "sdpa"
    assert reporter.warnings == ["attention 'sage' needs CUDA; using sdpa on the CPU"]
    result = execute(run, files, plan, reporter)
    torch._dynamo.reset()
    dit = result.stats["dit"]
    assert dit["compiled_modules"] == 4 and dit["dynamo_graphs"] == 2  # the tiny model's 4 blocks, resident (plain); 2 kinds
    assert "compile_seconds" in result.measured["dit"]
    assert torch.allclose(load_file(result.final_latents)["latents"], uninterrupted[1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_step_cached_streamed_run_stops_and_resumes_bit_exact(tiny_official, tmp_path):
    """--cache fast on a streamed FP8 profile, 8 steps: stopped after step 3 and resumed (also past a
    damaged newest residual) it ends with the uninterrupted run's final latents and computed steps;
    residuals are shared by the checkpoints of skipped steps and gone once the run is done."""
    model = tmp_path / "model"
    shutil.copytree(tiny_official, model)
    profile = tmp_path / "cpu.toml"
    profile.write_text('name = "cpu-streamed"\nvram_budget_gb = 1\ndit_scheme = "fp8"\nencoder_scheme = "bf16"\n'
                       'resident_blocks = 2\n')
    request = GenerationRequest(REQUEST.prompt, width=64, height=48, frames=9, steps=8, seed=11)
    run, files, plan = start_run(run_options(model, tmp_path / "a", request, profile=str(profile), step_cache="fast"))
    assert run.settings["profile"]["step_cache"] == "fast"
    whole = execute(run, files, plan)
    computed = whole.stats["dit"]["computed_steps"]
    assert computed[0] == 0 and computed[-1] == 7 and len(computed) < 8  # steps were skipped
    assert whole.stats["dit"]["blocks_copied_per_step"] == [2] * len(computed)  # 2 streamed blocks per forward
    assert not list(Path(whole.folder).glob("cache-residual-*"))  # a finished run keeps no residual

    for damage in (False, True):
        runs = tmp_path / f"b{damage}"
        run, files, plan = start_run(run_options(model, runs, request, profile=str(profile), step_cache="fast"))
        stop = StopRequest()
        with pytest.raises(RunInterrupted):
            execute(run, files, plan, StopAfter(stop, 3), stop)
        checkpoints = Run.open(run.folder).manifest["checkpoints"]
        residuals = {c["cache"]["residual"]["file"] for c in checkpoints}
        assert {p.name for p in run.folder.glob("cache-residual-*")} == residuals
        if damage:
            newest = run.folder / checkpoints[-1]["cache"]["residual"]["file"]
            newest.write_bytes(newest.read_bytes()[:-8] + b"garbage!")
        reporter = StopAfter(StopRequest(), 99)
        resumed = resume_run(runs, run.id, reporter=reporter)
        if not damage:
            assert resumed.resumed_from == "step 3/8"
        elif len(residuals) == 2:  # the checkpoint before has its own residual
            assert resumed.resumed_from == "step 2/8" and any("damaged" in w for w in reporter.warnings)
        else:  # both checkpoints share the damaged residual: denoising starts again from the noise
            assert resumed.resumed_from == "cached text embeddings" and any("damaged" in w for w in reporter.warnings)
        assert torch.equal(load_file(resumed.final_latents)["latents"], load_file(whole.final_latents)["latents"])


# --- manifests -------------------------------------------------------------------------------


def test_edited_corrupt_and_foreign_run_folders_are_refused(uninterrupted, tmp_path):
    source = Path(uninterrupted[0].folder)
    edited = tmp_path / "edited"
    shutil.copytree(source, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["settings"]["steps"] = 8
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HyVideoError, match="changed after run .* started"):
        Run.open(edited)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(source, corrupt)
    (corrupt / "manifest.json").write_text('{"format": "hyvideo-lowvram-run", "ver')
    with pytest.raises(HyVideoError, match="manifest of run corrupt is corrupt"):
        Run.open(corrupt)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "something else"}')
    with pytest.raises(HyVideoError, match="not a lowvram run folder"):
        Run.open(foreign)
    with pytest.raises(HyVideoError, match="not a lowvram run folder"):
        find_run(tmp_path, str(tmp_path))  # a folder without a manifest

    states = {e.folder.name: (e.run is None, e.problem) for e in list_runs(tmp_path)}
    assert states["edited"][0] and states["corrupt"][0] and states["foreign"][0]


def test_find_run_by_prefix_and_latest_unfinished(tmp_path):
    settings = {"prompt": "p", "steps": 2}
    first = Run.create(tmp_path, settings, {"fingerprint": []}, {})
    second = Run.create(tmp_path, settings, {"fingerprint": []}, {})
    assert first.id != second.id  # same second, same prompt: a suffix keeps them apart
    assert find_run(tmp_path, None).id == second.id
    assert find_run(tmp_path, second.id).id == second.id
    with pytest.raises(HyVideoError, match="matches 2 runs"):
        find_run(tmp_path, first.id[:8])
    with pytest.raises(HyVideoError, match="no run 'nope'"):
        find_run(tmp_path, "nope")


def test_a_live_run_is_locked(tmp_path):
    run = Run.create(tmp_path, {"prompt": "p", "steps": 2}, {"fingerprint": []}, {})
    assert not run.is_running()
    held = run.lock()
    assert run.is_running()
    with pytest.raises(HyVideoError, match="running in another process"):
        run.lock()  # a second `lowvram resume` of the same run
    held.close()  # what the kernel does when the process dies, SIGKILL included
    assert not run.is_running()


def test_fingerprint_mismatch_reasons():
    a = [{"file": "dit.pt", "size": 10, "mtime_ns": 1}]
    assert fingerprint_mismatch(a, a) is None
    assert "changed size" in fingerprint_mismatch(a, [{"file": "dit.pt", "size": 11, "mtime_ns": 1}])
    assert "no longer there" in fingerprint_mismatch(a, [])


# --- video -----------------------------------------------------------------------------------


def test_mp4_is_h264_yuv420p_24fps_and_odd_sizes_are_padded(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (5, 33, 47, 3), dtype=np.uint8)
    write_mp4(frames, tmp_path / "odd.mp4")
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "odd.mp4")) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        assert stream.codec_context.name == "h264" and stream.average_rate == 24
    assert len(decoded) == 5 and decoded[0].format.name == "yuv420p"
    assert (decoded[0].width, decoded[0].height) == (48, 34)  # padded to even by repeating the edge


def test_png_writer_round_trips(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    (tmp_path / "x.png").write_bytes(png_bytes(image))
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "x.png")) as container:  # an independent PNG decoder
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.array_equal(decoded, image)
    data = png_bytes(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and zlib.crc32(data[12:29]) == int.from_bytes(data[29:33], "big")


# --- weights: completeness, download ---------------------------------------------------------


def test_truncated_weights_are_named(tiny_official, tiny_diffusers, tmp_path):
    for source in (tiny_official, tiny_diffusers):
        model = tmp_path / source.name
        shutil.copytree(source, model)
        layout, checks = check_model_folder(model)
        assert layout and all(c.ok for c in checks)
        dit = next(c.path for c in checks if c.path.suffix in (".pt", ".safetensors") and "transformer" in str(c.path))
        dit.write_bytes(dit.read_bytes()[: dit.stat().st_size // 2])
        _, checks = check_model_folder(model)
        assert [c.path for c in checks if not c.ok] == [dit]
        problem = next(c.problem for c in checks if not c.ok)
        assert "incomplete or corrupt" in problem and "download it again" in problem  # the loader's own words
        report = run_doctor(model, tmp_path / "runs")
        weights = next(c for c in report["checks"] if c["name"] == "weights")
        assert weights["status"] == "fail" and dit.name in weights["detail"]


def test_doctor_says_what_the_loader_would_say(tiny_official, tmp_path):
    """A foreign file, and a 25.6 GB file cut after its first 64 KiB (sparse, so nothing is written):
    found from the zip directory and header alone, without reading tensor data."""
    model = tmp_path / "model"
    shutil.copytree(tiny_official, model)
    vae = model / OFFICIAL_VAE / "pytorch_model.pt"
    vae.write_text("not weights")
    dit = model / OFFICIAL_DIT
    head = dit.read_bytes()[: 1 << 16]
    with open(dit, "wb") as f:
        f.write(head)
        f.truncate(25_642_314_035)  # the full-size bf16 file's size (facts §8)
    started = time.perf_counter()
    _, checks = check_model_folder(model)
    elapsed = time.perf_counter() - started
    problems = {c.path: c.problem for c in checks if not c.ok}
    assert problems.keys() == {dit, vae}
    assert "is not a PyTorch checkpoint" in problems[vae]
    assert "incomplete or corrupt (the zip directory at its end is missing)" in problems[dit]
    assert elapsed < 2.0, f"{elapsed:.2f} s: the check must not read the 25.6 GB"  # measured 3-8 ms for the folder


DOCTOR_ADDRESS_SPACE_SCRIPT = """
import json, os, resource, sys
from lowvram.setup.model_folder import check_model_folder

vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize:")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (16 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
print(json.dumps({str(c.path): c.problem for c in check_model_folder(sys.argv[1])[1] if not c.ok}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RLIMIT_AS and /proc")
@pytest.mark.slow
def test_doctor_reports_a_refused_mapping_as_memory(tiny_official, tmp_path):
    """A DiT the loader cannot map (address space limited to 16 MiB more than the process uses; the
    file is 48 MiB, every other file under 5 MiB): the doctor shows the loader's memory message,
    not "incomplete"."""
    model = tmp_path / "model"
    shutil.copytree(tiny_official, model)
    torch.save({"module": {"w": torch.zeros(12 << 20)}}, model / OFFICIAL_DIT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", DOCTOR_ADDRESS_SPACE_SCRIPT, str(model)],
                         capture_output=True, text=True, env=env, check=True)
    problems = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(problems) == [str(model / OFFICIAL_DIT)]
    assert "short of memory or address space" in problems[str(model / OFFICIAL_DIT)]


class FakeInfo:
    def __init__(self, filename, size, cached=False):
        self.filename, self.file_size, self.will_download = filename, size, not cached


def fake_hub(files: dict[str, list[str]]):
    """snapshot_download stand-in: dry runs list `files[repo]`, real runs write them."""
    calls = []

    def snapshot_download(repo, local_dir, allow_patterns, dry_run=False, **kw):
        calls.append((repo, tuple(allow_patterns), dry_run))
        if dry_run:
            return [FakeInfo(name, 1000 + i) for i, name in enumerate(files[repo])]
        for name in files[repo]:
            path = Path(local_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
        return local_dir

    return snapshot_download, calls


def test_download_official_layout_moves_tokenizers(monkeypatch, tmp_path):
    snapshot, calls = fake_hub({
        dl.OFFICIAL_REPO: ["hunyuan-video-t2v-720p/vae/config.json"],
        dl.COMMUNITY_REPO: ["text_encoder/config.json", "tokenizer/tokenizer.json", "tokenizer_2/vocab.json"],
    })
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot)
    planned = dl.plan_download(tmp_path, "official", fp8=True)
    assert [p.size for p in planned] == [1000, 1000, 1001, 1002]
    assert dl.OFFICIAL_DIT_FP8 in calls[0][1] and calls[0][2] is True
    dl.download(tmp_path, "official", progress=False)
    assert (tmp_path / "text_encoder/tokenizer.json").is_file() and (tmp_path / "text_encoder_2/vocab.json").is_file()
    assert not (tmp_path / "tokenizer").exists()


def test_download_offline_gives_the_manual_commands(monkeypatch, tmp_path):
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(*args, **kwargs):
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(HyVideoError, match="offline mode") as info:
        dl.plan_download(tmp_path)
    assert f'hf download {dl.COMMUNITY_REPO} --include "transformer/*"' in str(info.value)
    with pytest.raises(HyVideoError, match="--layout official"):
        dl.download_parts("diffusers", fp8=True)
