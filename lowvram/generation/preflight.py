"""Pre-flight: every check that can fail before compute, done before a run folder exists (start)
or before a run continues (resume). Bad input here is one HyVideoError; nothing is loaded but
config files and the weights' shapes.

    run, files, plan = start_run(RunOptions(request, model_dir, runs_dir))  # checks, plan, run folder
    settings, model, files, plan = prepare_run(options)  # the same checks, nothing written (batches)
    files = resumable_files(run)                          # same weights and LoRA files as it started with
    answer = plan_only(PlanQuery(1280, 720, 129, vram_bytes=24 * 2**30))  # `lowvram plan`: no weights needed

The profile is settled here, once (`profiles.settle_profile`: the profile with the user's
overrides), chosen and planned (`planner.resolve`), and stored in the run's settings with the
attention kernel chosen for this device; the runner (lowvram/generation/runner.py) builds
its stages from that Plan.
"""

import dataclasses
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hyvideo.checkpoint import ModelFiles, find_model_files
from hyvideo.errors import HyVideoError
from hyvideo.files import file_fingerprint, fingerprint_mismatch
from hyvideo.image import open_image
from hyvideo.lora import LoraSpec, lora_bytes
from hyvideo.pipeline import LATENT_CONCAT_DROPPED_FRAMES, GenerationRequest, uses_riflex, validate_request
from hyvideo.step_cache import expected_forwards
from hyvideo.v15_checkpoint import FAMILY as V15_FAMILY
from hyvideo.v15_checkpoint import MODEL_PREFIX
from hyvideo.v15_config import V15_TRAINED_FRAMES, V15DiTConfig
from hyvideo.v15_step_cache import DEEPCACHE
from hyvideo.v15_image import v15_bucket, v15_target_size, v15_video_size
from hyvideo.v15_text import find_v15_text_files
from hyvideo.vae import latent_shape
from lowvram.attention_choice import resolve_attention
from lowvram.communication import PCIE4_X8_GBS
from lowvram.memory import free_memory
from lowvram.parallel import Layout, choose_layout, require_yunchang
from lowvram.families import RELEASED_NAMES, RELEASED_V15, released_model_sizes, trained_frames
from lowvram.planner import Plan, parallel_layout, plan, resolve, suggest_fit
from lowvram.profiles import Overrides, Profile, settle_profile, stored_profile
from .packages import check_packages
from lowvram.progress import Reporter
from lowvram.stages import CPU_MAX_DIT_PARAMS, dit_config_for, model_sizes, parameter_count, vae_config_for

