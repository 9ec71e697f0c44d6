"""Commands that answer "will it fit, how fast": plan, profiles, bench."""

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .app import (Aspect, Attention, Compile, Device, Fp8Matmul, Frames, Gpus, Json, Loras, Parallel, Pin, ProfileName, Quiet, ReleasedModel,
                  Resolution, Size, StepCache, UserError, app, err, out, overrides, print_json, print_table, profiles_app,
                  quiet_libraries, user_errors)
from .progress import RichReporter, sigint_saves
from .ranks import as_rank

@app.command()
def plan(
    profile: str = ProfileName,
    size: str = Size,
    resolution: str = Resolution,
    aspect: str = Aspect,
    frames: int = Frames,
    steps: int = typer.Option(50, "--steps", help="Denoising steps (for the DiT forwards a step cache is expected to run)."),
    step_cache: str = StepCache,
    pin: bool = Pin,
    lora: list[str] = Loras,
    vram: float = typer.Option(None, "--vram", help="GiB of VRAM to plan for, per GPU with --gpus (default: this GPU's "
                               "free VRAM, else the profile's budget)."),
    ram: float = typer.Option(None, "--ram", help="GiB of host RAM to plan for, for all --gpus processes "
                              "(default: available RAM)."),
    gpus: int = Gpus,
    parallel: str = Parallel,
    link_gbs: float = typer.Option(None, "--link-gbs", help="With --gpus: GB/s each GPU's link carries, for the communication "
                                   "estimate (default 12: PCIe 4.0 x8, what a two-card consumer board gives each card)."),
    model: str = ReleasedModel,
    as_json: bool = Json,
):
    """Predict peak VRAM and RAM per stage (text, DiT, VAE); exit 1 if it does not fit."""
    with user_errors(as_json):
        from hyvideo.lora import LoraSpec
        from lowvram.generation.preflight import PlanQuery, plan_only
        from lowvram.sizes import resolve_size

        query = PlanQuery(*resolve_size(size, resolution, aspect), frames, steps, size is not None or resolution is not None,
                          profile, overrides(step_cache, pin=pin),
                          [LoraSpec.parse(text) for text in lora or []], None if vram is None else int(vram * 2**30),
                          None if ram is None else int(ram * 2**30), gpus, parallel)
        if link_gbs is not None:
            query.link_gbs = link_gbs
        query.model = model
        answer = plan_only(query)
    result, found = answer.result, answer.plan
    if as_json:
        print_json(result)
    elif found is None:
        err.print(f"[red]does not fit[/] ({escape(result['model']['description'])}): {escape(result['reason'])}" + (f"; try {result['suggestion']}" if result["suggestion"] else ""))
    else:
        print_plan(answer, query)
    if not result["fits"]:
        raise typer.Exit(1)


def print_plan(answer, query) -> None:
    """The plan as a table, the block schedule, and what several GPUs or a step cache add."""
    found, chosen, forwards = answer.plan, answer.profile, answer.forwards
    rows = found.table_rows()
    table = Table(*rows[0], title=f"{answer.result['model']['description']}: {chosen.name} at "
                                  f"{found.width}x{found.height}x{found.frames}")
    for row in rows[1:]:
        table.add_row(*row)
    print_table(table)
    out.print(f"DiT blocks{found.per_gpu}: {found.schedule}")
    if found.layout:
        print_parallel(found, query.link_gbs, forwards[1])
    if chosen.step_cache == "deepcache":
        from hyvideo.v15_step_cache import deepcache_steps

        computed = len(deepcache_steps(query.steps))
        out.print(f"step cache: deepcache (Tencent's schedule): every block runs on {computed} of {query.steps} steps, the last "
                  f"block alone on the other {query.steps - computed}")
    elif chosen.step_cache != "off":
        fewest, most = forwards
        out.print(f"step cache: {chosen.step_cache}: the DiT's blocks are expected to run on {fewest}-{most} of {query.steps} "
                  "steps (published HunyuanVideo figures; random weights differ)")
    if not found.fits:
        hint = answer.result.get("suggestion")
        err.print("[red]does not fit[/]" + (f": try {hint}" if hint else ": try a smaller --size or fewer --frames"))


