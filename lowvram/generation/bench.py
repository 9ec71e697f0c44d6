"""`lowvram bench`: the product's own path at full size with random weights, measured against the plan.

Answers "will 720p x 129 run on my card, how fast, how much RAM?" before a 41 GB download. It writes
(once, into `--scratch`) a complete random-weight model folder of the real size (or the tiny one),
then runs exactly what `generate` runs (`preflight.start_run` + `runner.execute`: the same loaders, caches,
stages, run folder and progress) for a few steps, and compares what each stage used (lowvram/generation/measure.py)
with the planner's prediction for the same profile and size.

    result = run_bench(BenchOptions(scratch, steps=2, cap_bytes=16 * GIB), reporter, stop)
    result["stages"]   # per stage: measured and planned VRAM / RAM, error in %
    result["estimate"] # seconds for a full run (50 steps) from the measured s/step

With `--image` it benches image-to-video: the random model is HunyuanVideo-I2V (token_replace,
Tencent's current release; no FP8 DiT file in that release, so its layout is official or diffusers)
and the run is conditioned on the image.
With `--model 1.5-<variant>` (a text-to-video one of `lowvram.families.RELEASED_V15`) it benches
HunyuanVideo-1.5: the random folder is `lowvram.setup.synthetic_v15`'s in the diffusers layout with
its text encoders' weights (Qwen2.5-VL-7B's language model, the glyph byT5), the DiT stored in
bfloat16 at full size (Tencent ships float32, 33 GB: the half keeps the folder, its FP8 cache and
the NF4 encoder cache on a 64 GiB disk; the run quantizes it either way).
With `--gpus N` (cli/ranks.py) this runs on rank 0 of N, each rank capped to `cap_bytes`.
`cap_bytes` emulates a smaller card: torch.cuda.set_per_process_memory_fraction caps what PyTorch's
caching allocator may reserve (allocated bytes plus its cached blocks; each stage records both
peaks), and the profile is chosen and planned for that much VRAM. The video is noise (random
weights); the numbers are for this machine.
"""

import dataclasses
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from hyvideo.checkpoint import detect_layout
from hyvideo.errors import HyVideoError
from hyvideo.pipeline import GenerationRequest
from lowvram.families import RELEASED_V15, trained_frames
from lowvram.profiles import Overrides
from lowvram.progress import Reporter
from lowvram.units import GIB

from .preflight import RunOptions, start_run
from .runner import StopRequest, execute

FULL_RUN_STEPS = 50  # the official sampler's default
MODEL_SIZES = ("full", "tiny")
LAYOUTS = ("official", "official-fp8", "diffusers")
V15_MODELS = tuple(RELEASED_V15)  # `--model`: the 1.5 transformers (the image-to-video ones with --image)
PROMPT = "a red fox runs through fresh snow in a pine forest, morning light, the camera follows it"


@dataclass
class BenchOptions:
    scratch: Path  # where the random-weight model and the bench runs go
    width: int = 1280
    height: int = 720
    frames: int | None = None  # None: the model's trained length (families.trained_frames)
    steps: int = 2
    profile: str = "auto"
    model_size: str = "full"  # full | tiny
    layout: str | None = None  # official | official-fp8 | diffusers (LAYOUTS); None: official, 1.5: diffusers
    cap_bytes: int | None = None  # emulate a card with this much VRAM
    device: str | None = None
    overrides: Overrides = Overrides()  # --cache, --attention, --compile, ... (lowvram.profiles)
    image: Path | None = None  # image-to-video: the conditioning image
    model: str | None = None  # "1.5-<variant>" (V15_MODELS): HunyuanVideo-1.5; None: the 13B (I2V with image)
    size_given: bool = True  # False: width x height are the default's, and a 1.5 model takes its own resolution

    def __post_init__(self):
        if self.frames is None:
            self.frames = trained_frames(self.model)
        if self.model_size not in MODEL_SIZES:
            raise HyVideoError(f"--model-size takes {' or '.join(MODEL_SIZES)}, not {self.model_size!r}")
        if self.model is not None:
            if self.model not in V15_MODELS:
                raise HyVideoError(f"bench --model takes one of {', '.join(V15_MODELS)} (HunyuanVideo-1.5), "
                                   f"not {self.model!r}; without it the bench runs the 13B model")
            if ("_i2v" in self.model) != (self.image is not None):
                raise HyVideoError(f"--model {self.model} is an image-to-video transformer: pass --image" if self.image is None
                                   else f"--image needs an image-to-video transformer (e.g. --model 1.5-480p_i2v), not {self.model}")
            if self.layout not in (None, "diffusers"):
                raise HyVideoError("--model 1.5-...: the 1.5 bench writes the diffusers layout (its random text encoders "
                                   f"are written there), not {self.layout!r}")
            self.layout = "diffusers"
        self.layout = self.layout or "official"
        if self.layout not in LAYOUTS:
            raise HyVideoError(f"--layout takes {', '.join(LAYOUTS)}, not {self.layout!r}")
        if self.image is not None and self.layout == "official-fp8":
            raise HyVideoError("--image: Tencent's I2V release has no FP8 DiT file; use --layout official (the FP8 DiT "
                               "then comes from the quantize-once cache) or diffusers")

    @property
    def synthetic_size(self) -> str:
        """The random model's size name (lowvram.setup.synthetic_checkpoint.SIZES, or with a 1.5
        model "<size>-1.5-<variant>": `synthetic_plan`)."""
        if self.model is not None:
            return f"{self.model_size}-{self.model}"
        return f"{self.model_size}-i2v" if self.image is not None else self.model_size


