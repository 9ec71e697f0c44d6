"""`lowvram`: HunyuanVideo text-to-video from the terminal, on one 16-24 GB GPU, with resumable runs.

    lowvram generate "a red fox running through snow" --resolution 720p --aspect 16:9
    lowvram resume                       # the newest unfinished run
    lowvram runs | plan | profiles | doctor | download | quantize | demo

This module only parses arguments and draws: the work is in lowvram/ (runner, runs, planner,
profiles, download, doctor), which returns data and reports progress through callbacks. User errors
(`HyVideoError`) print one line and exit 2; Ctrl-C saves the run and exits 130.
"""

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    name="lowvram", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="HunyuanVideo 13B text-to-video on one 16-24 GB NVIDIA GPU, with resumable runs.",
)
profiles_app = typer.Typer(help="List the memory profiles, or show one (`profiles show NAME`).", invoke_without_command=True)
app.add_typer(profiles_app, name="profiles")

out = Console(highlight=False, soft_wrap=True)  # results: tables, paths, JSON
err = Console(stderr=True, highlight=False, soft_wrap=True)  # progress, warnings, errors

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

RunsDir = typer.Option(Path("runs"), "--runs-dir", envvar="LOWVRAM_RUNS_DIR", help="Where run folders live.")
CacheDir = typer.Option(None, "--cache-dir", envvar="LOWVRAM_CACHE_DIR",
                        help="Where quantized weights are kept (default: MODEL_DIR/lowvram-cache).")
Json = typer.Option(False, "--json", help="Print one JSON object at the end (for scripts); no progress bars.")
Quiet = typer.Option(False, "--quiet", "-q", help="No progress bars; print only the result path.")


# --- plumbing --------------------------------------------------------------------------------


class UserError(Exception):
    """Raised by the CLI itself for bad arguments; same handling as HyVideoError."""


def _fail(message: str, as_json: bool = False, code: int = EXIT_USER_ERROR):
    if as_json:
        _print_json({"ok": False, "error": message})
    first, *rest = str(message).split("\n")
    err.print(f"[bold red]error:[/] {escape(first)}")
    for line in rest:
        err.print(line, markup=False)
    raise typer.Exit(code)


@contextmanager
def user_errors(as_json: bool = False):
    """HyVideoError (any layer) -> one line on stderr, exit code 2."""
    from hyvideo.errors import HyVideoError

    try:
        yield
    except (HyVideoError, UserError) as error:
        _fail(str(error), as_json)


def _quiet_libraries() -> None:
    """transformers/huggingface_hub progress bars and load reports would garble ours, and
    bitsandbytes logs a warning about an optional CPU kernel package on import."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def _print_json(value) -> None:
    """Exactly one JSON document on stdout (no colours, no wrapping)."""
    sys.stdout.write(json.dumps(value, indent=1, default=str) + "\n")
    sys.stdout.flush()


def _print_table(table) -> None:
    """Tables at the terminal's width; piped into a file or another program, at 120 columns
    rather than rich's default of 80 (which folds every path)."""
    (out if out.is_terminal else Console(highlight=False, width=120)).print(table)


def _bytes(size: int | None) -> str:
    if size is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


# --- progress --------------------------------------------------------------------------------