from .ranks import Ranks, current_ranks
from .rewrite import rewrite_settings
from .run_folder import Run

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class RunOptions:
    request: GenerationRequest
    model_dir: Path
    runs_dir: Path
    profile: "str | Profile" = "auto"  # auto | a shipped name | a .toml path | a Profile (the demo's)
    overrides: Overrides = Overrides()  # --cache, --attention, --compile, --fp8-matmul, --pin: the profile's fields
    device: str | None = None  # None: cuda if available, else cpu
    out: Path | None = None
    cache_dir: Path | None = None  # quantized weights; None: <model dir>/lowvram-cache
    vram_limit_bytes: int | None = None  # plan for at most this much VRAM (`lowvram bench --cap-gb`)
    loras: list[LoraSpec] = field(default_factory=list)  # --lora PATH[:STRENGTH], their updates add
    rewrite: str | None = None  # "normal" | "master": rewrite the prompt before encoding (lowvram/generation/rewrite.py)
    rewrite_model: Path | None = None  # the rewrite LLM's folder; None: the text encoder (official layout)
    preview: bool = False  # write preview.webp after every step (lowvram/generation/preview.py)
    model: str | None = None  # which model in model_dir (hyvideo.checkpoint.find_model_files); None: detected
    sampling_given: frozenset = frozenset()  # of "steps", "guidance", "flow_shift", "frames", "size": set by the user; a
    # HunyuanVideo-1.5 transformer's own defaults fill the others (the request's are the 13B model's)


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
    if files.family == V15_FAMILY:  # DiT, VAE, Qwen2.5-VL, byT5 (+ Tencent's glyph weights)
        paths = [*files.dit_weights, files.vae_weights] + ([files.byt5_weights] if files.byt5_weights else [])
        for folder in (files.llm, files.byt5):
            paths += [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES] if folder.is_dir() else []
        return [p for p in paths if p.is_file()]
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
    if request.image is not None:
        open_image(request.image)  # missing, unreadable, corrupt or another format: one line, now
    device = check_device(options.device or default_device())
    files = find_model_files(Path(options.model_dir), image_to_video=request.image is not None, model=options.model)
    check_model_kind(files, request.image)
    if files.family == V15_FAMILY:
        request = v15_request(request, files, options)
        if files.variant.endswith("_sparse"):
            reporter.warn(f"the {files.variant} transformer was tuned for SSTA sparse attention (flex-block-attn, "
                          "H-series GPUs), which this runner does not have: it runs with dense attention, the exact "
                          "function the sparse blocks approximate (slower at 720p, not faster)")
        if request.frames > V15_TRAINED_FRAMES:
            reporter.warn(f"HunyuanVideo-1.5 was trained on clips of up to {V15_TRAINED_FRAMES} frames; {request.frames} run "
                          "without RIFLEx (none is published for 1.5) and may repeat or freeze past that")
    sizes = model_sizes(files, (request.height, request.width))
    dit_config, vae_config = sizes["dit_config"], sizes["vae_config"]
    check_latent_concat_frames(getattr(dit_config, "image_condition_type", None), request.frames)
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
    candidates = settle_profile(options.profile, options.overrides, gpu=vram is not None)
    alternatives = settle_profile("auto", options.overrides)
    candidates = family_step_cache(dit_config, candidates, options.overrides, reporter)
    alternatives = family_step_cache(dit_config, alternatives, options.overrides)
    profile, found = resolve(candidates, request.width, request.height, request.frames, vram_bytes=vram, ram_bytes=ram,
                             alternatives=alternatives, **sizes)
    if vram is None and options.profile != "auto" and not isinstance(options.profile, Profile):
        reporter.warn(f"profile {profile.name} on the CPU: its memory budget is not checked against a GPU")
    check_packages(profile.dit_scheme, profile.encoder_scheme, request.frames, device)
    out = check_output_path(options.out, request.frames)
    attention = resolve_attention(profile.attention, str(device), dit_config.heads, dit_config.head_dim)
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
    if request.image is not None:
        image = Path(request.image).resolve()
        settings.update(image=str(image), image_fingerprint=file_fingerprint([image])[0],
                        image_condition=getattr(dit_config, "image_condition_type", None))  # 1.5: condition channels
    if files.family == V15_FAMILY:  # a resume takes the same transformer, whatever else the folder holds
        settings["model"] = f"{MODEL_PREFIX}{files.variant}"
    model = {"layout": files.layout, "fingerprint": file_fingerprint(weight_files(files), files.root)}
    return settings, model, files, found


def v15_request(request: GenerationRequest, files, options: RunOptions) -> GenerationRequest:
    """A HunyuanVideo-1.5 request: the transformer's own steps, guidance (real CFG's scale), flow
    shift, 1.5's 121 frames and (text to video) its own resolution where the user set none;
    image-to-video's video takes the transformer's bucket for the image (its 480p or 720p base
    size, the image's aspect), as diffusers' pipeline, whatever size was asked; RIFLEx, which has
    no published component for 1.5, is refused here."""
    if options.request.riflex:
        raise HyVideoError("--riflex on: RIFLEx lowers the RoPE component whose period matches where a model's clips "
                           "start to repeat, which is measured per model (HunyuanVideo's is published); none is published "
                           "for HunyuanVideo-1.5, so it runs with its trained RoPE: leave --riflex out")
    defaults = files.sampling
    chosen = {"steps": defaults.steps, "guidance": defaults.guidance_scale, "flow_shift": defaults.flow_shift,
              "frames": V15_TRAINED_FRAMES}
    request = replace(request, riflex=False, **{k: v for k, v in chosen.items() if k not in options.sampling_given})
    if request.image is None and "size" not in options.sampling_given:
        width, height = v15_video_size(files.variant, request.width, request.height)
        request = replace(request, width=width, height=height)
    if request.image is not None:
        if find_v15_text_files(files.root, files.layout).vision is None:
            raise HyVideoError(f"image-to-video needs the SigLIP vision encoder in {files.root}: diffusers' image_encoder/ and "
                               "feature_extractor/, or Tencent's vision_encoder/siglip/ (FLUX.1-Redux-dev); download it")
        height, width = v15_bucket(open_image(request.image).size, v15_target_size(files.variant))
        request = replace(request, width=width, height=height)
    return request