def synthetic_plan(size: str, layout: str, device: str = "cpu"):
    """What `ensure_synthetic_model` writes for a size name: the 13B's (synthetic_checkpoint), or a
    1.5 folder with its encoders ("full-1.5-720p_t2v", "tiny-1.5-480p_i2v": synthetic_v15, the full DiT in
    bfloat16, see the module docstring)."""
    model_size, _, model = size.partition("-")
    if model not in RELEASED_V15:
        from lowvram.setup.synthetic_checkpoint import plan_folder

        return plan_folder(layout, size, seed=0, device=device)
    from lowvram.setup.synthetic_v15 import SIZES, plan_v15_folder

    variant = RELEASED_V15[model]
    dit = dataclasses.replace(SIZES[model_size].dit, use_meanflow=variant.endswith("step_distilled"))
    v15_size = dataclasses.replace(SIZES[model_size], dit=dit, variant=variant,
                                   dtype=torch.bfloat16 if model_size == "full" else SIZES[model_size].dtype)
    return plan_v15_folder(layout, v15_size, seed=0, encoders=True, device=device)


def ensure_synthetic_model(scratch: Path, size: str, layout: str, reporter: Reporter, device: str = "cpu") -> Path:
    """The random-weight model folder for (size, layout) in `scratch`, written once. It is written
    to `<folder>.partial` and renamed when complete, so an interrupted write is never reused. On a
    CUDA `device` the weights are drawn there (the full folder's 30-43 GB then cost the disk's time,
    not the CPU generators': 270 s for 43 GB on two cores)."""
    from lowvram.setup.synthetic_checkpoint import write_plan

    root = Path(scratch) / f"model-{size}-{layout}"
    if root.is_dir() and detect_layout(root):
        return root
    plan = synthetic_plan(size, layout, "cuda" if str(device).startswith("cuda") else "cpu")
    total = sum(f.nbytes for f in plan.weights)
    free = shutil.disk_usage(_existing(Path(scratch))).free
    if free < total * 1.05:
        raise HyVideoError(f"the {size}-size random model needs {total / 1e9:.1f} GB in {scratch} and {free / 1e9:.1f} GB "
                           "are free; pass --scratch on a larger disk")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    reporter.stage(f"writing the {size}-size random model ({total / 1e9:.1f} GB, once)", total=total)
    write_plan(partial, plan, lambda done, all_bytes: reporter.advance(done, total=all_bytes))
    partial.rename(root)
    return root


