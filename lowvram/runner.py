"""One generation as a resumable run: pre-flight checks, text encoding, Euler steps with a
checkpoint after every step, VAE decode, mp4 + PNG (one frame: a PNG image alone). The CLI calls
`start_run` / `resume_run` and draws what `Reporter` is told; nothing here prints.

    run, files, plan = start_run(RunOptions(request, model_dir, runs_dir))  # checks, plan, run folder
    result = execute(run, files, plan, reporter, stop)  # encoding -> denoising -> decoding -> done
    result = resume_run(runs_dir, "20250101-120000-a-fox", reporter=reporter, stop=stop)

The profile is resolved and planned once (`planner.resolve`), stored in the run's settings, and the
Plan is what the `Stages` are built from. Each stage loads only its own models and frees them
before the next (text encoders, then the DiT, then the VAE), also when it is interrupted, so a
resume in "decoding" never loads the DiT and a resume in "denoising" never loads the text encoders.
How a stage gets its model onto the GPU (quantized, block-streamed, tiled) is `Stages`' business.
Several runs (a batch, lowvram/batch.py) go through `execute_runs` stage by stage: every run's
text encoding, then every run's denoising, then every decode, so each model is loaded once; each
run folder is still exactly a single run's, and resumes the same way.

Ctrl-C: `StopRequest` is set by the CLI's SIGINT handler; during denoising the runner finishes the
current step, saves it and raises `RunInterrupted`; a second Ctrl-C (or one outside the step loop)
raises KeyboardInterrupt at once, which is turned into `RunInterrupted` too (the last saved step
stays valid: every file is written atomically).
"""

import platform
import shutil
import statistics
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hyvideo.checkpoint import ModelFiles, find_model_files
from hyvideo.errors import HyVideoError
from hyvideo.files import file_fingerprint, fingerprint_mismatch
from hyvideo.lora import LoraSpec, lora_bytes
from hyvideo.pipeline import GenerationRequest, denoise, validate_request
from hyvideo.sampler import initial_noise
from hyvideo.text_encoder import TEXT_LEN, encode_prompts
from hyvideo.vae import latent_shape

from .attention_choice import resolve_attention, usable_backend
from .doctor import free_memory
from .measure import StageMeter
from .planner import Plan, plan, resolve
from .profiles import Profile, RunChoices, stored_profile
from .progress import Reporter
from .rewrite import prompt_for_encoding, rewrite_settings
from .runs import FIRST_FRAME, IMAGE, VIDEO, Run, find_run
from .stages import Stages, model_sizes, parameter_count
from .streaming import empty_cache
from .video import write_outputs, write_png

CPU_MAX_DIT_PARAMS = 1_000_000_000  # the real DiT has 12.8 B; tiny test/demo models a few hundred k

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
        self.resume = f"lowvram resume {run.id}"  # the command that continues it (a batch's: resume --batch)


@dataclass
class RunResult:
    run_id: str
    folder: str
    state: str
    step: int
    steps: int
    video: str | None
    first_frame: str | None
    image: str | None  # the result of a one-frame run instead of video + first_frame
    out: str | None
    final_latents: str | None
    settings: dict
    resumed_from: str | None = None  # what a resume skipped: "step 7/50", "decoding", "done", None
    rewritten_prompt: str | None = None  # --rewrite: the prompt that was encoded
    seconds: dict = field(default_factory=dict)
    peak_vram_gb: float | None = None
    stats: dict = field(default_factory=dict)  # what was streamed and tiled (Stages.stats)
    measured: dict = field(default_factory=dict)  # per stage: seconds, peak VRAM / RAM (lowvram/measure.py)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunOptions:
    request: GenerationRequest
    model_dir: Path
    runs_dir: Path
    profile: "str | Profile" = "auto"  # auto | a shipped name | a .toml path | a Profile (the demo's)
    attention: str | None = None  # auto | sdpa | sage | flash; None: the profile's (auto)
    device: str | None = None  # None: cuda if available, else cpu
    out: Path | None = None
    cache_dir: Path | None = None  # quantized weights; None: <model dir>/lowvram-cache
    step_cache: str | None = None  # --cache off | safe | fast; None: as the profile says (off in shipped ones)
    compile: bool | None = None  # --compile: torch.compile the DiT's blocks; None: the profile's (off)
    vram_limit_bytes: int | None = None  # plan for at most this much VRAM (`lowvram bench --cap-gb`)
    loras: list[LoraSpec] = field(default_factory=list)  # --lora PATH[:STRENGTH], their updates add
    rewrite: str | None = None  # "normal" | "master": rewrite the prompt before encoding (lowvram/rewrite.py)
    rewrite_model: Path | None = None  # the rewrite LLM's folder; None: the text encoder (official layout)