I2V_WEIGHTS = "HunyuanVideo-I2V weights (tencent/HunyuanVideo-I2V or hunyuanvideo-community/HunyuanVideo-I2V)"


V15_I2V_WEIGHTS = ("a HunyuanVideo-1.5 image-to-video transformer (480p_i2v, 720p_i2v, their distilled forms or "
                   "480p_i2v_step_distilled: tencent/HunyuanVideo-1.5 transformer/<variant>/ with vision_encoder/siglip/, "
                   "or hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-<variant>)")


def check_model_kind(files: ModelFiles, image: str | None) -> None:
    """--image needs image-to-video weights, and those weights need an image."""
    if files.family == V15_FAMILY:
        if image is not None and not files.image_to_video:
            raise HyVideoError(f"--image needs {V15_I2V_WEIGHTS}; {files.root} holds the {files.variant} transformer: "
                               "pass --model-dir (or --model) with an i2v one")
        if image is None and files.image_to_video:
            raise HyVideoError(f"{files.root} holds the HunyuanVideo-1.5 {files.variant} transformer (image-to-video): "
                               "pass --image PATH, or --model-dir (or --model) with a t2v one")
        return
    if image is not None and not files.image_to_video:
        raise HyVideoError(f"--image needs {I2V_WEIGHTS}; {files.root} holds the text-to-video model: "
                           "pass --model-dir with the I2V folder")
    if image is None and files.image_to_video:
        raise HyVideoError(f"{files.root} holds the image-to-video model (HunyuanVideo-I2V): pass --image PATH, "
                           "or --model-dir with the text-to-video weights")


def check_latent_concat_frames(condition: str | None, frames: int) -> None:
    """latent_concat I2V weights decode the first latent frame into frames that are dropped (as the
    official code does): a clip must keep more than one frame after that."""
    if condition == "latent_concat" and frames - LATENT_CONCAT_DROPPED_FRAMES <= 1:
        raise HyVideoError(f"--frames {frames} with latent_concat I2V weights: their first {LATENT_CONCAT_DROPPED_FRAMES} "
                           f"frames are dropped (as the official code does), leaving {frames - LATENT_CONCAT_DROPPED_FRAMES}; "
                           f"use --frames {LATENT_CONCAT_DROPPED_FRAMES + 5} or more")


