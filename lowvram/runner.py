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

import gc
import json
import platform
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hyvideo.attention import check_backend
from hyvideo.checkpoint import ModelFiles, find_model_files, load_dit, load_vae, read_torch_file, infer_dit_config
from hyvideo.config import DiTConfig, VAEConfig
from hyvideo.errors import HyVideoError
from hyvideo.pipeline import GenerationRequest, HunyuanVideoPipeline, validate_request
from hyvideo.sampler import initial_noise
from hyvideo.text_encoder import ClipTextEncoder, LlamaTextEncoder, TEXT_LEN, encode_prompts

from .runs import FIRST_FRAME, VIDEO, Run, file_fingerprint, find_run, fingerprint_mismatch
from .video import write_outputs

CPU_MAX_DIT_PARAMS = 1_000_000_000  # the real DiT has 12.8 B; tiny test/demo models a few hundred k
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# --- progress, interrupts, results -----------------------------------------------------------


class Reporter:
    """Progress callbacks; these do nothing. The CLI subclasses it with rich progress bars.

    stage(name, total): a stage starts ("loading text encoders", "encoding text", "loading DiT",
    "denoising", "loading VAE", "decoding", "writing video"); total = number of units (steps, tiles)
    or None. advance(completed, **info): units done so far (info: s_per_step, peak_vram_gb).
    warn(message): something the user should know that does not stop the run.
    """

    def stage(self, name: str, total: int | None = None, completed: int = 0) -> None:
        pass

    def advance(self, completed: int, **info) -> None:
        pass

    def warn(self, message: str) -> None:
        pass


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


def dit_config_for(files: ModelFiles) -> DiTConfig:
    """The DiT's config without loading its weights: diffusers' config.json, or the official
    checkpoint's tensor shapes (memory-mapped, so nothing is read but the shapes)."""
    if files.layout == "diffusers":
        try:
            return DiTConfig.from_diffusers(json.loads(files.dit_config.read_text()))
        except (OSError, ValueError, KeyError) as error:
            raise HyVideoError(f"{files.dit_config} is not a HunyuanVideo transformer config ({error}); download it again") from None
    source = files.dit_weights[0] if files.dit_weights else files.dit_fp8
    return infer_dit_config(read_torch_file(source))