# --- pre-flight ------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise HyVideoError(f"--device must be cpu or cuda, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HyVideoError("--device cuda, but PyTorch sees no CUDA GPU (`lowvram doctor` says why); use --device cpu for the tiny demo model")
    return torch.device(device)


def weight_files(files: ModelFiles) -> list[Path]:
    """Every file whose bytes decide the output: DiT (+ FP8 pair), VAE, both text encoders."""
    paths = [*files.dit_weights, files.vae_weights]
    paths += [p for p in (files.dit_fp8, files.dit_fp8_map) if p is not None]
    for folder in (files.llm, files.clip):
        paths += [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES] if folder.is_dir() else []
    return [p for p in paths if p.is_file()]


def check_output_path(out: Path | None, frames: int) -> Path | None:
    """--out must be writable before an hour of compute, not after, and name the right kind of
    file: a one-frame run makes a PNG image, any other an mp4 video."""
    if out is None:
        return None
    out = Path(out)
    if not out.is_dir() and out.suffix.lower() in (".png", ".mp4"):
        wanted = ".png" if frames == 1 else ".mp4"
        if out.suffix.lower() != wanted:
            made = "a PNG image" if frames == 1 else "an mp4 video"
            raise HyVideoError(f"--out {out}: --frames {frames} makes {made}; name it {out.with_suffix(wanted).name} or pass a folder")
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


def start_run(options: RunOptions, reporter: Reporter | None = None) -> tuple[Run, ModelFiles, Plan]:
    """Every check that can fail before compute, the run's profile and plan, then the run folder
    (state "encoding")."""
    settings, model, files, found = prepare_run(options, reporter)
    return Run.create(Path(options.runs_dir), settings, model, versions()), files, found


def prepare_run(options: RunOptions, reporter: Reporter | None = None) -> tuple[dict, dict, ModelFiles, Plan]:
    """Every check that can fail before compute: the run's settings, model fingerprint, files and
    plan; nothing is written (a batch checks all its clips before it creates any run folder)."""
    reporter = reporter or Reporter()
    request = options.request
    validate_request(request)
    choices = RunChoices(options.step_cache, options.attention, options.compile)
    choices.check()
    device = check_device(options.device or default_device())
    files = find_model_files(Path(options.model_dir))
    sizes = model_sizes(files)
    dit_config, vae_config = sizes["dit_config"], sizes["vae_config"]
    loras = [LoraSpec(Path(spec.path).resolve(), spec.strength) for spec in options.loras]
    sizes["lora_bytes"] = lora_bytes(loras, dit_config)  # every key checked against the model here
    params = parameter_count(dit_config)
    if device.type == "cpu" and params >= CPU_MAX_DIT_PARAMS:
        raise HyVideoError(
            f"this is the full-size model ({params / 1e9:.1f} B parameters): it needs an NVIDIA GPU with CUDA and "
            "PyTorch sees none (`lowvram doctor` says why); `lowvram demo` runs a tiny model on the CPU"
        )
    vram, ram = free_memory(device)
    if vram is not None and options.vram_limit_bytes is not None:
        vram = min(vram, options.vram_limit_bytes)
    profile, found = resolve(options.profile, request.width, request.height, request.frames, vram_bytes=vram,
                             ram_bytes=ram, choices=choices, **sizes)
    if vram is None and options.profile != "auto" and not isinstance(options.profile, Profile):
        reporter.warn(f"profile {profile.name} on the CPU: its memory budget is not checked against a GPU")
    out = check_output_path(options.out, request.frames)
    attention = resolve_attention(profile.attention, str(device))
    for note in attention.notes:
        reporter.warn(note)
    settings = {
        **asdict(request), "attention": attention.backend, "device": str(device),
        "profile": {**profile.to_dict(), "source": profile.source},
        "model_dir": str(Path(options.model_dir).resolve()), "out": str(out.resolve()) if out else None,
        "cache_dir": str(Path(options.cache_dir).resolve()) if options.cache_dir else None,
        "latent_shape": [1, *latent_shape(request.frames, request.height, request.width, vae_config)],
        "dit_parameters": params, "rewrite": rewrite_settings(options.rewrite, files, options.rewrite_model),
        "loras": [{"path": str(spec.path), "strength": spec.strength, "fingerprint": file_fingerprint([spec.path])[0]}
                  for spec in loras],
    }
    model = {"layout": files.layout, "fingerprint": file_fingerprint(weight_files(files), files.root)}
    return settings, model, files, found