def family_step_cache(dit_config, profiles: list[Profile], overrides: Overrides = Overrides(),
                      reporter: Reporter | None = None) -> list[Profile]:
    """Each model's own step cache, settled on the candidate profiles: TeaCache (safe, fast) on the
    13B text-to-video DiT; none on the 13B image-to-video DiTs (TeaCache's coefficients were fit on
    the text-to-video DiT); on HunyuanVideo-1.5 DeepCache, Tencent's published schedule (no TeaCache
    coefficients are published for it), except with the step-distilled transformer, with which
    Tencent's generate.py refuses it. Another cache asked for with --cache is one HyVideoError; a
    profile's own is turned off (said in one line)."""
    asked = overrides.step_cache
    if isinstance(dit_config, V15DiTConfig) and dit_config.use_meanflow:  # the step-distilled transformer
        allowed, why = ("off",), (f"--cache {asked} with the step-distilled transformer: Tencent's generate.py refuses a step "
                                  "cache with it (quality drops), and its 8-12 steps leave nothing to skip; leave out --cache")
    elif isinstance(dit_config, V15DiTConfig):
        allowed, why = ("off", DEEPCACHE), (f"--cache {asked} with HunyuanVideo-1.5: no TeaCache coefficients are published "
                                            "for it; --cache deepcache runs Tencent's DeepCache schedule")
    elif dit_config.image_condition_type:
        allowed, why = ("off",), (f"--cache {asked} with --image: the step cache's coefficients were fit on the text-to-video "
                                  "DiT, so image-to-video runs without it; leave out --cache")
    else:
        allowed, why = ("off", "safe", "fast"), (f"--cache {asked}: DeepCache's schedule is HunyuanVideo-1.5's; the 13B model "
                                                 "takes --cache safe or fast (TeaCache)")
    if asked is not None and asked not in allowed:
        raise HyVideoError(why)
    if reporter and any(p.step_cache not in allowed for p in profiles):
        reporter.warn(f"the step cache is off for this model (the profile's {profiles[0].step_cache} is another model's)")
    return [p if p.step_cache in allowed else dataclasses.replace(p, step_cache="off") for p in profiles]


@dataclass
class PlanQuery:
    """`lowvram plan`: a video on the released 13B model, for this machine or the memory given."""

    width: int
    height: int
    frames: int | None  # None: the model's trained length (families.trained_frames)
    steps: int = 50
    size_given: bool = True  # False: width x height are the default's, and a 1.5 model takes its own resolution
    profile: str = "auto"
    overrides: Overrides = Overrides()
    loras: list[LoraSpec] = field(default_factory=list)
    vram_bytes: int | None = None  # None: this GPU's free VRAM (a profile's own budget without a GPU)
    ram_bytes: int | None = None  # None: this machine's available RAM
    gpus: int | None = None  # sequence parallelism over this many GPUs (VRAM per GPU, RAM per machine)
    parallel: str = "usp"
    link_gbs: float = PCIE4_X8_GBS  # each GPU's link, for the communication estimate
    model: str = "t2v"  # t2v | i2v | i2v-33ch | 1.5-<variant>: which released model (families.RELEASED_DITS, RELEASED_V15)


@dataclass
class PlanAnswer:
    result: dict  # what `lowvram plan --json` prints
    plan: Plan | None  # None: no profile fits at all ("auto")
    profile: Profile | None
    forwards: tuple[int, int]  # (fewest, most) DiT forwards the step cache is expected to run


