"""Pre-flight: every check that can fail before compute, done before a run folder exists (start)
or before a run continues (resume). Bad input here is one HyVideoError; nothing is loaded but
config files and the weights' shapes.

    run, files, plan = start_run(RunOptions(request, model_dir, runs_dir))  # checks, plan, run folder
    settings, model, files, plan = prepare_run(options)  # the same checks, nothing written (batches)
    files = resumable_files(run)                          # same weights and LoRA files as it started with

The profile is resolved and planned here, once (`planner.resolve`), and stored in the run's
settings with the attention kernel chosen for this device; the runner (lowvram/generation/runner.py) builds
its stages from that Plan.
"""

import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hyvideo.checkpoint import ModelFiles, find_model_files
from hyvideo.errors import HyVideoError
from hyvideo.files import file_fingerprint, fingerprint_mismatch
from hyvideo.lora import LoraSpec, lora_bytes
from hyvideo.pipeline import GenerationRequest, uses_riflex, validate_request
from hyvideo.vae import latent_shape

from lowvram.attention_choice import resolve_attention
from lowvram.memory import free_memory
from lowvram.parallel import Layout, choose_layout, require_yunchang
from lowvram.planner import Plan, parallel_layout, plan, resolve
from lowvram.profiles import Profile, RunChoices, stored_profile
from lowvram.progress import Reporter
from .ranks import Ranks, current_ranks
from .rewrite import rewrite_settings
from .run_folder import Run
from lowvram.stages import dit_config_for, model_sizes, parameter_count, vae_config_for

CPU_MAX_DIT_PARAMS = 1_000_000_000  # the real DiT has 12.8 B; tiny test/demo models a few hundred k

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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
    rewrite: str | None = None  # "normal" | "master": rewrite the prompt before encoding (lowvram/generation/rewrite.py)
    rewrite_model: Path | None = None  # the rewrite LLM's folder; None: the text encoder (official layout)
    preview: bool = False  # write preview.webp after every step (lowvram/generation/preview.py)


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
    request = replace(request, riflex=uses_riflex(request))  # settled once, stored, so a resume does the same
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
    ranks = current_ranks()
    if ranks and vram is not None:
        vram = ranks.free_vram  # each rank's plan must fit the GPU with the least free
    sizes.update(rank_sizes(ranks))
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
        "parallel": parallel_settings(),
        "dit_parameters": params, "rewrite": rewrite_settings(options.rewrite, files, options.rewrite_model),
        "preview": options.preview,
        "loras": [{"path": str(spec.path), "strength": spec.strength, "fingerprint": file_fingerprint([spec.path])[0]}
                  for spec in loras],
    }
    model = {"layout": files.layout, "fingerprint": file_fingerprint(weight_files(files), files.root)}
    return settings, model, files, found


def check_launch(world: int, mode: str, device: str, files: ModelFiles, video: tuple[int, int, int] | None) -> Layout:
    """`--gpus N` on this machine, before any rank starts: enough GPUs, yunchang installed, and a
    layout the DiT's heads and this video's (width, height, frames) token grid allow (video None: a
    batch, whose clips rank 0 checks one by one). On the CPU, N processes talk gloo (the tests)."""
    if world < 1:
        raise HyVideoError(f"--gpus must be at least 1, not {world}")
    if device.startswith("cuda"):
        count = torch.cuda.device_count()
        if world > count:
            raise HyVideoError(f"--gpus {world}, but {count} CUDA GPU{'s are' if count != 1 else ' is'} visible"
                               " (CUDA_VISIBLE_DEVICES may hide some; `lowvram doctor` lists them); use --gpus "
                               f"{max(count, 1)}")
    require_yunchang()
    return run_layout(world, mode, files, video)


def run_layout(world: int, mode: str, files: ModelFiles, video: tuple[int, int, int] | None) -> Layout:
    """--parallel MODE on `world` ranks for this model and, if given, video (width, height, frames)."""
    if video is None:
        return choose_layout(mode, world, dit_config_for(files).heads)
    return parallel_layout(mode, world, *video, dit_config_for(files), vae_config_for(files))


def rank_sizes(ranks: Ranks | None) -> dict:
    """The planner's per-rank arguments for this process's ranks (none for one process)."""
    return {} if ranks is None else {"layout": ranks.layout, "local_ranks": ranks.local_world}


def parallel_settings() -> dict | None:
    """How this run's ranks split it (None: one process), recorded in its settings."""
    ranks = current_ranks()
    if ranks is None:
        return None
    layout = ranks.layout
    return {"ranks": layout.world, "ulysses": layout.ulysses, "ring": layout.ring}


def describe_parallel(parallel: dict | None) -> str:
    if not parallel:
        return "1 process"
    return f"{parallel['ranks']} ranks (Ulysses {parallel['ulysses']} x ring {parallel['ring']})"


def run_loras(settings: dict) -> list[LoraSpec]:
    """The LoRAs a run was started with (none for runs from before LoRA support)."""
    return [LoraSpec(Path(entry["path"]), entry["strength"]) for entry in settings.get("loras", [])]


def plan_for_run(run: Run, files: ModelFiles) -> Plan:
    """The plan of a run that was started earlier: its stored profile at its size."""
    s = run.settings
    sizes = model_sizes(files)
    sizes["lora_bytes"] = lora_bytes(run_loras(s), sizes["dit_config"])
    sizes.update(rank_sizes(current_ranks()))  # the layout it continues on, which may be another than it started on
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
    started, now = settings.get("parallel"), parallel_settings()
    if started != now and run.manifest.get("final_latents") is None:  # steps are left to run on another layout
        reporter.warn(f"run {run.id} ran its first {run.step} steps on {describe_parallel(started)}, now on "
                      f"{describe_parallel(now)}: attention sums its parts in another order, so the video may differ "
                      "slightly from an uninterrupted run (resuming on the same layout is bit-identical)")
    if run.manifest.get("versions", {}).get("torch") != torch.__version__:
        reporter.warn(f"run {run.id} started with torch {run.manifest['versions'].get('torch')}, now {torch.__version__}: "
                      "the result may differ slightly from an uninterrupted run")
    return files
