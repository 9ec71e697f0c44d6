"""One generation as a resumable run: pre-flight checks, text encoding, Euler steps with a
checkpoint after every step, VAE decode, mp4 + PNG. The CLI calls `start_run` / `resume_run` and
draws what `Reporter` is told; nothing here prints.

    run, files = start_run(RunOptions(request, model_dir, runs_dir))  # checks, creates the run folder
    result = execute(run, files, reporter, stop)  # encoding -> denoising -> decoding -> done
    result = resume_run(runs_dir, "20250101-120000-a-fox", reporter=reporter, stop=stop)

Each stage loads only its own models and frees them before the next (text encoders, then the DiT,
then the VAE), so a resume in "decoding" never loads the DiT and a resume in "denoising" never loads
the text encoders. How a stage gets its model onto the GPU (whole, quantized, block-streamed,
tiled) is the `Stages` object's business: `build_stages` is the one seam to lowvram's profiles,
placement, streaming and tiled VAE.

Ctrl-C: `StopRequest` is set by the CLI's SIGINT handler; during denoising the runner finishes the
current step, saves it and raises `RunInterrupted`; a second Ctrl-C (or one outside the step loop)
raises KeyboardInterrupt at once, which is turned into `RunInterrupted` too (the last saved step
stays valid: every file is written atomically).
"""

import platform
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hyvideo.attention import check_backend
from hyvideo.checkpoint import ModelFiles, find_model_files
from hyvideo.config import DiTConfig, VAEConfig
from hyvideo.errors import HyVideoError
from hyvideo.files import file_fingerprint, fingerprint_mismatch
from hyvideo.pipeline import GenerationRequest, denoise, validate_request
from hyvideo.sampler import initial_noise
from hyvideo.text_encoder import TEXT_LEN, encode_prompts

from .placement import empty_cache
from .progress import Reporter
from .stages import CPU_MAX_DIT_PARAMS, build_stages, dit_config_for, parameter_count, resolve_profile, vae_config_for
from .runs import FIRST_FRAME, VIDEO, Run, find_run
from .video import write_outputs

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# --- progress, interrupts, results -----------------------------------------------------------


class StopRequest:
    """Set from the SIGINT handler; read by the runner between steps."""

    def __init__(self):
        self._event = threading.Event()
        self.stage: str | None = None  # what the runner is doing now

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def on_sigint(self) -> bool:
        """First Ctrl-C during denoising: finish the step (returns True, the caller says so).
        Otherwise stop now: raises KeyboardInterrupt."""
        if self.stage == "denoising" and not self.is_set():
            self.set()
            return True
        raise KeyboardInterrupt


class RunInterrupted(Exception):
    """The run stopped on request; it is saved and can be resumed."""

    def __init__(self, run: Run):
        super().__init__(f"run {run.id} stopped at step {run.step}/{run.steps}")
        self.run = run


@dataclass
class RunResult:
    run_id: str
    folder: str
    state: str
    step: int
    steps: int
    video: str | None
    first_frame: str | None
    out: str | None
    final_latents: str | None
    settings: dict
    resumed_from: str | None = None  # what a resume skipped: "step 7/50", "decoding", "done", None
    seconds: dict = field(default_factory=dict)
    peak_vram_gb: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunOptions:
    request: GenerationRequest
    model_dir: Path
    runs_dir: Path
    profile: str = "auto"
    attention: str = "sdpa"
    device: str | None = None  # None: cuda if available, else cpu
    out: Path | None = None


# --- pre-flight ------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise HyVideoError(f"--device must be cpu or cuda, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HyVideoError("--device cuda, but PyTorch sees no CUDA GPU (`lowvram doctor` says why); use --device cpu for the tiny demo model")
    return torch.device(device)