def run_loras(settings: dict) -> list[LoraSpec]:
    """The LoRAs a run was started with (none for runs from before LoRA support)."""
    return [LoraSpec(Path(entry["path"]), entry["strength"]) for entry in settings.get("loras", [])]


def plan_for_run(run: Run, files: ModelFiles) -> Plan:
    """The plan of a run that was started earlier: its stored profile at its size."""
    s = run.settings
    sizes = model_sizes(files)
    sizes["lora_bytes"] = lora_bytes(run_loras(s), sizes["dit_config"])
    return plan(stored_profile(s["profile"], run.id), s["width"], s["height"], s["frames"], **sizes)


def check_loras_unchanged(run: Run) -> None:
    """A run continues only with the LoRA files it started with, as with its weights."""
    for entry in run.settings.get("loras", []):
        path = Path(entry["path"])
        reason = (fingerprint_mismatch([entry["fingerprint"]], file_fingerprint([path])) if path.is_file()
                  else f"{path} is no longer there")
        if reason:
            raise HyVideoError(
                f"cannot resume run {run.id} with another LoRA: {reason}. The same LoRA files are needed to continue "
                "the same video; restore them, or start a new run with `lowvram generate`"
            )


def resume_run(runs_dir: Path, ref: str | None = None, model_dir: Path | None = None,
               reporter: Reporter | None = None, stop: StopRequest | None = None) -> RunResult:
    """Continue a run from what its folder holds. Refuses other weights than it started with."""
    reporter = reporter or Reporter()
    run = find_run(Path(runs_dir), ref)
    if is_done(run):
        return done_result(run)
    files = resumable_files(run, model_dir, reporter)
    return execute(run, files, plan_for_run(run, files), reporter, stop)


def is_done(run: Run) -> bool:
    return run.finished and run.result_file.is_file()


def resumable_files(run: Run, model_dir: Path | None = None, reporter: Reporter | None = None) -> ModelFiles:
    """The model files to continue `run` with: refuses other weights than it started with."""
    reporter = reporter or Reporter()
    settings = run.settings
    check_device(settings["device"])
    files = find_model_files(Path(model_dir or settings["model_dir"]))
    reason = fingerprint_mismatch(run.manifest["model"]["fingerprint"], file_fingerprint(weight_files(files), files.root))
    if reason:
        raise HyVideoError(
            f"cannot resume run {run.id} with other weights: {reason}. The same weights are needed to continue "
            "the same video; restore them, or start a new run with `lowvram generate`"
        )
    check_loras_unchanged(run)
    if run.manifest.get("versions", {}).get("torch") != torch.__version__:
        reporter.warn(f"run {run.id} started with torch {run.manifest['versions'].get('torch')}, now {torch.__version__}: "
                      "the result may differ slightly from an uninterrupted run")
    return files


# --- the stages ------------------------------------------------------------------------------


def _peak_vram_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# The demo's profile: a 16 GB card's code path at the tiny model's scale, so the demo proves the
# path users run: FP8 DiT from the quantize-once cache with one of its 4 blocks resident and the
# rest streamed through the ring, per-token work in chunks, VAE decoded in 8x8-latent tiles of 4
# latent frames (128x96x17: 12 tiles). The budget is nominal: on the CPU nothing checks it.
DEMO_PROFILE = Profile(
    name="demo", vram_budget_gb=2.0, description="the tiny model through the streamed, tiled low-VRAM path",
    dit_scheme="fp8", encoder_scheme="bf16", resident_blocks=1, prefetch_depth=1, token_chunk=64,
    vae_spatial_tile=8, vae_temporal_tile=4, pin_memory=True, pinned_ram_cap_gb=1.0, source="lowvram demo",
)


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


def execute(run: Run, files: ModelFiles, plan: Plan, reporter: Reporter | None = None,
            stop: StopRequest | None = None) -> RunResult:
    """Run (or continue) `run` to the end. Raises RunInterrupted on Ctrl-C, HyVideoError for user
    problems (recorded in the manifest as "failed"; the run can be resumed once fixed)."""
    return execute_runs([run], files, plan, reporter, stop)[0]