def cap_vram(cap_bytes: int, device: str) -> None:
    """Let PyTorch allocate at most `cap_bytes` on `device` (each rank caps its own GPU)."""
    if not device.startswith("cuda"):
        raise HyVideoError("--cap-gb emulates a smaller GPU and needs CUDA; on the CPU there is no VRAM to cap")
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    if cap_bytes > total:
        raise HyVideoError(f"--cap-gb {cap_bytes / GIB:.1f} is more than this GPU's {total / GIB:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap_bytes / total, torch.device(device))


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _error_pct(measured: float | None, planned: float) -> float | None:
    if measured is None or not planned:
        return None
    return round(100 * (measured - planned) / planned, 1)


def run_bench(options: BenchOptions, reporter: Reporter | None = None, stop: StopRequest | None = None) -> dict:
    """Write (or reuse) the model, run it like `generate`, return measured vs planned per stage."""
    reporter = reporter or Reporter()
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if options.model_size == "full" and not device.startswith("cuda"):
        raise HyVideoError("the full-size model needs an NVIDIA GPU with CUDA and PyTorch sees none here (`lowvram doctor` "
                           "says why); `--model-size tiny --device cpu` checks the install on the CPU")
    if options.cap_bytes is not None:
        cap_vram(options.cap_bytes, device)
    root = ensure_synthetic_model(options.scratch, options.synthetic_size, options.layout, reporter, device)
    request = GenerationRequest(PROMPT, width=options.width, height=options.height, frames=options.frames,
                                steps=options.steps, seed=0, image=None if options.image is None else str(options.image))
    given = frozenset({"steps", "frames", *(["size"] if options.size_given else [])})  # not a 1.5 model's own steps
    run_options = RunOptions(request, root, Path(options.scratch) / "runs", options.profile, options.overrides, device,
                             vram_limit_bytes=options.cap_bytes, sampling_given=given)
    run, files, plan = start_run(run_options, reporter)
    result = execute(run, files, plan, reporter, stop)

    stages = {}
    for name, planned in plan.stages.items():
        measured = result.measured.get(name, {})
        stages[name] = {
            "seconds": measured.get("seconds"),
            "vram_gb": measured.get("peak_vram_gb"), "planned_vram_gb": round(planned.vram_bytes / GIB, 3),
            "vram_error_pct": _error_pct(measured.get("peak_vram_gb"), planned.vram_bytes / GIB),
            "vram_reserved_gb": measured.get("peak_vram_reserved_gb"),  # what --cap-gb limits (lowvram/generation/measure.py)
            "ram_gb": measured.get("peak_ram_gb"), "planned_ram_gb": round(planned.ram_bytes / GIB, 3),
            "ram_error_pct": _error_pct(measured.get("peak_ram_gb"), planned.ram_bytes / GIB),
            "page_cache_gb": measured.get("peak_page_cache_gb"), "planned_page_cache_gb": round(planned.page_cache_bytes / GIB, 3),
        }
    dit = result.measured.get("dit", {})
    steps = dit.get("step_seconds", [])
    s_per_step = statistics.median(steps[1:] if len(steps) > 1 else steps) if steps else None  # the first step warms up
    text_s, vae_s = result.measured.get("text", {}).get("seconds") or 0, result.measured.get("vae", {}).get("seconds") or 0
    load_s = dit.get("load_seconds") or 0
    estimate = None if s_per_step is None else round(text_s + load_s + FULL_RUN_STEPS * s_per_step + vae_s, 1)
    return {
        "model": {"name": result.settings.get("model") or ("i2v" if options.image is not None else "t2v"), "size": options.synthetic_size, "layout": options.layout, "folder": str(root),
                  "image": None if options.image is None else str(options.image)},
        "video": {name: result.settings[name] for name in ("width", "height", "frames", "steps")},  # as run (1.5: its own size)
        "device": str(result.settings["device"]), "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "cap_gb": None if options.cap_bytes is None else options.cap_bytes / GIB,
        "parallel": result.settings.get("parallel"),
        "profile": plan.profile.name, "schedule": plan.schedule.to_dict(), "stats": result.stats,
        "attention": result.settings["attention"], "compile_seconds": dit.get("compile_seconds"),
        "stages": stages, "dit_load_seconds": load_s, "step_seconds": steps, "s_per_step": s_per_step,
        "estimate": {"steps": FULL_RUN_STEPS, "seconds": estimate},
        "run_id": result.run_id, "video_path": result.video, "final_latents": result.final_latents,
        "note": "random weights: the video is noise; the numbers are for this machine"
                + ("; with several ranks, measured VRAM and RAM are rank 0's (its GPU, its process), planned RAM is "
                   "the machine's" if result.settings.get("parallel") else ""),
    }
