"""Commands that make videos and show them: generate, resume, demo, runs."""

import os
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from .app import (Aspect, Attention, CacheDir, Compile, Device, Fp8Matmul, Frames, Gpus, Json, Loras, ModelDir, Parallel, Pin,
                  WhichModel,
                  Preview, ProfileName, Quiet, Resolution, Riflex, RunsDir, Size, StepCache, UserError, app, err, out, overrides,
                  print_json, print_table, quiet_libraries, user_errors)
from .progress import RichReporter, run_and_report
from .ranks import as_rank

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
    model_dir: Path = ModelDir,
    profile: str = ProfileName,
    size: str = Size,
    resolution: str = Resolution,
    aspect: str = Aspect,
    frames: int = Frames,
    riflex: str = Riflex,
    steps: int = typer.Option(None, "--steps", help="Denoising steps (default 50; HunyuanVideo-1.5: its transformer's)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default: a random one, recorded in the run)."),
    guidance: float = typer.Option(None, "--guidance", help="Embedded guidance scale (default 6); HunyuanVideo-1.5: the "
                                   "classifier-free guidance scale (default: its transformer's, 6, or 1 when CFG-distilled)."),
    flow_shift: float = typer.Option(None, "--flow-shift", help="Flow-matching schedule shift (default 7; HunyuanVideo-1.5: "
                                     "its transformer's)."),
    model: str = WhichModel,
    image: Path = typer.Option(None, "--image", help="Image-to-video: the first frame (PNG, JPEG, WebP) on HunyuanVideo-I2V "
                               "weights; the size is the --resolution bucket closest to its aspect unless --size is given."),
    stability: bool = typer.Option(True, "--stability/--no-stability", help="With --image: start from 0.999 noise + 0.001 "
                                   "image latent (official stable mode, with --flow-shift 7); --no-stability --flow-shift 17 "
                                   "is the official dynamic mode."),
    prompt_file: Path = typer.Option(None, "--prompt-file", help="Read the prompt from this text file."),
    prompts: Path = typer.Option(None, "--prompts", help="A batch: one prompt per line, or JSON lines with overrides "
                                 '({"prompt": ..., "seed": 3, "size": "960x544", "frames": 33, "steps": 30, "riflex": "on", '
                                 '"image": "a.png"}).'),
    seeds: str = typer.Option(None, "--seeds", help="A batch: one clip per seed and prompt, e.g. 1,2,3 or 10..19."),
    attention: str = Attention,
    compile_blocks: bool = Compile,
    step_cache: str = StepCache,
    fp8_matmul: str = Fp8Matmul,
    pin: bool = Pin,
    rewrite: str = typer.Option(None, "--rewrite", help="Rewrite the prompt first with a local LLM: normal (clarify) or master "
                                "(add composition, lighting, camera motion). The text encoder by default (official layout)."),
    rewrite_model: Path = typer.Option(None, "--rewrite-model", help="With --rewrite: a local transformers causal-LM folder to rewrite with."),
    out_path: Path = typer.Option(None, "--out", help="Also copy the result here: a file (.mp4; .png with --frames 1) or a folder."),
    preview: bool = Preview,
    cache_dir: Path = CacheDir,
    runs_dir: Path = RunsDir,
    device: str = Device,
    lora: list[str] = Loras,
    gpus: int = Gpus,
    parallel: str = Parallel,
    as_json: bool = Json,
    quiet: bool = Quiet,
):
    """Generate a video; the run is saved after every step and can be resumed. With --prompts or
    --seeds, a batch: one run per clip, the models loaded once for all of them. With --gpus N, the
    clip's tokens are split across N GPUs."""
    import random

    with user_errors(as_json):
        from hyvideo.lora import LoraSpec
        from hyvideo.pipeline import TRAINED_FRAMES, GenerationRequest, riflex_choice
        from lowvram.generation.preflight import RunOptions
        from lowvram.setup.download import default_model_dir
        from lowvram.sizes import resolve_size

        width, height = resolve_size(size, resolution, aspect, image)
        batch = prompts is not None or seeds is not None
        if not batch:
            seed = random.randint(0, 1_000_000) if seed is None else seed
        sampling = {k: v for k, v in (("steps", steps), ("guidance", guidance), ("flow_shift", flow_shift)) if v is not None}
        given = {*sampling, *(["frames"] if frames is not None else []),  # a HunyuanVideo-1.5 model's own defaults fill the rest
                 *(["size"] if size is not None or resolution is not None else [])}
        request = GenerationRequest("" if batch else _read_prompt(prompt, prompt_file), width=width, height=height,
                                    frames=TRAINED_FRAMES if frames is None else frames,
                                    seed=seed, riflex=riflex_choice(riflex), image=None if image is None else str(image),
                                    stability=stability, **sampling)
        options = RunOptions(request, model_dir or default_model_dir(), runs_dir, profile,
                             overrides(step_cache, attention, compile_blocks, fp8_matmul, pin), device, out_path, cache_dir,
                             loras=[LoraSpec.parse(text) for text in lora or []], rewrite=rewrite, rewrite_model=rewrite_model,
                             preview=preview, model=model, sampling_given=frozenset(given))
    if batch:
        _generate_batch(prompt, prompt_file, prompts, seeds, options, as_json, quiet, gpus, parallel)
    else:
        _generate_one(options, as_json, quiet, gpus, parallel)


