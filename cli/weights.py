"""Commands about the weights and this machine: doctor, download, quantize."""

from pathlib import Path

import typer
from rich.table import Table

from .app import CacheDir, Json, ModelDir, Quiet, ReleasedModel, RunsDir, UserError, WhichModel, app, format_bytes, out, print_json, print_table, quiet_libraries, user_errors
from .progress import RichReporter

@app.command()
def doctor(
    model_dir: Path = ModelDir,
    runs_dir: Path = RunsDir,
    as_json: bool = Json,
):
    """Check torch/CUDA, the GPU (VRAM, FP8 support), optional packages, RAM, disk and the weights."""
    from lowvram.setup.doctor import run_doctor
    from lowvram.setup.download import default_model_dir

    model_dir = model_dir or default_model_dir()
    report = run_doctor(model_dir, runs_dir)
    if as_json:
        print_json(report)
    else:
        colors = {"ok": "green", "warn": "yellow", "fail": "red"}
        table = Table("check", "", "detail", title="lowvram doctor")
        for check in report["checks"]:
            table.add_row(check["name"], f"[{colors[check['status']]}]{check['status']}[/]", check["detail"])
        print_table(table)
        if report["files"]:
            files = Table("file", "size", "status", title=f"weights in {model_dir}")
            for row in report["files"]:
                files.add_row(row["file"], format_bytes(row["size"]), row["status"])
            print_table(files)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def download(
    model_dir: Path = ModelDir,
    layout: str = typer.Option(None, "--layout", help="diffusers (one repo, complete; the huggingface default) or official (Tencent's files)."),
    source: str = typer.Option("huggingface", "--source", help="huggingface or modelscope (official layout; needs the \\[modelscope] extra)."),
    fp8: bool = typer.Option(False, "--fp8", help="Also Tencent's FP8 DiT pair (--layout official)."),
    model: str = ReleasedModel,
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and sizes, download nothing."),
    as_json: bool = Json,
    quiet: bool = Quiet,
):
    """Download the weights from huggingface.co (or modelscope.cn) into the folder layout lowvram reads."""
    from lowvram.setup import download as dl
    from lowvram.setup.model_folder import check_model_folder

    model_dir = model_dir or dl.DEFAULT_MODEL_DIR
    with user_errors(as_json):
        layout = dl.check_source(source, layout)
        if dry_run:
            files = dl.plan_download(model_dir, layout, fp8, source, model)
            total = sum(f.size or 0 for f in files)
            missing = sum(f.size or 0 for f in files if not f.present)
            known = all(f.size is not None for f in files)
            if as_json:
                print_json({"ok": True, "model_dir": str(model_dir), "layout": layout, "source": source, "model": model,
                            "total_bytes": total if known else None, "to_download_bytes": missing if known else None,
                            "files": [{"repo": f.repo, "file": f.file, "size": f.size, "present": f.present} for f in files]})
                return
            table = Table("repo", "file", "size", "", title=f"download {model} into {model_dir} ({layout} layout, from {source})")
            for f in files:
                table.add_row(f.repo, f.file, format_bytes(f.size), "present" if f.present else "")
            print_table(table)
            if known:
                out.print(f"total {format_bytes(total)}, to download {format_bytes(missing)}")
            elif model == "t2v":
                out.print("sizes unknown: a ModelScope dry run does not ask the server; text_encoder/ is extracted locally "
                          "(Llama-3-8B in fp16, ~16 GB, besides the LLaVA download)")
            else:
                out.print("sizes unknown: a ModelScope dry run does not ask the server")
            return
        dl.download(model_dir, layout, fp8, progress=not (as_json or quiet), source=source, model=model)
        layout_found, checks = check_model_folder(model_dir)
        bad = [c for c in checks if not c.ok]
        if bad:
            raise UserError(f"downloaded, but {len(bad)} file(s) are incomplete (first: {bad[0].path}: {bad[0].problem}); run the same command again")
    if as_json:
        print_json({"ok": True, "model_dir": str(model_dir), "layout": layout_found, "files": len(checks)})
    else:
        out.print(f"weights complete in {model_dir} ({layout_found} layout, {len(checks)} files)", markup=False)


@app.command()
def quantize(
    model_dir: Path = ModelDir,
    scheme: str = typer.Option("fp8", "--scheme", help="DiT scheme: fp8 or int8."),
    policy: str = typer.Option("blocks", "--policy", help="Which DiT linears to quantize: blocks or blocks-no-mod."),
    only: str = typer.Option(None, "--only", help="Build one cache only: dit or encoder (default: both)."),
    cache_dir: Path = CacheDir,
    model: str = WhichModel,
    as_json: bool = Json,
):
    """Quantize once into the cache folder (minutes): the DiT (fp8/int8) and the LLM text encoder
    (NF4); later runs (`generate` with the same --cache-dir) load them directly."""
    quiet_libraries()
    reporter = RichReporter(enabled=not as_json)
    with user_errors(as_json), reporter:
        from lowvram.setup.download import default_model_dir
        from lowvram.setup.quantize import quantize_model

        result = quantize_model(model_dir or default_model_dir(), scheme, policy, only, cache_dir, reporter, model)
    if as_json:
        print_json(result)
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