def latent_shape(request: GenerationRequest, dit: DiTConfig, vae: VAEConfig) -> tuple[int, ...]:
    t, s = vae.time_compression_ratio, vae.spatial_compression_ratio
    return (1, dit.in_channels, (request.frames - 1) // t + 1, request.height // s, request.width // s)


def weight_files(files: ModelFiles) -> list[Path]:
    """Every file whose bytes decide the output: DiT (+ FP8 pair), VAE, both text encoders."""
    paths = [*files.dit_weights, files.vae_weights]
    paths += [p for p in (files.dit_fp8, files.dit_fp8_map) if p is not None]
    for folder in (files.llm, files.clip):
        paths += [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES] if folder.is_dir() else []
    return [p for p in paths if p.is_file()]


def check_output_path(out: Path | None) -> Path | None:
    """--out must be writable before an hour of compute, not after."""
    if out is None:
        return None
    out = Path(out)
    folder = out if out.is_dir() else out.parent
    if not folder.is_dir():
        raise HyVideoError(f"cannot write --out {out}: the folder {folder} does not exist; create it or choose another path")
    probe = folder / f".lowvram-write-test-{id(out)}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise HyVideoError(f"cannot write --out {out}: {folder} is not writable ({error.strerror}); choose another path") from None
    return out


def versions() -> dict:
    import transformers

    try:
        from importlib.metadata import version

        ours = version("hyvideo-lowvram")
    except Exception:
        ours = "dev"
    found = {"hyvideo-lowvram": ours, "torch": torch.__version__, "transformers": transformers.__version__,
             "python": platform.python_version(), "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def start_run(options: RunOptions, reporter: Reporter | None = None) -> tuple[Run, ModelFiles]:
    """Every check that can fail before compute, then the run folder (state "encoding")."""
    request = options.request
    validate_request(request)
    check_backend(options.attention)
    device = check_device(options.device or default_device())
    files = find_model_files(Path(options.model_dir))
    dit_config, vae_config = dit_config_for(files), vae_config_for(files)
    params = parameter_count(dit_config)
    if device.type == "cpu" and params >= CPU_MAX_DIT_PARAMS:
        raise HyVideoError(
            f"this is the full-size model ({params / 1e9:.1f} B parameters): it needs an NVIDIA GPU with CUDA and "
            "PyTorch sees none (`lowvram doctor` says why); `lowvram demo` runs a tiny model on the CPU"
        )
    profile = resolve_profile(options.profile, device, dit_config, vae_config, request, params, reporter or Reporter())
    out = check_output_path(options.out)
    settings = {
        **asdict(request), "attention": options.attention, "device": str(device), "profile": profile,
        "model_dir": str(Path(options.model_dir).resolve()), "out": str(out.resolve()) if out else None,
        "latent_shape": list(latent_shape(request, dit_config, vae_config)), "dit_parameters": params,
    }
    model = {"layout": files.layout, "fingerprint": file_fingerprint(weight_files(files), files.root)}
    run = Run.create(Path(options.runs_dir), settings, model, versions())
    return run, files


def resume_run(runs_dir: Path, ref: str | None = None, model_dir: Path | None = None,
               reporter: Reporter | None = None, stop: StopRequest | None = None) -> RunResult:
    """Continue a run from what its folder holds. Refuses other weights than it started with."""
    reporter = reporter or Reporter()
    run = find_run(Path(runs_dir), ref)
    if run.finished and (run.folder / VIDEO).is_file():
        return _result(run, resumed_from="done")
    settings = run.settings
    check_device(settings["device"])
    files = find_model_files(Path(model_dir or settings["model_dir"]))
    reason = fingerprint_mismatch(run.manifest["model"]["fingerprint"], file_fingerprint(weight_files(files), files.root))
    if reason:
        raise HyVideoError(
            f"cannot resume run {run.id} with other weights: {reason}. The same weights are needed to continue "
            "the same video; restore them, or start a new run with `lowvram generate`"
        )
    if run.manifest.get("versions", {}).get("torch") != torch.__version__:
        reporter.warn(f"run {run.id} started with torch {run.manifest['versions'].get('torch')}, now {torch.__version__}: "
                      "the result may differ slightly from an uninterrupted run")
    return execute(run, files, reporter, stop)


# --- the stages ------------------------------------------------------------------------------


def _release(*models) -> None:
    """Give back what a stage's models hold (a streamed DiT frees its GPU ring and pinned host
    copies); the caller then drops its references and calls _empty_cache."""
    for model in models:
        if hasattr(model, "release"):
            model.release()


def _peak_vram_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def ensure_demo_model(root: Path, reporter: Reporter) -> None:
    """Write the tiny random checkpoint (official layout) into `root` unless a model is there.
    It is written to `<root>.partial` and renamed when complete, so an interrupted write is never
    taken for a model."""
    from hyvideo.checkpoint import detect_layout
    from hyvideo.synthetic_checkpoint import write_synthetic_checkpoint

    if root.is_dir() and detect_layout(root):
        return
    if root.exists() and any(root.iterdir()):
        raise HyVideoError(f"{root} is a non-empty folder without a model; pass --save-model with an empty or new folder")
    reporter.stage("writing tiny model")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_synthetic_checkpoint(partial, "official", "tiny", seed=0)
    if root.exists():
        root.rmdir()
    partial.rename(root)


def execute(run: Run, files: ModelFiles, reporter: Reporter | None = None, stop: StopRequest | None = None) -> RunResult:
    """Run (or continue) `run` to the end. Raises RunInterrupted on Ctrl-C, HyVideoError for user
    problems (recorded in the manifest as "failed"; the run can be resumed once fixed)."""
    reporter, stop = reporter or Reporter(), stop or StopRequest()
    lock = run.lock()
    try:
        run.remove_stray_files()
        return _execute(run, files, reporter, stop)
    except (KeyboardInterrupt, RunInterrupted):
        raise RunInterrupted(run) from None
    except HyVideoError as error:
        run.record_failure(str(error))
        raise
    except Exception as error:
        run.record_failure(f"{type(error).__name__}: {error}")
        raise
    finally:
        stop.stage = None
        lock.close()


def _execute(run: Run, files: ModelFiles, reporter: Reporter, stop: StopRequest) -> RunResult:
    settings = run.settings
    request = GenerationRequest(**{k: settings[k] for k in GenerationRequest.__dataclass_fields__})
    device = torch.device(settings["device"])
    stages = build_stages(files, settings["profile"], device, settings["attention"],
                          (request.width, request.height, request.frames), reporter)
    seconds = run.manifest.setdefault("seconds", {})
    resumed_from = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    latents = run.load_final()
    if latents is None:
        # ---- text embeddings (cached in the run folder)
        embeddings = run.load_embeddings()
        if embeddings is None:
            if run.manifest.get("embeddings"):
                reporter.warn("the cached text embeddings are damaged; encoding the prompt again")
            run.set_state("encoding")
            stop.stage = "encoding"
            start = time.perf_counter()
            reporter.stage("loading text encoders")
            llm, clip = stages.text_encoders()
            reporter.stage("encoding text")
            embeddings = encode_prompts(llm, clip, [request.prompt], request.frames)
            _release(llm, clip)
            del llm, clip
            empty_cache(device)
            run.save_embeddings(embeddings)
            seconds["encoding"] = round(time.perf_counter() - start, 3)
        else:
            resumed_from = "cached text embeddings"
        if any(embeddings.truncated):
            reporter.warn(f"the prompt is longer than {TEXT_LEN} tokens: its end was cut off (the model reads {TEXT_LEN})")

        # ---- denoising, checkpointed after every step
        step, saved, warnings = run.latest_latents()
        for warning in warnings:
            reporter.warn(warning)
        if saved is None:
            saved = initial_noise(tuple(settings["latent_shape"]), request.seed)
        else:
            resumed_from = f"step {step}/{request.steps}"
        run.set_state("denoising")
        if step < request.steps:
            latents = _denoise(run, stages, embeddings, saved, step, request, device, reporter, stop)
        else:  # killed between the last checkpoint and the final latents
            latents = saved
        run.save_final(latents)
    else:
        resumed_from = "decoding"

    # ---- decode and write
    run.set_state("decoding")
    stop.stage = "decoding"
    start = time.perf_counter()
    reporter.stage("loading VAE")
    vae = stages.vae()
    reporter.stage("decoding")
    frames = stages.decode(vae, latents, lambda done, total: reporter.advance(done, total=total))
    _release(vae)
    del vae
    empty_cache(device)
    reporter.stage("writing video")
    video, first_frame = write_outputs(frames, run.folder / VIDEO, run.folder / FIRST_FRAME)
    seconds["decoding"] = round(time.perf_counter() - start, 3)
    outputs = {"video": VIDEO, "first_frame": FIRST_FRAME}
    if settings.get("out"):
        out = Path(settings["out"])
        out = out / f"{run.id}.mp4" if out.is_dir() else out
        try:
            shutil.copyfile(video, out)
        except OSError as error:
            raise HyVideoError(f"could not copy the video to {out}: {error.strerror}; it is in {video}") from None
        outputs["out"] = str(out)
    run.manifest["outputs"] = outputs
    run.set_state("done")
    return _result(run, resumed_from, _peak_vram_gb(device))


def _denoise(run: Run, stages, embeddings, latents: torch.Tensor, step: int, request: GenerationRequest,
             device: torch.device, reporter: Reporter, stop: StopRequest) -> torch.Tensor:
    """Euler steps step..N-1, a checkpoint after each; RunInterrupted after the step in which
    a stop was requested."""
    seconds = run.manifest["seconds"]
    reporter.stage("loading DiT")
    stop.stage = "loading DiT"
    dit = stages.dit(calls=request.steps - step)
    reporter.stage("denoising", total=request.steps, completed=step)
    stop.stage = "denoising"
    if stop.is_set():
        raise RunInterrupted(run)
    clock = {"last": time.perf_counter(), "total": seconds.get("denoising", 0.0)}

    def on_step(i: int, current: torch.Tensor) -> None:
        run.save_step(i + 1, current)
        now = time.perf_counter()
        elapsed, clock["last"] = now - clock["last"], now
        clock["total"] += elapsed
        seconds["denoising"] = round(clock["total"], 3)
        reporter.advance(i + 1, s_per_step=elapsed, peak_vram_gb=_peak_vram_gb(device))
        if stop.is_set():
            raise RunInterrupted(run)

    latents = denoise(dit, embeddings, latents, request, device, start_step=step, on_step=on_step)
    stop.stage = None
    _release(dit)
    del dit
    empty_cache(device)
    return latents


def _result(run: Run, resumed_from: str | None = None, peak_vram_gb: float | None = None) -> RunResult:
    outputs = run.manifest.get("outputs") or {}
    final = run.manifest.get("final_latents")
    return RunResult(
        run_id=run.id, folder=str(run.folder), state=run.state, step=run.step, steps=run.steps,
        video=str(run.folder / outputs["video"]) if "video" in outputs else None,
        first_frame=str(run.folder / outputs["first_frame"]) if "first_frame" in outputs else None,
        out=outputs.get("out"), final_latents=str(run.folder / final["file"]) if final else None,
        settings=run.settings, resumed_from=resumed_from, seconds=dict(run.manifest.get("seconds", {})),
        peak_vram_gb=peak_vram_gb,
    )