def execute_runs(runs: list[Run], files: ModelFiles, plan: Plan, reporter: Reporter | None = None,
                 stop: StopRequest | None = None) -> list[RunResult]:
    """Run (or continue) several runs stage by stage, each model loaded once: every run's text
    encoding, then every run's denoising, then every run's decoding. The runs share the model,
    device, attention backend, cache dir and profile (a batch's do); `plan` is the plan of the
    largest of them, which the DiT is placed by: its resident blocks leave room for the largest
    clip's activations, so they fit every smaller one (same profile, same token chunk), and where
    a block sits never changes a result. RunInterrupted / a failure names the run in progress."""
    reporter, stop = reporter or Reporter(), stop or StopRequest()
    execution = _Execution(runs, files, plan, reporter, stop)
    with ExitStack() as locks:
        for run in runs:
            locks.enter_context(run.lock())
        try:
            for run in runs:
                run.remove_stray_files()
            return execution.run()
        except (KeyboardInterrupt, RunInterrupted):
            raise RunInterrupted(execution.current) from None
        except HyVideoError as error:
            execution.current.record_failure(str(error))
            raise
        except Exception as error:
            execution.current.record_failure(f"{type(error).__name__}: {error}")
            raise
        finally:
            stop.stage = None


class _Execution:
    """One `execute_runs` call: the shared Stages, the run being worked on (`current`), and each
    run's meter and what its resume skipped. Each run's seconds and measured peaks are its own
    part of a stage, the model's loading included for the run that loaded it."""

    def __init__(self, runs: list[Run], files: ModelFiles, plan: Plan, reporter: Reporter, stop: StopRequest):
        settings = runs[0].settings
        self.runs, self.reporter, self.stop = runs, reporter, stop
        self.device = torch.device(settings["device"])
        attention = usable_backend(settings["attention"], settings["device"])
        for note in attention.notes:
            reporter.warn(note)
        self.stages = Stages(files, plan, self.device, attention.backend, reporter, settings.get("cache_dir"), run_loras(settings))
        self.current = runs[0]
        self.meters = {run.id: StageMeter(self.device) for run in runs}
        self.resumed_from: dict[str, str | None] = {run.id: None for run in runs}
        self.steps_left = sum(run.steps - run.step for run in runs if run.manifest.get("final_latents") is None)
        for run in runs:
            run.manifest.setdefault("seconds", {})
            run.manifest.setdefault("measured", {})

    def run(self) -> list[RunResult]:
        to_denoise = []
        for run in self.runs:
            if run.load_final() is None:
                to_denoise.append(run)
            else:
                self.resumed_from[run.id] = "decoding"
        to_encode = []
        for run in to_denoise:
            if run.load_embeddings() is None:
                if run.manifest.get("embeddings"):
                    self.reporter.warn(f"the cached text embeddings of run {run.id} are damaged; encoding the prompt again")
                to_encode.append(run)
            else:
                self.resumed_from[run.id] = "cached text embeddings"
        self.encode(to_encode)
        self.denoise(to_denoise)
        return self.decode()

    def _clip(self, run: Run) -> None:
        """Tell the reporter which clip of several is worked on now."""
        self.current = run
        if len(self.runs) > 1:
            self.reporter.clip(self.runs.index(run) + 1, len(self.runs), run.id, self.steps_left)

    # ---- text embeddings (cached in each run folder), the encoders loaded once

    def encode(self, runs: list[Run]) -> None:
        prompts = {run.id: run.settings["prompt"] for run in runs}
        for run in (run for run in runs if run.settings.get("rewrite")):  # before the encoders load: its LLM is freed first
            self._clip(run)
            run.set_state("encoding")
            with self.meters[run.id].stage("rewrite"):
                prompts[run.id] = prompt_for_encoding(run, self.stages.files, self.device, self.stages.dtype,
                                                      self.stages.profile.encoder_scheme == "nf4", self.reporter)
            run.manifest["measured"]["rewrite"] = self.meters[run.id].results["rewrite"]
        encoders = None
        try:
            for run in runs:
                self._clip(run)
                run.set_state("encoding")
                self.stop.stage = "encoding"
                meter = self.meters[run.id]
                with meter.stage("text"):
                    if encoders is None:
                        self.reporter.stage("loading text encoders")
                        encoders = self.stages.text_encoders()
                    self.reporter.stage("encoding text")
                    embeddings = encode_prompts(*encoders, [prompts[run.id]], run.settings["frames"])
                run.manifest["measured"]["text"] = meter.results["text"]
                run.manifest["seconds"]["encoding"] = meter.results["text"]["seconds"]
                run.save_embeddings(embeddings)
        finally:
            encoders = None
            empty_cache(self.device)

    # ---- denoising, checkpointed after every step, the DiT placed once

    def denoise(self, runs: list[Run]) -> None:
        model = streamer = None
        try:
            for run in runs:
                self._clip(run)
                settings = run.settings
                request = GenerationRequest(**{k: settings[k] for k in GenerationRequest.__dataclass_fields__})
                embeddings = run.load_embeddings()
                if embeddings is None:  # saved a moment ago by `encode`: the disk lost it
                    raise HyVideoError(f"the text embeddings of run {run.id} cannot be read back; "
                                       f"`lowvram resume {run.id}` encodes them again")
                if any(embeddings.truncated):
                    self.reporter.warn(f"the prompt is longer than {TEXT_LEN} tokens: its end was cut off (the model reads {TEXT_LEN})")
                step, saved, cache_state, warnings = run.latest_latents()
                for warning in warnings:
                    self.reporter.warn(warning)
                if saved is None:
                    saved = initial_noise(tuple(settings["latent_shape"]), request.seed)
                else:
                    self.resumed_from[run.id] = f"step {step}/{request.steps}"
                run.set_state("denoising")
                if step < request.steps:
                    meter = self.meters[run.id]
                    with meter.stage("dit"):
                        began = time.perf_counter()
                        if model is None:
                            self.reporter.stage("loading DiT")
                            self.stop.stage = "loading DiT"
                            model, streamer = self.stages.dit()
                        latents = _denoise(run, self.stages, model, streamer, began, embeddings, saved, step, cache_state,
                                           request, self.device, self.reporter, self.stop)
                    measured = run.manifest["measured"]
                    measured["dit"] = {**measured.get("dit", {}), **meter.results["dit"]}
                else:  # killed between the last checkpoint and the final latents
                    latents = saved
                self.steps_left -= request.steps - step
                run.save_final(latents)
                run.set_state("decoding")
        finally:
            self.stop.stage = None
            if model is not None:
                self.stages.release_dit(model, streamer)
            model = streamer = None
            empty_cache(self.device)

    # ---- decode and write, the VAE loaded once

    def decode(self) -> list[RunResult]:
        results, vae = [], None
        try:
            for run in self.runs:
                self._clip(run)
                run.set_state("decoding")
                self.stop.stage = "decoding"
                start = time.perf_counter()
                meter = self.meters[run.id]
                with meter.stage("vae"):
                    if vae is None:
                        self.reporter.stage("loading VAE")
                        vae = self.stages.vae()
                    self.reporter.stage("decoding")
                    frames = self.stages.decode(vae, run.load_final(), lambda done, total: self.reporter.advance(done, total=total))
                run.manifest["measured"]["vae"] = meter.results["vae"]
                self.reporter.stage("writing image" if run.settings["frames"] == 1 else "writing video")
                _write_outputs(run, frames)
                run.manifest["seconds"]["decoding"] = round(time.perf_counter() - start, 3)
                shared = {k: v for k, v in self.stages.stats.items() if k != "dit"}  # "dit" is each run's own (_denoise)
                run.manifest["stats"] = {**run.manifest.get("stats", {}), **shared}
                run.set_state("done")
                peaks = [m["peak_vram_gb"] for m in meter.results.values() if m.get("peak_vram_gb") is not None]
                results.append(_result(run, self.resumed_from[run.id], max(peaks) if peaks else None))
        finally:
            vae = None
            empty_cache(self.device)
        return results