def print_parallel(found, link_gbs: float, forwards: int) -> None:
    """Several GPUs: the layout, what is per GPU and per machine, and the communication estimate."""
    comm = found.communication
    out.print(f"{found.layout} ({found.rank_tokens:,} of {found.tokens:,} image tokens each, and all the text tokens); "
              f"VRAM is per GPU (rank 0's also runs the text encoders and the VAE), RAM is for the machine "
              f"({found.local_ranks} processes, each pinning its own streamed blocks)", markup=False)
    out.print(f"communication per DiT forward: {comm.per_forward / 1e9:.1f} GB sent per rank "
              f"({comm.per_block / 1e6:.0f} MB per block), ~{comm.seconds(link_gbs):.1f} s at {link_gbs:g} GB/s; "
              f"{forwards} forwards: ~{forwards * comm.seconds(link_gbs) / 60:.1f} min (an estimate, not measured: "
              "bytes / bandwidth; cards without peer-to-peer access go through host memory)", markup=False)


@profiles_app.callback()
def profiles_list(ctx: typer.Context, as_json: bool = Json):
    """List the shipped memory profiles."""
    if ctx.invoked_subcommand is not None:
        return
    with user_errors(as_json):
        from lowvram.families import RELEASED_NAMES
        from lowvram.profiles import shipped_profiles

        profiles = shipped_profiles()
    if as_json:  # "models": what a profile may run (lowvram plan --model NAME)
        print_json({"profiles": [{**p.to_dict(), "source": p.source} for p in profiles], "models": RELEASED_NAMES})
        return
    table = Table("name", "VRAM GiB", "DiT", "text encoder", "resident blocks", "description", title="profiles (fastest first)")
    for p in profiles:
        table.add_row(p.name, f"{p.vram_budget_gb:g}", p.dit_scheme, p.encoder_scheme, str(p.resident_blocks), p.description)
    print_table(table)
    out.print("use one with --profile NAME, or pass your own .toml file (`lowvram profiles show NAME` prints a starting point)")
    out.print("a profile is a memory budget for any model (HunyuanVideo 13B T2V, HunyuanVideo-I2V, HunyuanVideo-1.5): "
              "`lowvram plan --model NAME` says what one needs under it (NAME: t2v, i2v, i2v-33ch, 1.5-<variant>)", markup=False)


@profiles_app.command("show")
def profiles_show(name: str = typer.Argument(..., help="Profile name or .toml path."), as_json: bool = Json):
    """Show every field of one profile."""
    with user_errors(as_json):
        from lowvram.profiles import load_profile

        profile = load_profile(name)
    values = profile.to_dict()
    if as_json:
        print_json({**values, "source": profile.source})
        return
    out.print(f"# {profile.source}", markup=False)
    for key, value in values.items():
        out.print(f"{key} = {json.dumps(value)}", markup=False)