def _generate_one(options, as_json: bool, quiet: bool, gpus: int | None, parallel: str):
    from lowvram.generation.preflight import describe_parallel, start_run
    from lowvram.generation.runner import execute

    with user_errors(as_json):
        _ranks_for(options, gpus, parallel, as_json)

    def work(reporter, stop):
        run, files, plan = start_run(options, reporter)
        if not (as_json or quiet):
            ranks = run.settings["parallel"]
            on = f", on {describe_parallel(ranks)}" if ranks else ""
            image = f", from {run.settings['image']} at {plan.width}x{plan.height}" if run.settings.get("image") else ""
            err.print(f"run {run.id} (seed {options.request.seed}, profile {plan.profile.name}{on}{image}) in {run.folder}", markup=False)
        return execute(run, files, plan, reporter, stop)

    run_and_report(work, as_json, quiet)


def _ranks_for(options, gpus: int | None, parallel: str, as_json: bool):
    """generate --gpus N: launch the ranks, or be one (cli/ranks.py)."""
    request = options.request
    gpus_hint = f" --gpus {gpus}" if gpus else ""
    return as_rank(gpus, parallel, options.device, lambda: options.model_dir,
                   lambda: (request.width, request.height, request.frames), as_json, f"lowvram resume{gpus_hint}")


def _generate_batch(prompt, prompt_file, prompts, seeds, options, as_json, quiet, gpus, parallel):
    """`generate --prompts FILE` / `--seeds`: every line checked before anything loads."""
    from lowvram.generation.batch import clips_for, execute_batch, parse_seeds, read_prompts, start_batch

    with user_errors(as_json):
        if seeds is not None and options.request.seed is not None:
            raise UserError("give --seed or --seeds, not both")
        seed_list = parse_seeds(seeds) if seeds is not None else None
        if prompts is not None:
            if prompt is not None or prompt_file is not None:
                raise UserError("give the prompts with --prompts FILE, or one prompt with --seeds, not both")
            clips = read_prompts(prompts, options.request, seed_list)
        else:
            clips = clips_for(_read_prompt(prompt, prompt_file), options.request, seed_list)
        _ranks_for(options, gpus, parallel, as_json)

    def work(reporter, stop):
        batch, runs, files, plan = start_batch(options, clips, reporter, prompts)
        if not (as_json or quiet):
            err.print(f"batch {batch.id}: {len(runs)} clips (profile {plan.profile.name}) in {options.runs_dir}", markup=False)
        return execute_batch(batch, runs, files, plan, reporter, stop)

    run_and_report(work, as_json, quiet)