def _write_outputs(run: Run, frames: torch.Tensor) -> None:
    """video.mp4 and first_frame.png in the run folder (one frame: image.png), and the copy --out
    asked for."""
    if run.settings["frames"] == 1:
        write_png(frames[0], run.folder / IMAGE)
        outputs = {"image": IMAGE}
    else:
        write_outputs(frames, run.folder / VIDEO, run.folder / FIRST_FRAME)
        outputs = {"video": VIDEO, "first_frame": FIRST_FRAME}
    result = run.result_file
    if run.settings.get("out"):
        out = Path(run.settings["out"])
        out = out / f"{run.id}{result.suffix}" if out.is_dir() else out
        try:
            shutil.copyfile(result, out)
        except OSError as error:
            raise HyVideoError(f"could not copy {result.name} to {out}: {error.strerror}; it is in {result}") from None
        outputs["out"] = str(out)
    run.manifest["outputs"] = outputs


def _denoise(run: Run, stages: Stages, model: torch.nn.Module, streamer, began: float, embeddings, latents: torch.Tensor,
             step: int, cache_state, request: GenerationRequest, device: torch.device, reporter: Reporter,
             stop: StopRequest) -> torch.Tensor:
    """Euler steps step..N-1 on the placed DiT, a checkpoint after each (with the step cache's
    state, if any); RunInterrupted after the step in which a stop was requested. `began`: when
    this run's DiT stage began (its time to the first step is recorded as load_seconds)."""
    seconds = run.manifest["seconds"]
    first_forward = streamer.forwards
    cache = None
    measured = run.manifest["measured"].setdefault("dit", {})
    step_seconds = measured.setdefault("step_seconds", [])
    earlier_steps = len(step_seconds)
    try:
        cache = stages.step_cache(model, request.steps, cache_state)
        measured["load_seconds"] = round(time.perf_counter() - began, 3)
        reporter.stage("denoising", total=request.steps, completed=step)
        stop.stage = "denoising"
        if stop.is_set():
            raise RunInterrupted(run)
        clock = {"last": time.perf_counter(), "total": seconds.get("denoising", 0.0)}

        def on_step(i: int, current: torch.Tensor) -> None:
            run.save_step(i + 1, current, cache.state if cache else None)
            now = time.perf_counter()
            elapsed, clock["last"] = now - clock["last"], now
            clock["total"] += elapsed
            seconds["denoising"] = round(clock["total"], 3)
            step_seconds.append(round(elapsed, 3))
            computed = {"dit_steps": len(cache.state.computed)} if cache else {}
            reporter.advance(i + 1, s_per_step=elapsed, peak_vram_gb=_peak_vram_gb(device), **computed)
            if stop.is_set():
                raise RunInterrupted(run)

        def blocks_for_step(i: int):
            return streamer.blocks_for_step(prefetch_next_step=i + 1 < request.steps)

        latents = denoise(model, embeddings, latents, request, device, start_step=step, on_step=on_step,
                          blocks_for_step=blocks_for_step, step_cache=cache)
    finally:
        stop.stage = None
        # The steps that ran the DiT's blocks. The copy counters are per forward: with a step cache
        # they have one entry per computed step of this process.
        computed_steps = list(cache.state.computed) if cache else list(range(request.steps))
        ours = step_seconds[earlier_steps:]
        if stages.profile.compile and first_forward == 0 and len(ours) >= 2:  # compiling happens in the DiT's first step
            measured["compile_seconds"] = round(ours[0] - statistics.median(ours[1:]), 3)
        run.manifest.setdefault("stats", {})["dit"] = {**stages.stats["dit"], **stages.forward_stats(streamer, first_forward),
                                                       "computed_steps": computed_steps}
        cache = None  # (not del: the step closures above refer to it)
    return latents


def done_result(run: Run) -> RunResult:
    """The result of a run that was already done."""
    return _result(run, resumed_from="done")


def _result(run: Run, resumed_from: str | None = None, peak_vram_gb: float | None = None) -> RunResult:
    outputs = run.manifest.get("outputs") or {}
    final = run.manifest.get("final_latents")
    return RunResult(
        run_id=run.id, folder=str(run.folder), state=run.state, step=run.step, steps=run.steps,
        video=str(run.folder / outputs["video"]) if "video" in outputs else None,
        first_frame=str(run.folder / outputs["first_frame"]) if "first_frame" in outputs else None,
        image=str(run.folder / outputs["image"]) if "image" in outputs else None,
        out=outputs.get("out"), final_latents=str(run.folder / final["file"]) if final else None,
        settings=run.settings, resumed_from=resumed_from, rewritten_prompt=run.rewritten_prompt, seconds=dict(run.manifest.get("seconds", {})),
        peak_vram_gb=peak_vram_gb, stats=dict(run.manifest.get("stats", {})), measured=dict(run.manifest.get("measured", {})),
    )
