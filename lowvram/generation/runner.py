"""One generation as a resumable run: text encoding, Euler steps with a checkpoint after every
step, VAE decode, mp4 + PNG (one frame: a PNG image alone), after the checks of
lowvram/generation/preflight.py. The CLI calls `start_run` / `execute` / `resume_run` and draws what
`Reporter` is told; nothing here prints.

    run, files, plan = start_run(RunOptions(request, model_dir, runs_dir))  # preflight: checks, plan, run folder
    result = execute(run, files, plan, reporter, stop)  # encoding -> denoising -> decoding -> done
    result = resume_run(runs_dir, "20250101-120000-a-fox", reporter=reporter, stop=stop)

The profile is resolved and planned once (`planner.resolve`), stored in the run's settings, and the
Plan is what the `Stages` are built from. Each stage loads only its own models and frees them
before the next (text encoders, then the DiT, then the VAE), also when it is interrupted, so a
resume in "decoding" never loads the DiT and a resume in "denoising" never loads the text encoders.
How a stage gets its model onto the GPU (quantized, block-streamed, tiled) is `Stages`' business.
Several runs (a batch, lowvram/generation/batch.py) go through `execute_runs` stage by stage: every run's
text encoding, then every run's denoising, then every decode, so each model is loaded once; each
run folder is still exactly a single run's, and resumes the same way.

Several GPUs (`--gpus N`, lowvram/generation/ranks.py): this code runs on rank 0, which sends the other ranks
the DiT to place and each clip to denoise with it (sequence parallel), and their agreement to stop
after a step; everything else (encoding the text and an I2V run's image, checkpoints, decode,
outputs) is rank 0's alone.

Ctrl-C: `StopRequest` is set by the CLI's SIGINT handler; during denoising the runner finishes the
current step, saves it and raises `RunInterrupted`; a second Ctrl-C (or one outside the step loop)
raises KeyboardInterrupt at once, which is turned into `RunInterrupted` too (the last saved step
stays valid: every file is written atomically).
"""

import shutil
import statistics
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hyvideo.checkpoint import ModelFiles
from hyvideo.errors import HyVideoError
from hyvideo.image import open_image
from hyvideo.pipeline import GenerationRequest, ImageCondition, image_initial_latents
from hyvideo.sampler import initial_noise
from hyvideo.text_encoder import TEXT_LEN, encode_prompts
from hyvideo.v15_checkpoint import FAMILY as V15_FAMILY
from lowvram.attention_choice import usable_backend
from lowvram.planner import Plan
from lowvram.profiles import Profile
from lowvram.progress import Reporter
from lowvram.stages import Stages
from lowvram.streaming import empty_cache