@app.command("rewrite")
def rewrite_command(
    prompt: str = typer.Argument(..., help="The prompt to rewrite."),
    mode: str = typer.Option("normal", "--mode", help="normal (clarify the intent) or master (add composition, lighting, camera motion)."),
    model_dir: Path = ModelDir,
    rewrite_model: Path = typer.Option(None, "--rewrite-model", help="A local transformers causal-LM folder to rewrite with instead "
                                       "of the text encoder of --model-dir (official layout)."),
    device: str = Device,
    as_json: bool = Json,
):
    """Print the prompt `generate --rewrite MODE` would encode, without generating."""
    quiet_libraries()
    reporter = RichReporter(enabled=not as_json)
    with user_errors(as_json), reporter:
        from lowvram.setup.download import default_model_dir
        from lowvram.generation.rewrite import rewrite_only
        from lowvram.generation.preflight import check_device, default_device

        text = rewrite_only(prompt, mode, model_dir or default_model_dir(), rewrite_model, check_device(device or default_device()), reporter)
    if as_json:
        print_json({"ok": True, "mode": mode, "prompt": prompt, "rewritten_prompt": text})
    else:
        out.print(text, markup=False)


@app.command()
def resume(
    run: str = typer.Argument(None, help="Run id, id prefix or folder (default: the newest unfinished run)."),
    batch: str = typer.Option(None, "--batch", help="Continue every unfinished run of this batch (id or id prefix)."),
    every: bool = typer.Option(False, "--all", help="Continue every unfinished run and batch in the runs folder."),
    runs_dir: Path = RunsDir,
    model_dir: Path = ModelDir,
    gpus: int = typer.Option(None, "--gpus", help="Continue on this many GPUs (default: as many as the run used; "
                             "another number continues it too, slightly differently)."),
    parallel: str = Parallel,
    as_json: bool = Json,
    quiet: bool = Quiet,
):
    """Continue an interrupted run from its last saved step (bit-identical to an uninterrupted run),
    or every unfinished run of a batch (--batch), or everything unfinished (--all)."""
    from lowvram.generation.batch import BatchResult, resume_all, resume_batch
    from lowvram.generation.runner import resume_run

    with user_errors(as_json):
        if sum((run is not None, batch is not None, every)) > 1:
            raise UserError("give one of: a run id, --batch ID, --all")
        _resume_ranks(runs_dir, run, batch, every, model_dir, gpus, parallel, as_json)

    def work(reporter, stop):
        if batch is not None:
            return resume_batch(runs_dir, batch, model_dir, reporter, stop)
        if every:
            return BatchResult(None, None, resume_all(runs_dir, model_dir, reporter, stop))
        return resume_run(runs_dir, run, model_dir, reporter, stop)

    run_and_report(work, as_json, quiet)


def _resume_ranks(runs_dir: Path, ref: str | None, batch: str | None, every: bool, model_dir: Path | None,
                  gpus: int | None, parallel: str, as_json: bool):
    """resume --gpus N (default: as many as the run used; for --batch, its first run; for --all, the
    newest unfinished): launch the ranks, or be one. Only the launcher and rank 0 read the runs
    (followers may be on machines without the runs folder)."""
    from lowvram.generation.batch import find_batch
    from lowvram.generation.ranks import rank_environment
    from lowvram.generation.run_folder import Run, find_run

    launcher_or_single = rank_environment() is None
    found = None
    if launcher_or_single or int(os.environ["RANK"]) == 0:
        if batch is not None:
            folders = [runs_dir / entry["id"] for entry in find_batch(runs_dir, batch).runs]
            found = next((Run.open(folder) for folder in folders if folder.is_dir()), None)
        else:
            found = find_run(runs_dir, ref)
    settings = found.settings if found else {}
    if gpus is None and launcher_or_single:
        gpus = (settings.get("parallel") or {}).get("ranks", 1)
    model = model_dir or settings.get("model_dir")
    single = batch is None and not every and found is not None
    video = (settings["width"], settings["height"], settings["frames"]) if single else None  # else rank 0 checks each run
    command = "lowvram resume " + (f"{found.id} " if single else f"--batch {batch} " if batch else "--all " if every else "")
    return as_rank(gpus, parallel, settings.get("device"), lambda: Path(model), lambda: video, as_json, f"{command}--gpus {gpus}")