def vae_config_for(files: ModelFiles) -> VAEConfig:
    try:
        return VAEConfig.from_dict(json.loads(files.vae_config.read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise HyVideoError(f"{files.vae_config} is not a VAE config ({error}); download it again") from None


def parameter_count(config: DiTConfig) -> int:
    from hyvideo.dit import HunyuanVideoDiT

    with torch.device("meta"):
        return sum(p.numel() for p in HunyuanVideoDiT(config).parameters())


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


def _empty_cache(device: torch.device) -> None:
    gc.collect()  # transformers models hold reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_vram_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


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
            _empty_cache(device)
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
    _empty_cache(device)
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
    pipeline = HunyuanVideoPipeline(dit, None, None, None, device)
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

    latents = pipeline.denoise(embeddings, latents, request, start_step=step, on_step=on_step)
    stop.stage = None
    _release(dit)
    del dit, pipeline
    _empty_cache(device)
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


# --- sizes -----------------------------------------------------------------------------------

# Official size buckets as width x height (facts §5.4; the Gradio demo's labels give the aspect).
SIZE_BUCKETS = {
    "540p": {"16:9": (960, 544), "9:16": (544, 960), "4:3": (832, 624), "3:4": (624, 832), "1:1": (720, 720)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "4:3": (1104, 832), "3:4": (832, 1104), "1:1": (960, 960)},
}
DEFAULT_RESOLUTION, DEFAULT_ASPECT = "720p", "16:9"


def parse_size(text: str) -> tuple[int, int]:
    """"1280x720" -> (1280, 720)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise HyVideoError(f"--size must be WIDTHxHEIGHT, e.g. 1280x720; got {text!r}") from None
    return width, height


def resolve_size(size: str | None, resolution: str | None, aspect: str | None) -> tuple[int, int]:
    """--size WxH, or an official bucket from --resolution and --aspect (default 720p 16:9)."""
    if size is not None:
        if resolution is not None or aspect is not None:
            raise HyVideoError("give either --size or --resolution/--aspect, not both")
        return parse_size(size)
    resolution, aspect = resolution or DEFAULT_RESOLUTION, aspect or DEFAULT_ASPECT
    if resolution not in SIZE_BUCKETS:
        raise HyVideoError(f"--resolution must be one of {', '.join(SIZE_BUCKETS)}; got {resolution!r} (or use --size WxH)")
    if aspect not in SIZE_BUCKETS[resolution]:
        raise HyVideoError(f"--aspect must be one of {', '.join(SIZE_BUCKETS[resolution])}; got {aspect!r}")
    return SIZE_BUCKETS[resolution][aspect]


# --- the seam to lowvram's profiles, planner and placement ------------------------------------
#
# A run's profile is stored in its settings as a plain dict (what `Profile.to_dict()` gives, or
# PLAIN below). `resolve_profile` turns --profile into that dict (checking that it fits), and
# `build_stages` turns the dict back into the objects that load each stage's models.

PLAIN = "plain"  # every model whole on the device, unquantized; the tiny model and big GPUs


def plain_profile(device: torch.device) -> dict:
    dtype = "float32" if device.type == "cpu" else "bfloat16"
    return {"name": PLAIN, "description": "whole models on the device, unquantized", "dtype": dtype}


def gpu_memory() -> tuple[int, int]:
    """(free VRAM, available host RAM) in bytes, for choosing a profile."""
    from .doctor import host_ram

    free, _ = torch.cuda.mem_get_info()
    total, available = host_ram()
    return free, available or total or 0


def suggest_fit(width: int, height: int, frames: int, vram_bytes: int, ram_bytes: int | None,
                dit_config: DiTConfig | None = None, vae_config: VAEConfig | None = None) -> str | None:
    """What would fit this memory: `--profile NAME` (same video), else a smaller video."""
    from .profiles import choose_profile

    kwargs = {"dit_config": dit_config, "vae_config": vae_config}
    try:
        return f"--profile {choose_profile(vram_bytes, ram_bytes or 0, width, height, frames, **kwargs).name}"
    except HyVideoError:
        pass
    aspect = next((a for buckets in SIZE_BUCKETS.values() for a, wh in buckets.items() if wh == (width, height)), "16:9")
    shorter = [f for f in (65, 33) if f < frames]
    smaller = [(f"--frames {f}", (width, height, f)) for f in shorter]
    if SIZE_BUCKETS["540p"][aspect] != (width, height):
        small = SIZE_BUCKETS["540p"][aspect]
        smaller[1:1] = [(f"--resolution 540p --aspect {aspect}", (*small, frames))]
        smaller += [(f"--resolution 540p --aspect {aspect} --frames {f}", (*small, f)) for f in shorter]
    for hint, (w, h, f) in smaller:
        try:
            name = choose_profile(vram_bytes, ram_bytes or 0, w, h, f, **kwargs).name
            return f"{hint} --profile {name}"
        except HyVideoError:
            continue
    return None


def resolve_profile(spec: str, device: torch.device, dit_config: DiTConfig, vae_config: VAEConfig,
                    request: GenerationRequest, params: int, reporter: Reporter) -> dict:
    """--profile (auto | plain | a shipped name | a .toml path) -> the profile dict for the run."""
    from .profiles import choose_profile, load_profile

    if spec not in ("auto", PLAIN):
        profile = load_profile(spec)  # unknown name or malformed file -> HyVideoError
        if device.type == "cpu":  # only the tiny model gets here: run the profile's code path as is
            reporter.warn(f"profile {profile.name} on the CPU: its memory budget is not checked")
            return {**profile.to_dict(), "source": profile.source}
    if device.type == "cpu" or spec == PLAIN or (spec == "auto" and params < CPU_MAX_DIT_PARAMS):
        return plain_profile(device)
    vram, ram = gpu_memory()
    size = (request.width, request.height, request.frames)
    if spec == "auto":
        profile = choose_profile(vram, ram, *size, dit_config=dit_config, vae_config=vae_config)
    else:
        from .planner import plan, with_budget

        if vram < profile.vram_budget_bytes:  # as choose_profile does: "auto" resident blocks use what is free
            profile = with_budget(profile, vram)
        found = plan(profile, *size, host_ram_bytes=ram, dit_config=dit_config, vae_config=vae_config)
        if not found.fits:
            hint = suggest_fit(*size, vram, ram, dit_config, vae_config)
            raise HyVideoError(
                f"profile {profile.name} does not fit {request.width}x{request.height}x{request.frames} here: it needs "
                f"{found.required_vram_gb:.1f} GiB VRAM ({vram / 2**30:.1f} free) and {found.peak_ram_gb:.1f} GiB RAM "
                f"({ram / 2**30:.1f} available); " + (f"try {hint}" if hint else "try a smaller --size or fewer --frames")
            )
    return {**profile.to_dict(), "source": profile.source}


class PlainStages:
    """Each stage's model loaded whole onto the device, unquantized (profile "plain")."""

    def __init__(self, files: ModelFiles, profile: dict, device: torch.device, attention: str):
        self.files, self.device, self.attention = files, device, attention
        cpu = device.type == "cpu"
        self.dit_dtype = torch.float32 if cpu else torch.bfloat16
        self.vae_dtype = self.text_dtype = torch.float32 if cpu else torch.float16

    def text_encoders(self) -> tuple[LlamaTextEncoder, ClipTextEncoder]:
        files = self.files
        llm = LlamaTextEncoder.from_folder(files.llm, dtype=self.text_dtype, device=self.device, tokenizer_folder=files.llm_tokenizer)
        clip = ClipTextEncoder.from_folder(files.clip, dtype=self.text_dtype, device=self.device, tokenizer_folder=files.clip_tokenizer)
        return llm, clip

    def dit(self, calls: int = 1):
        dit = load_dit(self.files, self.dit_dtype).to(self.device)
        dit.attention_backend = self.attention
        return dit

    def vae(self):
        return load_vae(self.files, self.vae_dtype).to(self.device)

    def decode(self, vae, latents: torch.Tensor, on_progress) -> torch.Tensor:
        frames = HunyuanVideoPipeline(None, vae, None, None, self.device).decode(latents)
        on_progress(1, 1)
        return frames


class StreamedDiT:
    """The DiT as the denoising loop calls it (`dit(x, t, ...)`, `.compute_dtype`), its blocks
    coming from a BlockStreamer (lowvram/streaming.py) placed per the run's memory plan."""

    def __init__(self, model, streamer, calls: int):
        self.model, self.streamer, self.calls_left = model, streamer, calls

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    def __call__(self, *args):
        self.calls_left -= 1
        return self.model(*args, blocks=self.streamer.blocks_for_step(prefetch_next_step=self.calls_left > 0))

    def release(self) -> None:
        from .placement import release_dit

        release_dit(self.model, self.streamer, keep_on_host=False)


QUANT_POLICY_NAMES = {"official": "blocks"}  # profiles' name (lowvram/weights.py) -> quant/policy.py's


def quant_cache_dir(files: ModelFiles) -> Path:
    """Where `lowvram quantize` and the fp8/int8 profiles keep the quantized DiT."""
    return Path(files.root) / "lowvram-cache"


class ProfileStages:
    """Stages placed per a memory profile: the LLM in NF4 (or bf16), the DiT quantized (Tencent's
    FP8 file, or the quantize-once cache) with its blocks resident or streamed per the memory plan,
    the VAE decoded in tiles."""

    def __init__(self, files: ModelFiles, profile: dict, device: torch.device, attention: str, size: tuple[int, int, int],
                 reporter: Reporter):
        from .planner import plan
        from .profiles import profile_from_dict

        values = {k: v for k, v in profile.items() if k != "source"}
        self.profile = profile_from_dict(values, profile.get("source") or profile["name"])
        self.files, self.device, self.attention, self.reporter = files, device, attention, reporter
        self.dit_config, self.vae_config = dit_config_for(files), vae_config_for(files)
        self.plan = plan(self.profile, *size, dit_config=self.dit_config, vae_config=self.vae_config)

    def text_encoders(self) -> tuple[LlamaTextEncoder, ClipTextEncoder]:
        from transformers import AutoTokenizer

        files = self.files
        if self.profile.encoder_scheme == "nf4":
            from quant.nf4 import load_llm_nf4

            loaded = load_llm_nf4(files.llm, self.device)
            if loaded.reason:
                self.reporter.warn(f"NF4 text encoder unavailable ({loaded.reason}); running it in bf16 on the CPU")
            tokenizer = AutoTokenizer.from_pretrained(files.llm_tokenizer, padding_side="right", local_files_only=True)
            llm = LlamaTextEncoder(loaded.model, tokenizer)
        else:
            llm = LlamaTextEncoder.from_folder(files.llm, dtype=torch.bfloat16, device=self.device, tokenizer_folder=files.llm_tokenizer)
        clip = ClipTextEncoder.from_folder(files.clip, dtype=torch.float16 if self.device.type == "cuda" else torch.float32,
                                           device=self.device, tokenizer_folder=files.clip_tokenizer)
        return llm, clip

    def _load_dit_on_host(self):
        from hyvideo.checkpoint import load_dit_state_dict

        files, scheme = self.files, self.profile.dit_scheme
        if scheme == "bf16":
            return load_dit(files, torch.bfloat16)
        if scheme == "fp8" and files.dit_fp8 is not None:
            from quant.tencent_fp8 import load_tencent_fp8

            return load_tencent_fp8(files.dit_fp8, self.dit_config, files.dit_fp8_map, device="cpu")
        from quant.cache import cache_status, ensure_dit_cache, load_cached_dit

        policy = QUANT_POLICY_NAMES.get(self.profile.quant_policy, self.profile.quant_policy)
        cache = quant_cache_dir(files)
        status = cache_status(cache, self.dit_config, scheme, policy, files.dit_weights)
        if status.state != "fresh":
            self.reporter.stage(status.message)
            ensure_dit_cache(files.dit_weights, lambda: load_dit_state_dict(files)[0], self.dit_config, scheme, policy, cache)
            self.reporter.stage("loading DiT")
        return load_cached_dit(cache, self.dit_config, scheme, policy, files.dit_weights, device="cpu")

    def dit(self, calls: int = 1):
        from .placement import prepare_dit

        model = self._load_dit_on_host()
        model.attention_backend = self.attention
        return StreamedDiT(model, prepare_dit(model, self.plan, self.device), calls)

    def vae(self):
        return load_vae(self.files, torch.float16 if self.device.type == "cuda" else torch.float32).to(self.device)

    def decode(self, vae, latents: torch.Tensor, on_progress) -> torch.Tensor:
        from hyvideo.pipeline import latents_to_frames

        from .tiled_vae import TiledVAE

        dtype = next(vae.parameters()).dtype
        z = (latents / vae.config.scaling_factor).to(self.device, dtype)
        tiled = TiledVAE(vae, self.profile.vae_spatial_tile, self.profile.vae_temporal_tile, output_device="cpu")
        with torch.inference_mode():
            video = tiled.decode(z)
        on_progress(1, 1)
        return latents_to_frames(video)


def build_stages(files: ModelFiles, profile: dict, device: torch.device, attention: str,
                 size: tuple[int, int, int] = (0, 0, 0), reporter: Reporter | None = None):
    """The object that loads each stage's models for `profile`: text_encoders() -> (llm, clip),
    dit(calls) -> a callable DiT (with .compute_dtype, optionally .release()), vae(),
    decode(vae, latents, on_progress) -> uint8 frames."""
    if profile["name"] == PLAIN:
        return PlainStages(files, profile, device, attention)
    return ProfileStages(files, profile, device, attention, size, reporter or Reporter())