from .measure import StageMeter, combine_stages
from .preflight import plan_for_run, resumable_files, run_loras
from .ranks import ClipJob, DitJob, Ranks, current_ranks
from .rewrite import prompt_for_encoding
from .preview import write_preview
from .run_folder import FIRST_FRAME, IMAGE, PREVIEW, VIDEO, Run, find_run
from .video import write_outputs, write_png

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
    preview: str | None  # --preview: the last step's predicted clip (lowvram/generation/preview.py)
    out: str | None
    final_latents: str | None
    settings: dict
    resumed_from: str | None = None  # what a resume skipped: "step 7/50", "decoding", "done", None
    rewritten_prompt: str | None = None  # --rewrite: the prompt that was encoded
    seconds: dict = field(default_factory=dict)
    peak_vram_gb: float | None = None
    stats: dict = field(default_factory=dict)  # what was streamed and tiled (Stages.stats)
    measured: dict = field(default_factory=dict)  # per stage: seconds, peak VRAM / RAM (lowvram/generation/measure.py)

    def to_dict(self) -> dict:
        return asdict(self)


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
    from lowvram.setup.synthetic_checkpoint import write_synthetic_checkpoint

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
        attention = usable_backend(settings["attention"], settings["device"], plan.dit_config.heads, plan.dit_config.head_dim)
        for note in attention.notes:
            reporter.warn(note)
        self.stages = Stages(files, plan, self.device, attention.backend, reporter, settings.get("cache_dir"), run_loras(settings))
        self.ranks = current_ranks()
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
            image_missing = run.settings.get("image") is not None and self._load_image(run) is None
            if self._load_embeddings(run) is None or image_missing:
                if run.manifest.get("embeddings") or run.manifest.get("image_latent"):
                    self.reporter.warn(f"the cached text embeddings or image latent of run {run.id} are damaged; encoding again")
                to_encode.append(run)
            else:
                self.resumed_from[run.id] = "cached text embeddings"
        self.encode(to_encode)
        self.denoise(to_denoise)
        return self.decode()

    @property
    def v15(self) -> bool:
        """HunyuanVideo-1.5 weights: its encoders, embeddings and sampler (hyvideo/v15_*.py)."""
        return self.stages.files.family == V15_FAMILY

    def _load_embeddings(self, run: Run):
        return run.load_v15_embeddings() if self.v15 else run.load_embeddings()

    def _load_image(self, run: Run):
        """An image-to-video run's saved image: a V15Image (1.5) or the 13B model's latent."""
        return run.load_v15_image() if self.v15 else run.load_image_latent()

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
        if self.v15:
            self._encode_v15(runs, prompts)
            return
        encoders = vae = None
        try:
            for run in runs:
                meter = self._start_encoding(run)
                settings = run.settings
                image = open_image(settings["image"]) if settings.get("image") else None
                with meter.stage("text"):
                    if encoders is None:
                        self.reporter.stage("loading text encoders")
                        encoders = self.stages.text_encoders()
                    self.reporter.stage("encoding text")
                    embeddings = encode_prompts(*encoders, [prompts[run.id]], settings["frames"], image=image)
                    if image is not None:  # image-to-video: the VAE encodes the image in the same stage
                        if vae is None:
                            self.reporter.stage("loading VAE")
                            vae = self.stages.vae()
                        self.reporter.stage("encoding image")
                        condition = self.stages.encode_image(vae, image, settings["height"], settings["width"])
                self._record_encoding(run, meter.results["text"])
                if image is not None:
                    run.save_image_latent(condition.latent)
                run.save_embeddings(embeddings)
        finally:
            encoders = vae = None
            empty_cache(self.device)

    def _start_encoding(self, run: Run):
        """A run entering its text stage (its clip sent to every rank, its state saved, a Ctrl-C
        from now on stopping it there); its meter."""
        self._clip(run)
        run.set_state("encoding")
        self.stop.stage = "encoding"
        return self.meters[run.id]

    @staticmethod
    def _record_encoding(run: Run, measured: dict) -> None:
        run.manifest["measured"]["text"] = measured
        run.manifest["seconds"]["encoding"] = measured["seconds"]

    def _encode_v15(self, runs: list[Run], prompts: dict[str, str]) -> None:
        """HunyuanVideo-1.5: every run's prompt through Qwen2.5-VL and byT5 (the negative prompt ""
        only under real CFG), which are then freed; then the image-to-video runs' images through
        SigLIP and the VAE's encoder. The planner counts the two phases one after the other; each
        run's "text" measurement covers both."""
        encoder = None
        try:
            for run in runs:
                meter = self._start_encoding(run)
                with meter.stage("text"):
                    if encoder is None:
                        self.reporter.stage("loading text encoders")
                        encoder = self.stages.v15_text_encoder()
                    self.reporter.stage("encoding text")
                    prompt = prompts[run.id]
                    embeddings = encoder.encode(prompt) if run.settings["guidance"] != 1.0 else (encoder.encode_one(prompt), None)
                self._record_encoding(run, meter.results["text"])
                run.save_v15_embeddings(*embeddings)
        finally:
            encoder = None
            empty_cache(self.device)
        vision = vae = None
        try:
            for run in (run for run in runs if run.settings.get("image")):
                self._clip(run)
                meter = self.meters[run.id]
                with meter.stage("image"):
                    if vision is None:
                        self.reporter.stage("loading image encoders")
                        vision, vae = self.stages.v15_image_encoder(), self.stages.vae()
                    self.reporter.stage("encoding image")
                    image, size = self.stages.encode_v15_image(vae, vision, open_image(run.settings["image"]))
                if list(size) != [run.settings["height"], run.settings["width"]]:  # preflight took the same bucket
                    raise HyVideoError(f"the image {run.settings['image']} now makes a {size[1]}x{size[0]} video, not "
                                       f"{run.settings['width']}x{run.settings['height']}; start a new run")
                self._record_encoding(run, combine_stages(run.manifest["measured"]["text"], meter.results["image"]))
                run.save_v15_image(image)
        finally:
            vision = vae = None
            empty_cache(self.device)

    # ---- denoising, checkpointed after every step, the DiT placed once

    def denoise(self, runs: list[Run]) -> None:
        model = streamer = None
        try:
            for run in runs:
                self._clip(run)
                settings = run.settings
                values = {"riflex": False, **settings}  # runs from before RIFLEx have no "riflex" setting: they ran without it
                # (nor image-to-video fields: the request's defaults)
                request = GenerationRequest(**{k: values[k] for k in GenerationRequest.__dataclass_fields__ if k in values})
                embeddings = self._load_embeddings(run)
                if embeddings is None:  # saved a moment ago by `encode`: the disk lost it
                    raise HyVideoError(f"the text embeddings of run {run.id} cannot be read back; "
                                       f"`lowvram resume {run.id}` encodes them again")
                if not self.v15 and any(embeddings.truncated):
                    self.reporter.warn(f"the prompt is longer than {TEXT_LEN} tokens: its end was cut off (the model reads {TEXT_LEN})")
                condition = self._image_condition(run)
                step, saved, cache_state, warnings = run.latest_latents()
                for warning in warnings:
                    self.reporter.warn(warning)
                if saved is None:
                    saved = initial_noise(tuple(settings["latent_shape"]), request.seed)
                    if condition is not None and not self.v15:  # 1.5 starts from the noise: the image enters as channels
                        saved = image_initial_latents(saved, condition, request.stability)
                else:
                    self.resumed_from[run.id] = f"step {step}/{request.steps}"
                run.set_state("denoising")
                if step < request.steps:
                    meter = self.meters[run.id]
                    with meter.stage("dit"):
                        began = time.perf_counter()
                        if model is None:
                            if any(r.settings.get("preview") for r in runs):  # (1.5: fitted to the VAE, before the DiT is placed)
                                self.stages.preview_projection()
                            self.reporter.stage("loading DiT")
                            self.stop.stage = "loading DiT"
                            model, streamer = self._place_dit()
                        if self.ranks:
                            self.ranks.send(ClipJob(request, embeddings, saved, step, cache_state, condition))
                        latents = _denoise(run, self.stages, model, streamer, began, embeddings, saved, step, cache_state,
                                           request, self.device, self.reporter, self.stop, self.ranks, condition)
                    measured = run.manifest["measured"]
                    measured["dit"] = {**measured.get("dit", {}), **meter.results["dit"]}
                else:  # killed between the last checkpoint and the final latents
                    latents = saved
                self.steps_left -= request.steps - step
                run.save_final(latents)
                run.set_state("decoding")
        except RuntimeError as error:
            if self.ranks is None or isinstance(error, torch.OutOfMemoryError):
                raise
            # A message or collective failed: another rank ended (the launcher names it); checkpoints are whole.
            run, detail = self.current, str(error).splitlines()[0][:160]
            raise HyVideoError(f"lost the other ranks ({detail}); run {run.id} is saved at step {run.step}/{run.steps}: "
                               f"`lowvram resume {run.id} --gpus {self.ranks.world}` continues it") from None
        finally:
            self.stop.stage = None
            if self.ranks:
                self.ranks.finish()
            if model is not None:
                self.stages.release_dit(model, streamer)
            model = streamer = None
            empty_cache(self.device)

    def _image_condition(self, run: Run):
        """An image-to-video run's conditioning image, as its encoding stage saved it (1.5: a V15Image)."""
        if run.settings.get("image") is None:
            return None
        saved = self._load_image(run)
        if saved is None:  # saved a moment ago by `encode`: the disk lost it
            raise HyVideoError(f"the image latent of run {run.id} cannot be read back; `lowvram resume {run.id}` encodes it again")
        return saved if self.v15 else ImageCondition(run.settings["image_condition"], saved)

    def _place_dit(self):
        """The DiT on this device; with several ranks, on theirs too, each for its share of tokens.
        A quantized cache is built here first, so the ranks then load it at the same time."""
        stages = self.stages
        if self.ranks:
            stages.ensure_dit_cache()
            self.ranks.send(DitJob(stages.files, stages.plan, stages.attention, stages.cache_dir, stages.loras))
        return self.stages.dit(self.ranks.sequence_parallel(stages.plan.dit_config.patch_size) if self.ranks else None)

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
             stop: StopRequest, ranks: Ranks | None = None, image: ImageCondition | None = None) -> torch.Tensor:
    """Euler steps step..N-1 on the placed DiT, a checkpoint after each (with the step cache's
    state, if any); RunInterrupted after the step in which a stop was requested (every rank stops
    after that step). `began`: when this run's DiT stage began (its time to the first step is
    recorded as load_seconds). image: an image-to-video run's conditioning image."""
    seconds = run.manifest["seconds"]
    first_forward = streamer.forwards
    cache = None
    measured = run.manifest["measured"].setdefault("dit", {})
    step_seconds = measured.setdefault("step_seconds", [])
    earlier_steps = len(step_seconds)
    try:
        cache = stages.step_cache(model, request, cache_state)
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
            if ranks.agree_to_stop(stop.is_set()) if ranks else stop.is_set():
                raise RunInterrupted(run)

        def preview(i: int, clean: torch.Tensor) -> None:
            ratio = stages.plan.vae_config.spatial_compression_ratio  # 8, or 16 for HunyuanVideo-1.5
            write_preview(clean, run.folder / PREVIEW, stages.preview_projection(), upscale=max(1, ratio // 8))

        if run.settings.get("preview"):
            reporter.preview(str(run.folder / PREVIEW))
        latents = stages.denoise(model, streamer, embeddings, latents, request, start_step=step, on_step=on_step, cache=cache,
                                 on_prediction=preview if run.settings.get("preview") else None, image=image)
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
        preview=str(run.preview_file) if run.preview_file else None,
        out=outputs.get("out"), final_latents=str(run.folder / final["file"]) if final else None,
        settings=run.settings, resumed_from=resumed_from, rewritten_prompt=run.rewritten_prompt, seconds=dict(run.manifest.get("seconds", {})),
        peak_vram_gb=peak_vram_gb, stats=dict(run.manifest.get("stats", {})), measured=dict(run.manifest.get("measured", {})),
    )