@app.command()
def demo(
    prompt: str = typer.Argument("a red fox running through snow", help="Prompt for the tiny model."),
    save_model: Path = typer.Option(None, "--save-model", help="Where to keep the tiny checkpoint (default: RUNS_DIR/demo-model); "
                                    "then `generate --model-dir DIR` uses it."),
    size: str = typer.Option("128x96", "--size", help="WIDTHxHEIGHT."),
    frames: int = typer.Option(17, "--frames"),
    steps: int = typer.Option(10, "--steps"),
    seed: int = typer.Option(0, "--seed"),
    step_cache: str = StepCache,
    runs_dir: Path = RunsDir,
    device: str = Device,
    as_json: bool = Json,
    quiet: bool = Quiet,
):
    """Run a tiny random-weight HunyuanVideo end to end (CPU or GPU, well under a minute).

    The video is noise-like (random weights); it proves the install, the run folder and the mp4.
    The tiny checkpoint is written once and reused, so an interrupted demo can be resumed."""
    with user_errors(as_json):
        from hyvideo.pipeline import GenerationRequest
        from lowvram.generation.preflight import RunOptions, start_run
        from lowvram.generation.runner import execute
        from lowvram.sizes import parse_size

        width, height = parse_size(size)
        request = GenerationRequest(prompt, width=width, height=height, frames=frames, steps=steps, seed=seed)
    model_root = save_model or runs_dir / "demo-model"

    def work(reporter, stop):
        from lowvram.generation.runner import DEMO_PROFILE, ensure_demo_model

        ensure_demo_model(model_root, reporter)
        options = RunOptions(request, model_root, runs_dir, DEMO_PROFILE, overrides(step_cache), device)
        run, files, plan = start_run(options, reporter)
        return execute(run, files, plan, reporter, stop)

    run_and_report(work, as_json, quiet)
    if not (as_json or quiet):
        err.print(f"tiny model in {model_root}: lowvram generate \"...\" --model-dir {model_root} --size {size} --frames {frames} "
                  f"--steps {steps}", markup=False)



@app.command("runs")
def runs_command(runs_dir: Path = RunsDir, as_json: bool = Json):
    """List runs, grouped by batch: id, prompt, size x frames, step k/N, state, output."""
    from lowvram.generation.batch import group_runs

    groups = [(batch, [entry.summary() for entry in entries]) for batch, entries in group_runs(runs_dir)]
    if as_json:
        rows = [{**row, "batch": batch.id if batch else None} for batch, members in groups for row in members]
        batches = [{"id": batch.id, "source": batch.source, "runs": [row["id"] for row in members]} for batch, members in groups if batch]
        print_json({"runs_dir": str(runs_dir), "runs": rows, "batches": batches})
        return
    if not groups:
        out.print(f"no runs in {runs_dir}", markup=False)
        return
    table = Table(title=f"runs in {runs_dir}", caption=f"outputs are in {runs_dir}/<id>/")
    table.add_column("id", no_wrap=True)
    table.add_column("prompt", min_width=16, max_width=40)
    for name in ("size x frames", "step", "state", "output"):
        table.add_column(name, no_wrap=True)
    for batch, rows in groups:
        if batch is not None or len(groups) > 1:
            table.add_section()
            done = sum(row["state"] == "done" for row in rows)
            title = batch.id + (f" ({Path(batch.source).name})" if batch.source else "") if batch else "single runs"
            table.add_row(Text(title, style="bold"), "", "", "", f"{done}/{len(rows)} done" if batch else "", "")
        _add_run_rows(table, rows)
    print_table(table)


def _add_run_rows(table: Table, rows: list[dict]) -> None:
    for row in rows:
        prompt = row["prompt"] or row.get("problem", "")
        prompt = f"{Path(row['input_image']).name} -> {prompt}" if row.get("input_image") else prompt
        prompt = prompt if len(prompt) <= 40 else prompt[:39] + "…"
        step = f"{row['step']}/{row['steps']}" if row["steps"] else "-"
        output = row["output"] or row["preview"] or "-"  # unfinished: its live preview, if it writes one
        output = Path(output).name if Path(output).parent == Path(row["folder"]) else output
        state = row["state"]
        if state in ("encoding", "denoising", "decoding"):  # unfinished: live, or waiting for `lowvram resume`
            state += " (running)" if row["running"] else " (stopped)"
        table.add_row(row["id"], prompt, row["size"] or "-", step, state, output)