@app.command()
def bench(
    scratch: Path = typer.Option(Path("lowvram-bench"), "--scratch", help="Where the random-weight model (~42 GB at full size) and runs go."),
    model_size: str = typer.Option("full", "--model-size", help="full (13B, the real sizes) or tiny."),
    layout: str = typer.Option(None, "--layout", help="official (the default), official-fp8 (Tencent's FP8 DiT pair) or diffusers: "
                               "the folder to write and load (with --model 1.5-...: diffusers)."),
    model: str = typer.Option(None, "--model", help="1.5-<variant>: bench HunyuanVideo-1.5 instead of the 13B model (e.g. "
                              "1.5-720p_t2v, 1.5-480p_t2v_distilled; image-to-video with --image: 1.5-480p_i2v, "
                              "1.5-480p_i2v_step_distilled)."),
    profile: str = ProfileName,
    size: str = Size,
    resolution: str = Resolution,
    aspect: str = Aspect,
    frames: int = Frames,
    image: Path = typer.Option(None, "--image", help="Image-to-video: bench HunyuanVideo-I2V (token_replace), or with "
                               "--model a 1.5 image-to-video transformer, on this image; the video takes its bucket, as "
                               "generate --image."),
    steps: int = typer.Option(2, "--steps", help="Denoising steps to measure (the estimate scales to 50)."),
    cap_gb: float = typer.Option(None, "--cap-gb", help="Emulate a card with this many GiB (caps PyTorch's allocations)."),
    step_cache: str = StepCache,
    attention: str = Attention,
    compile_blocks: bool = Compile,
    fp8_matmul: str = Fp8Matmul,
    pin: bool = Pin,
    device: str = Device,
    gpus: int = Gpus,
    parallel: str = Parallel,
    as_json: bool = Json,
    quiet: bool = Quiet,
):
    """Run the real pipeline on random weights of the real size: per stage, measured peak VRAM and
    RAM next to the plan, s/step, and an estimate for a full run. The video is noise. With --gpus N
    and --cap-gb, every GPU is capped. With --json, progress lines still go to stderr when it is a
    file or a pipe: a bench stopped by a time limit leaves its log."""
    quiet_libraries()
    reporter = RichReporter(enabled=not quiet and not (as_json and err.is_terminal))
    with user_errors(as_json):
        from lowvram.generation.bench import BenchOptions, cap_vram, ensure_synthetic_model, run_bench
        from lowvram.generation.ranks import leave_ranks, rank_environment
        from lowvram.generation.runner import RunInterrupted, StopRequest
        from lowvram.sizes import resolve_size

        width, height = resolve_size(size, resolution, aspect, image)
        options = BenchOptions(scratch, width, height, frames, steps, profile, model_size, layout,
                               None if cap_gb is None else int(cap_gb * 2**30), device,
                               overrides(step_cache, attention, compile_blocks, fp8_matmul, pin), image, model,
                               size_given=size is not None or resolution is not None)
        env = rank_environment()
        if env is not None and options.cap_bytes is not None:  # each rank caps its own GPU
            cap_vram(options.cap_bytes, f"cuda:{env['LOCAL_RANK']}")

        def model_dir():  # written by the launcher, before any rank starts
            with reporter:
                return ensure_synthetic_model(scratch, options.synthetic_size, options.layout, reporter)

        as_rank(gpus, parallel, device, model_dir, lambda: (width, height, frames), as_json, "lowvram bench")
        stop = StopRequest()
        try:
            with sigint_saves(stop), reporter:
                result = run_bench(options, reporter, stop)
        except RunInterrupted:
            raise UserError("stopped; the bench run is not resumed (run `lowvram bench` again)") from None
        finally:
            leave_ranks()  # rank 0 of several: the followers stop with it
    if as_json:
        print_json({"ok": True, **result, "warnings": reporter.warnings})
    else:
        video = result["video"]  # as run: a 1.5 model takes its own size and frames where none were given
        print_bench(result, f"{video['width']}x{video['height']}x{video['frames']}, {video['steps']} steps")


def print_bench(result: dict, video: str) -> None:
    """Measured vs planned per stage as a table, then s/step and the estimate for a whole run."""
    from lowvram.generation.preflight import describe_parallel

    title = (f"{result['profile']} at {video}, {result['model']['name']} ({result['model']['size']} random model)"
             + (f", {describe_parallel(result['parallel'])}" if result["parallel"] else "")
             + (f", capped at {result['cap_gb']:g} GiB" if result["cap_gb"] else "") + f" ({result['gpu'] or result['device']})")
    table = Table("stage", "seconds", "VRAM GiB", "planned", "error", "RAM GiB", "planned", "error", "page cache GiB", title=title)

    def number(value, fmt="{:.2f}"):
        return "-" if value is None else fmt.format(value)

    for name, st in result["stages"].items():
        table.add_row(name, number(st["seconds"], "{:.1f}"), number(st["vram_gb"]), number(st["planned_vram_gb"]),
                      number(st["vram_error_pct"], "{:+.1f} %"), number(st["ram_gb"]), number(st["planned_ram_gb"]),
                      number(st["ram_error_pct"], "{:+.1f} %"), number(st["page_cache_gb"]))
    print_table(table)
    dit = result["stats"].get("dit", {})
    out.print(f"DiT: {dit.get('resident_blocks')} blocks resident, {dit.get('streamed_blocks')} streamed; "
              f"load {result['dit_load_seconds']:.1f} s; s/step {number(result['s_per_step'])}", markup=False)
    if result["estimate"]["seconds"] is not None:
        minutes = result["estimate"]["seconds"] / 60
        out.print(f"estimate for {result['estimate']['steps']} steps + encode + decode: {minutes:.1f} min on this machine", markup=False)
    out.print(f"note: {result['note']} (video: {result['video_path']})", markup=False)