def plan_only(query: PlanQuery) -> PlanAnswer:
    """The same settling, memory probing and planning as a run, without weights or a run folder."""
    if query.frames is None:
        query = replace(query, frames=trained_frames(query.model))
    if query.model in RELEASED_V15 and not query.size_given and "_i2v" not in query.model:
        query = replace(query, **dict(zip(("width", "height"), v15_video_size(RELEASED_V15[query.model], query.width, query.height))))
    validate_request(GenerationRequest("plan", width=query.width, height=query.height, frames=query.frames, steps=query.steps))
    if query.link_gbs <= 0:
        raise HyVideoError(f"--link-gbs must be positive, not {query.link_gbs:g}")
    sizes = released_model_sizes(query.model, query.width, query.height)
    sizes["lora_bytes"] = lora_bytes(query.loras, sizes["dit_config"])  # every key checked against the DiT, no weights read
    if query.gpus is not None:
        sizes["layout"] = parallel_layout(query.parallel, query.gpus, query.width, query.height, query.frames)
    free_vram, free_ram = free_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    vram = query.vram_bytes if query.vram_bytes is not None else free_vram
    ram = query.ram_bytes if query.ram_bytes is not None else free_ram
    if query.profile == "auto" and vram is None:
        raise HyVideoError("no CUDA GPU here: pass --vram GB (e.g. --vram 24) to plan for a card, or --profile NAME")
    candidates = settle_profile(query.profile, query.overrides, gpu=vram is not None)
    alternatives = settle_profile("auto", query.overrides)
    candidates = family_step_cache(sizes["dit_config"], candidates, query.overrides)
    alternatives = family_step_cache(sizes["dit_config"], alternatives, query.overrides)
    video = (query.width, query.height, query.frames)
    model = {"name": query.model, "description": RELEASED_NAMES[query.model]}  # which model the plan is for
    try:
        profile, found = resolve(candidates, *video, vram_bytes=vram, ram_bytes=ram, must_fit=False, **sizes)
    except HyVideoError as error:  # "auto" and no profile fits: say what would
        if len(candidates) == 1:
            raise
        result = {"model": model, "fits": False, "peak_vram_gb": None, "peak_ram_gb": None, "profile": None, "stages": {},
                  "reason": str(error), "suggestion": suggest_fit(*video, vram, ram, alternatives, **sizes)}
        return PlanAnswer(result, None, None, (query.steps, query.steps))
    result = {"model": model, **found.to_dict(query.link_gbs)}
    per_step = sizes.get("forwards_per_step", 1)  # 2 under HunyuanVideo-1.5's real CFG
    forwards = tuple(per_step * n for n in expected_forwards(profile.step_cache, query.steps))
    result["step_cache"] = {"preset": profile.step_cache, "steps": query.steps, "expected_dit_forwards": list(forwards)}
    if not found.fits:
        result["suggestion"] = suggest_fit(*video, found.vram_budget_bytes, ram, alternatives, **sizes)
    return PlanAnswer(result, found, profile, forwards)


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
    sizes = model_sizes(files, (s["height"], s["width"]))
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


def check_image_unchanged(run: Run) -> None:
    """An image-to-video run continues only with the image file it started with, as with its weights."""
    image = run.settings.get("image")
    if image is None:
        return
    path = Path(image)
    reason = (fingerprint_mismatch([run.settings["image_fingerprint"]], file_fingerprint([path])) if path.is_file()
              else f"{path} is no longer there")
    if reason:
        raise HyVideoError(f"cannot resume run {run.id} with another image: {reason}. The same image is needed to continue "
                           "the same video; restore it, or start a new run with `lowvram generate --image`")


def resumable_files(run: Run, model_dir: Path | None = None, reporter: Reporter | None = None) -> ModelFiles:
    """The model files to continue `run` with: refuses other weights than it started with."""
    reporter = reporter or Reporter()
    settings = run.settings
    check_device(settings["device"])
    profile = settings["profile"]
    check_packages(profile["dit_scheme"], profile["encoder_scheme"], settings["frames"], torch.device(settings["device"]))
    files = find_model_files(Path(model_dir or settings["model_dir"]), image_to_video=settings.get("image") is not None,
                             model=settings.get("model"))
    reason = fingerprint_mismatch(run.manifest["model"]["fingerprint"], file_fingerprint(weight_files(files), files.root))
    if reason:
        raise HyVideoError(
            f"cannot resume run {run.id} with other weights: {reason}. The same weights are needed to continue "
            "the same video; restore them, or start a new run with `lowvram generate`"
        )
    check_loras_unchanged(run)
    check_image_unchanged(run)
    started, now = settings.get("parallel"), parallel_settings()
    if started != now and run.manifest.get("final_latents") is None:  # steps are left to run on another layout
        reporter.warn(f"run {run.id} ran its first {run.step} steps on {describe_parallel(started)}, now on "
                      f"{describe_parallel(now)}: attention sums its parts in another order, so the video may differ "
                      "slightly from an uninterrupted run (resuming on the same layout is bit-identical)")
    if run.manifest.get("versions", {}).get("torch") != torch.__version__:
        reporter.warn(f"run {run.id} started with torch {run.manifest['versions'].get('torch')}, now {torch.__version__}: "
                      "the result may differ slightly from an uninterrupted run")
    return files