def make_reporter(enabled: bool):
    """Rich progress rows on a terminal; one plain line per stage and per step when stderr is a
    file or a pipe (a log of an hour-long run); nothing but warnings when not `enabled`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from lowvram.progress import Reporter

    class RichReporter(Reporter):
        """Stages as rows: a spinner for loading, a bar with s/step, ETA and peak VRAM for steps."""

        def __init__(self):
            self.warnings: list[str] = []
            self.lines = enabled and not err.is_terminal
            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), TimeElapsedColumn(),
                console=err, disable=not enabled or self.lines,
            )
            self.task = None
            self.step_times: list[float] = []

        def __enter__(self):
            self.progress.start()
            return self

        def __exit__(self, *exc):
            self._finish()
            self.progress.stop()

        def _finish(self):
            if self.task is not None:
                task = self.progress.tasks[-1]
                if task.total is None:
                    self.progress.update(self.task, total=1, completed=1)
                self.progress.stop_task(self.task)

        def stage(self, name, total=None, completed=0):
            self._finish()
            self.task = self.progress.add_task(name, total=total, completed=completed, info="")
            if self.lines:
                err.print(f"{name}" + (f" ({completed}/{total} done)" if total and completed else ""))

        def advance(self, completed, total=None, s_per_step=None, peak_vram_gb=None, **info):
            parts = []
            if s_per_step is not None:
                parts.append(f"{s_per_step:.2f} s/step")
                self.step_times.append(s_per_step)
            if peak_vram_gb is not None:
                parts.append(f"peak VRAM {peak_vram_gb:.1f} GiB")
            update = {"completed": completed, "info": "  ".join(parts)}
            if total is not None:
                update["total"] = total
            self.progress.update(self.task, **update)
            task = self.progress.tasks[-1]
            if self.lines and s_per_step is not None and task.total:
                left = (task.total - completed) * sum(self.step_times) / len(self.step_times)
                err.print(f"  step {completed}/{task.total}  {'  '.join(parts)}  eta {int(left // 60)}:{int(left % 60):02d}")

        def warn(self, message):
            self.warnings.append(message)
            self.progress.console.print(f"[yellow]warning:[/] {escape(message)}")

    return RichReporter()


@contextmanager
def sigint_saves(stop):
    """First Ctrl-C while denoising: finish the step, save, stop. Otherwise: stop at once."""

    def handler(signum, frame):
        if stop.on_sigint():  # raises KeyboardInterrupt when not deferring
            err.print("\n[yellow]stopping after this step[/] (Ctrl-C again to stop now; the last saved step is kept)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_and_report(work, as_json: bool, quiet: bool):
    """Run `work(reporter, stop)` -> RunResult with progress, Ctrl-C and error handling."""
    from lowvram.runner import RunInterrupted, StopRequest

    _quiet_libraries()
    stop = StopRequest()
    reporter = make_reporter(enabled=not (as_json or quiet))
    try:
        with user_errors(as_json), sigint_saves(stop), reporter:
            result = work(reporter, stop)
    except RunInterrupted as stopped:
        run = stopped.run
        message = f"stopped at step {run.step}/{run.steps} ({run.state}); continue with: lowvram resume {run.id}"
        if as_json:
            _print_json({"ok": False, "interrupted": True, "run_id": run.id, "step": run.step, "steps": run.steps,
                         "resume": f"lowvram resume {run.id}"})
        err.print(f"[yellow]{escape(message)}[/]")
        raise typer.Exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted before the run started; nothing to resume[/]")
        raise typer.Exit(EXIT_INTERRUPTED)
    _report_result(result, reporter.warnings, as_json, quiet)
    return result


def _report_result(result, warnings, as_json, quiet):
    if as_json:
        _print_json({"ok": True, **result.to_dict(), "warnings": warnings})
    elif quiet:
        out.print(result.out or result.video, markup=False)
    else:
        if result.resumed_from == "done":
            err.print(f"run {result.run_id} is already done")
        else:
            seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
            err.print(f"[green]done[/] run {result.run_id}" + (f" ({seconds})" if seconds else ""))
        out.print(f"video: {result.video}", markup=False)
        out.print(f"first frame: {result.first_frame}", markup=False)
        if result.out:
            out.print(f"copied to: {result.out}", markup=False)


# --- generate / resume / demo ----------------------------------------------------------------


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt_file is not None:
        if prompt:
            raise UserError("give the prompt as an argument or with --prompt-file, not both")
        try:
            return prompt_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read --prompt-file {prompt_file}: {getattr(error, 'strerror', None) or error}") from None
    if prompt is None:
        raise UserError('no prompt: lowvram generate "a red fox running through snow" (or --prompt-file FILE)')
    return prompt


@app.command()
def generate(
    prompt: str = typer.Argument(None, help="What the video shows (or use --prompt-file)."),
    model_dir: Path = typer.Option(None, "--model-dir", envvar="LOWVRAM_MODEL_DIR",
                                   help="Weights folder (default: ./ckpts if it holds a model, else the huggingface_hub cache)."),
    profile: str = typer.Option("auto", "--profile", help="Memory profile: auto, a name (`lowvram profiles`) or a .toml file."),
    size: str = typer.Option(None, "--size", help="WIDTHxHEIGHT, multiples of 16 (e.g. 1280x720)."),
    resolution: str = typer.Option(None, "--resolution", help="Official bucket: 540p or 720p (default 720p)."),
    aspect: str = typer.Option(None, "--aspect", help="With --resolution: 16:9, 9:16, 4:3, 3:4 or 1:1 (default 16:9)."),
    frames: int = typer.Option(129, "--frames", help="Number of frames, 4k+1 (129 = 5.4 s at 24 fps)."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default: a random one, recorded in the run)."),
    guidance: float = typer.Option(6.0, "--guidance", help="Embedded guidance scale."),
    flow_shift: float = typer.Option(7.0, "--flow-shift", help="Flow-matching schedule shift."),
    prompt_file: Path = typer.Option(None, "--prompt-file", help="Read the prompt from this text file."),
    attention: str = typer.Option("sdpa", "--attention", help="sdpa or flash (needs flash-attn)."),
    out_path: Path = typer.Option(None, "--out", help="Also copy the mp4 here (a file, or a folder)."),
    cache_dir: Path = CacheDir,
    runs_dir: Path = RunsDir,
    device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available)."),
    as_json: bool = Json,
    quiet: bool = Quiet,
):
    """Generate a video; the run is saved after every step and can be resumed."""
    import random

    with user_errors(as_json):
        from hyvideo.pipeline import GenerationRequest
        from lowvram.runner import RunOptions, execute, start_run
        from lowvram.sizes import resolve_size

        text = _read_prompt(prompt, prompt_file)
        width, height = resolve_size(size, resolution, aspect)
        request = GenerationRequest(text, width=width, height=height, frames=frames, steps=steps,
                                    seed=random.randint(0, 1_000_000) if seed is None else seed,
                                    guidance=guidance, flow_shift=flow_shift)
        from lowvram.download import default_model_dir

        options = RunOptions(request, model_dir or default_model_dir(), runs_dir, profile, attention, device, out_path, cache_dir)

    def work(reporter, stop):
        run, files, plan = start_run(options, reporter)
        if not (as_json or quiet):
            err.print(f"run {run.id} (seed {request.seed}, profile {plan.profile.name}) in {run.folder}", markup=False)
        return execute(run, files, plan, reporter, stop)

    _run_and_report(work, as_json, quiet)


@app.command()
def resume(
    run: str = typer.Argument(None, help="Run id, id prefix or folder (default: the newest unfinished run)."),
    runs_dir: Path = RunsDir,
    model_dir: Path = typer.Option(None, "--model-dir", help="Where the weights are now, if they moved (they must be the same files)."),
    as_json: bool = Json,
    quiet: bool = Quiet,
):
    """Continue an interrupted run from its last saved step (bit-identical to an uninterrupted run)."""
    from lowvram.runner import resume_run

    def work(reporter, stop):
        return resume_run(runs_dir, run, model_dir, reporter, stop)

    _run_and_report(work, as_json, quiet)


@app.command()
def demo(
    prompt: str = typer.Argument("a red fox running through snow", help="Prompt for the tiny model."),
    save_model: Path = typer.Option(None, "--save-model", help="Where to keep the tiny checkpoint (default: RUNS_DIR/demo-model); "
                                    "then `generate --model-dir DIR` uses it."),
    size: str = typer.Option("128x96", "--size", help="WIDTHxHEIGHT."),
    frames: int = typer.Option(17, "--frames"),
    steps: int = typer.Option(10, "--steps"),
    seed: int = typer.Option(0, "--seed"),
    runs_dir: Path = RunsDir,
    device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available)."),
    as_json: bool = Json,
    quiet: bool = Quiet,
):
    """Run a tiny random-weight HunyuanVideo end to end (CPU or GPU, well under a minute).

    The video is noise-like (random weights); it proves the install, the run folder and the mp4.
    The tiny checkpoint is written once and reused, so an interrupted demo can be resumed."""
    with user_errors(as_json):
        from hyvideo.pipeline import GenerationRequest
        from lowvram.runner import RunOptions, execute, start_run
        from lowvram.sizes import parse_size

        width, height = parse_size(size)
        request = GenerationRequest(prompt, width=width, height=height, frames=frames, steps=steps, seed=seed)
    model_root = save_model or runs_dir / "demo-model"

    def work(reporter, stop):
        from lowvram.runner import DEMO_PROFILE, ensure_demo_model

        ensure_demo_model(model_root, reporter)
        run, files, plan = start_run(RunOptions(request, model_root, runs_dir, DEMO_PROFILE, "sdpa", device), reporter)
        return execute(run, files, plan, reporter, stop)

    _run_and_report(work, as_json, quiet)
    if not (as_json or quiet):
        err.print(f"tiny model in {model_root}: lowvram generate \"...\" --model-dir {model_root} --size {size} --frames {frames} "
                  f"--steps {steps}", markup=False)


@app.command()
def bench(
    scratch: Path = typer.Option(Path("lowvram-bench"), "--scratch", help="Where the random-weight model (~42 GB at full size) and runs go."),
    model_size: str = typer.Option("full", "--model-size", help="full (13B, the real sizes) or tiny."),
    layout: str = typer.Option("official", "--layout", help="official, official-fp8 (Tencent's FP8 DiT pair) or diffusers: the folder to write and load."),
    profile: str = typer.Option("auto", "--profile", help="auto, a profile name or a .toml file."),
    size: str = typer.Option(None, "--size", help="WIDTHxHEIGHT, multiples of 16."),
    resolution: str = typer.Option(None, "--resolution", help="540p or 720p (default 720p)."),
    aspect: str = typer.Option(None, "--aspect", help="16:9, 9:16, 4:3, 3:4 or 1:1 (default 16:9)."),
    frames: int = typer.Option(129, "--frames"),
    steps: int = typer.Option(2, "--steps", help="Denoising steps to measure (the estimate scales to 50)."),
    cap_gb: float = typer.Option(None, "--cap-gb", help="Emulate a card with this many GiB (caps PyTorch's allocations)."),
    device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available)."),
    as_json: bool = Json,
    quiet: bool = Quiet,
):
    """Run the real pipeline on random weights of the real size: per stage, measured peak VRAM and
    RAM next to the plan, s/step, and an estimate for a full run. The video is noise."""
    _quiet_libraries()
    reporter = make_reporter(enabled=not (as_json or quiet))
    with user_errors(as_json):
        from lowvram.bench import BenchOptions, run_bench
        from lowvram.runner import RunInterrupted, StopRequest
        from lowvram.sizes import resolve_size

        if model_size not in ("full", "tiny"):
            raise UserError(f"--model-size takes full or tiny, not {model_size!r}")
        if layout not in ("official", "official-fp8", "diffusers"):
            raise UserError(f"--layout takes official, official-fp8 or diffusers, not {layout!r}")
        width, height = resolve_size(size, resolution, aspect)
        options = BenchOptions(scratch, width, height, frames, steps, profile, model_size, layout,
                               None if cap_gb is None else int(cap_gb * 2**30), device)
        stop = StopRequest()
        try:
            with sigint_saves(stop), reporter:
                result = run_bench(options, reporter, stop)
        except RunInterrupted:
            raise UserError("stopped; the bench run is not resumed (run `lowvram bench` again)") from None
    if as_json:
        _print_json({"ok": True, **result, "warnings": reporter.warnings})
        return
    title = (f"{result['profile']} at {width}x{height}x{frames}, {steps} steps, {result['model']['size']} model"
             + (f", capped at {result['cap_gb']:g} GiB" if result["cap_gb"] else "") + f" ({result['gpu'] or result['device']})")
    table = Table("stage", "seconds", "VRAM GiB", "planned", "error", "RAM GiB", "planned", "error", "page cache GiB", title=title)

    def number(value, fmt="{:.2f}"):
        return "-" if value is None else fmt.format(value)

    for name, st in result["stages"].items():
        table.add_row(name, number(st["seconds"], "{:.1f}"), number(st["vram_gb"]), number(st["planned_vram_gb"]),
                      number(st["vram_error_pct"], "{:+.1f} %"), number(st["ram_gb"]), number(st["planned_ram_gb"]),
                      number(st["ram_error_pct"], "{:+.1f} %"), number(st["page_cache_gb"]))
    _print_table(table)
    dit = result["stats"].get("dit", {})
    out.print(f"DiT: {dit.get('resident_blocks')} blocks resident, {dit.get('streamed_blocks')} streamed; "
              f"load {result['dit_load_seconds']:.1f} s; s/step {number(result['s_per_step'])}", markup=False)
    if result["estimate"]["seconds"] is not None:
        minutes = result["estimate"]["seconds"] / 60
        out.print(f"estimate for {result['estimate']['steps']} steps + encode + decode: {minutes:.1f} min on this machine", markup=False)
    out.print(f"note: {result['note']} (video: {result['video_path']})", markup=False)


# --- runs ------------------------------------------------------------------------------------


@app.command("runs")
def runs_command(runs_dir: Path = RunsDir, as_json: bool = Json):
    """List runs: id, prompt, size x frames, step k/N, state, output."""
    from lowvram.runs import list_runs

    rows = [entry.summary() for entry in list_runs(runs_dir)]
    if as_json:
        _print_json({"runs_dir": str(runs_dir), "runs": rows})
        return
    if not rows:
        out.print(f"no runs in {runs_dir}", markup=False)
        return
    table = Table(title=f"runs in {runs_dir}", caption=f"outputs are in {runs_dir}/<id>/")
    table.add_column("id", no_wrap=True)
    table.add_column("prompt", min_width=16, max_width=40)
    for name in ("size x frames", "step", "state", "output"):
        table.add_column(name, no_wrap=True)
    for row in rows:
        prompt = row["prompt"] or row.get("problem", "")
        prompt = prompt if len(prompt) <= 40 else prompt[:39] + "…"
        step = f"{row['step']}/{row['steps']}" if row["steps"] else "-"
        output = row["output"] or "-"
        output = Path(output).name if Path(output).parent == Path(row["folder"]) else output
        state = row["state"]
        if state in ("encoding", "denoising", "decoding"):  # unfinished: live, or waiting for `lowvram resume`
            state += " (running)" if row["running"] else " (stopped)"
        table.add_row(row["id"], prompt, row["size"] or "-", step, state, output)
    _print_table(table)


# --- plan / profiles -------------------------------------------------------------------------


@app.command()
def plan(
    profile: str = typer.Option("auto", "--profile", help="auto, a profile name or a .toml file."),
    size: str = typer.Option(None, "--size", help="WIDTHxHEIGHT."),
    resolution: str = typer.Option(None, "--resolution", help="540p or 720p (default 720p)."),
    aspect: str = typer.Option(None, "--aspect", help="16:9, 9:16, 4:3, 3:4 or 1:1 (default 16:9)."),
    frames: int = typer.Option(129, "--frames"),
    vram: float = typer.Option(None, "--vram", help="GiB of VRAM to plan for (default: this GPU's free VRAM, else the profile's budget)."),
    ram: float = typer.Option(None, "--ram", help="GiB of host RAM to plan for (default: available RAM)."),
    as_json: bool = Json,
):
    """Predict peak VRAM and RAM per stage (text, DiT, VAE); exit 1 if it does not fit."""
    import torch

    with user_errors(as_json):
        from hyvideo.errors import HyVideoError
        from hyvideo.pipeline import GenerationRequest, validate_request
        from lowvram.doctor import host_ram
        from lowvram.planner import resolve, suggest_fit
        from lowvram.sizes import resolve_size

        width, height = resolve_size(size, resolution, aspect)
        validate_request(GenerationRequest("plan", width=width, height=height, frames=frames))
        gib = 2**30
        if vram is not None:
            vram_bytes = int(vram * gib)
        elif torch.cuda.is_available():
            vram_bytes = torch.cuda.mem_get_info()[0]
        else:
            vram_bytes = None
        total, available = host_ram()
        ram_bytes = int(ram * gib) if ram is not None else (available or total)
        if profile == "auto" and vram_bytes is None:
            raise UserError("no CUDA GPU here: pass --vram GB (e.g. --vram 24) to plan for a card, or --profile NAME")
        try:
            chosen, found = resolve(profile, width, height, frames, vram_bytes=vram_bytes, ram_bytes=ram_bytes, must_fit=False)
        except HyVideoError as error:
            if profile != "auto":
                raise
            hint = suggest_fit(width, height, frames, vram_bytes, ram_bytes)  # no profile fits: exit 1 with a suggestion, not 2
            result = {"fits": False, "peak_vram_gb": None, "peak_ram_gb": None, "profile": None, "stages": {},
                      "reason": str(error), "suggestion": hint}
            if as_json:
                _print_json(result)
            else:
                err.print(f"[red]does not fit:[/] {escape(str(error))}" + (f"; try {hint}" if hint else ""))
            raise typer.Exit(1)
        result = found.to_dict()
        hint = None
        if not found.fits:
            hint = suggest_fit(width, height, frames, found.vram_budget_bytes, ram_bytes)
            result["suggestion"] = hint
    if as_json:
        _print_json(result)
    else:
        rows = found.table_rows()
        table = Table(*rows[0], title=f"{chosen.name} at {found.width}x{found.height}x{frames}")
        for row in rows[1:]:
            table.add_row(*row)
        _print_table(table)
        out.print(f"DiT blocks: {found.schedule}")
        if not found.fits:
            err.print("[red]does not fit[/]" + (f": try {hint}" if hint else ": try a smaller --size or fewer --frames"))
    if not found.fits:
        raise typer.Exit(1)


@profiles_app.callback()
def profiles_list(ctx: typer.Context, as_json: bool = Json):
    """List the shipped memory profiles."""
    if ctx.invoked_subcommand is not None:
        return
    with user_errors(as_json):
        from lowvram.profiles import shipped_profiles

        profiles = shipped_profiles()
    if as_json:
        _print_json({"profiles": [{**p.to_dict(), "source": p.source} for p in profiles]})
        return
    table = Table("name", "VRAM GiB", "DiT", "text encoder", "resident blocks", "description", title="profiles (fastest first)")
    for p in profiles:
        table.add_row(p.name, f"{p.vram_budget_gb:g}", p.dit_scheme, p.encoder_scheme, str(p.resident_blocks), p.description)
    _print_table(table)
    out.print("use one with --profile NAME, or pass your own .toml file (`lowvram profiles show NAME` prints a starting point)")


@profiles_app.command("show")
def profiles_show(name: str = typer.Argument(..., help="Profile name or .toml path."), as_json: bool = Json):
    """Show every field of one profile."""
    with user_errors(as_json):
        from lowvram.profiles import load_profile

        profile = load_profile(name)
    values = profile.to_dict()
    if as_json:
        _print_json({**values, "source": profile.source})
        return
    out.print(f"# {profile.source}", markup=False)
    for key, value in values.items():
        out.print(f"{key} = {json.dumps(value)}", markup=False)


# --- doctor / download / quantize ------------------------------------------------------------


@app.command()
def doctor(
    model_dir: Path = typer.Option(None, "--model-dir", envvar="LOWVRAM_MODEL_DIR", help="Weights folder to check."),
    runs_dir: Path = RunsDir,
    as_json: bool = Json,
):
    """Check torch/CUDA, the GPU (VRAM, FP8 support), optional packages, RAM, disk and the weights."""
    from lowvram.doctor import run_doctor
    from lowvram.download import default_model_dir

    model_dir = model_dir or default_model_dir()
    report = run_doctor(model_dir, runs_dir)
    if as_json:
        _print_json(report)
    else:
        colors = {"ok": "green", "warn": "yellow", "fail": "red"}
        table = Table("check", "", "detail", title="lowvram doctor")
        for check in report["checks"]:
            table.add_row(check["name"], f"[{colors[check['status']]}]{check['status']}[/]", check["detail"])
        _print_table(table)
        if report["files"]:
            files = Table("file", "size", "status", title=f"weights in {model_dir}")
            for row in report["files"]:
                files.add_row(row["file"], _bytes(row["size"]), row["status"])
            _print_table(files)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def download(
    model_dir: Path = typer.Option(None, "--model-dir", help="Where to put the weights (default ./ckpts)."),
    layout: str = typer.Option("diffusers", "--layout", help="diffusers (one repo, complete) or official (Tencent's files)."),
    fp8: bool = typer.Option(False, "--fp8", help="Also Tencent's FP8 DiT pair (--layout official)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and sizes, download nothing."),
    as_json: bool = Json,
    quiet: bool = Quiet,
):
    """Download the weights from huggingface.co into the folder layout lowvram reads."""
    from lowvram import download as dl

    model_dir = model_dir or dl.DEFAULT_MODEL_DIR
    with user_errors(as_json):
        if dry_run:
            files = dl.plan_download(model_dir, layout, fp8)
            total = sum(f.size or 0 for f in files)
            missing = sum(f.size or 0 for f in files if not f.present)
            if as_json:
                _print_json({"ok": True, "model_dir": str(model_dir), "layout": layout, "total_bytes": total, "to_download_bytes": missing,
                             "files": [{"repo": f.repo, "file": f.file, "size": f.size, "present": f.present} for f in files]})
                return
            table = Table("repo", "file", "size", "", title=f"download into {model_dir} ({layout} layout)")
            for f in files:
                table.add_row(f.repo, f.file, _bytes(f.size), "present" if f.present else "")
            _print_table(table)
            out.print(f"total {_bytes(total)}, to download {_bytes(missing)}")
            return
        dl.download(model_dir, layout, fp8, progress=not (as_json or quiet))
        layout_found, checks = dl.check_model_folder(model_dir)
        bad = [c for c in checks if not c.ok]
        if bad:
            raise UserError(f"downloaded, but {len(bad)} file(s) are incomplete (first: {bad[0].path}: {bad[0].problem}); run the same command again")
    if as_json:
        _print_json({"ok": True, "model_dir": str(model_dir), "layout": layout_found, "files": len(checks)})
    else:
        out.print(f"weights complete in {model_dir} ({layout_found} layout, {len(checks)} files)", markup=False)


@app.command()
def quantize(
    model_dir: Path = typer.Option(None, "--model-dir", envvar="LOWVRAM_MODEL_DIR", help="Weights folder."),
    scheme: str = typer.Option("fp8", "--scheme", help="DiT scheme: fp8 or int8."),
    policy: str = typer.Option("blocks", "--policy", help="Which DiT linears to quantize: blocks or blocks-no-mod."),
    only: str = typer.Option(None, "--only", help="Build one cache only: dit or encoder (default: both)."),
    cache_dir: Path = CacheDir,
    as_json: bool = Json,
):
    """Quantize once into the cache folder (minutes): the DiT (fp8/int8) and the LLM text encoder
    (NF4); later runs (`generate` with the same --cache-dir) load them directly."""
    _quiet_libraries()
    reporter = make_reporter(enabled=not as_json)
    result = {}
    with user_errors(as_json), reporter:
        import torch

        from hyvideo.checkpoint import find_model_files, load_dit_state_dict
        from lowvram.download import default_model_dir
        from lowvram.runner import CPU_MAX_DIT_PARAMS
        from lowvram.stages import compute_dtypes, default_cache_dir, dit_config_for, parameter_count
        from quant.cache import cache_paths, ensure_dit_cache
        from quant.nf4 import NF4Unavailable, ensure_llm_nf4_cache, llm_cache_path

        if only not in (None, "dit", "encoder"):
            raise UserError(f"--only takes dit or encoder, not {only!r}")
        model_dir = model_dir or default_model_dir()
        files = find_model_files(model_dir)
        cache = cache_dir or default_cache_dir(files)
        result = {"ok": True, "cache_dir": str(cache)}
        if only != "encoder" and not files.dit_weights:
            if only == "dit":
                raise UserError(f"{model_dir} has only Tencent's FP8 DiT; it is already quantized (profiles load it directly)")
            result["dit"] = {"skipped": "only Tencent's FP8 DiT is here; it is already quantized"}
        elif only != "encoder":
            config = dit_config_for(files)
            total = config.double_blocks + config.single_blocks + 1  # the blocks, then the trunk and header
            reporter.stage(f"DiT {scheme} ({policy})", total=total)
            # The dtype `generate` will compute in, so it finds this cache: float32 only for a tiny
            # model on a machine without CUDA (the full-size model runs on a GPU, in bf16).
            gpu_run = torch.cuda.is_available() or parameter_count(config) >= CPU_MAX_DIT_PARAMS
            dtype = compute_dtypes(torch.device("cuda" if gpu_run else "cpu"))[0]
            status = ensure_dit_cache(files.dit_weights, lambda: load_dit_state_dict(files)[0], config, scheme, policy, cache,
                                      dtype, on_progress=reporter.advance)
            reporter.advance(total, total)  # also when the cache was fresh
            result["dit"] = {"path": str(cache_paths(cache, scheme)[0]), "scheme": scheme, "policy": policy,
                             "found": status.state, "reason": status.reason}
        if only != "dit":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            reporter.stage(f"text encoder NF4 ({device.type})")
            try:
                status = ensure_llm_nf4_cache(files.llm, cache, device)
            except NF4Unavailable as error:
                if only == "encoder":
                    raise UserError(f"cannot build the NF4 text encoder cache: {error}; runs use the bf16 encoder instead") from None
                reporter.warn(f"NF4 text encoder not cached: {error} (runs use the bf16 encoder)")
                result["encoder"] = {"skipped": str(error)}
            else:
                result["encoder"] = {"path": str(llm_cache_path(cache)), "device": device.type,
                                     "found": status.state, "reason": status.reason}
    if as_json:
        _print_json(result)
        return
    for name, part in (("DiT", result.get("dit")), ("text encoder", result.get("encoder"))):
        if part is None:
            continue
        if "skipped" in part:
            line = f"skipped: {part['skipped']}"
        elif part["found"] == "fresh":
            line = f"already cached in {part['path']}"
        else:
            line = f"built {part['path']}" + (f" (was {part['found']}: {part['reason']})" if part["found"] != "missing" else "")
        out.print(f"{name}: {line}", markup=False)


if __name__ == "__main__":
    app()
