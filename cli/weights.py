"""Commands about the weights and this machine: doctor, download, quantize."""

from pathlib import Path

import typer
from rich.table import Table

from .app import CacheDir, Json, Quiet, RunsDir, UserError, app, format_bytes, out, print_json, print_table, quiet_libraries, user_errors
from .progress import make_reporter

@app.command()
def doctor(
    model_dir: Path = typer.Option(None, "--model-dir", envvar="LOWVRAM_MODEL_DIR", help="Weights folder to check."),
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
    model_dir: Path = typer.Option(None, "--model-dir", help="Where to put the weights (default ./ckpts)."),
    layout: str = typer.Option(None, "--layout", help="diffusers (one repo, complete; the huggingface default) or official (Tencent's files)."),
    source: str = typer.Option("huggingface", "--source", help="huggingface or modelscope (official layout; needs the [modelscope] extra)."),
    fp8: bool = typer.Option(False, "--fp8", help="Also Tencent's FP8 DiT pair (--layout official)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and sizes, download nothing."),
    as_json: bool = Json,
    quiet: bool = Quiet,
):
    """Download the weights from huggingface.co (or modelscope.cn) into the folder layout lowvram reads."""
    from lowvram.setup import download as dl

    model_dir = model_dir or dl.DEFAULT_MODEL_DIR
    with user_errors(as_json):
        layout = dl.check_source(source, layout)
        if dry_run:
            files = dl.plan_download(model_dir, layout, fp8, source)
            total = sum(f.size or 0 for f in files)
            missing = sum(f.size or 0 for f in files if not f.present)
            known = all(f.size is not None for f in files)
            if as_json:
                print_json({"ok": True, "model_dir": str(model_dir), "layout": layout, "source": source,
                            "total_bytes": total if known else None, "to_download_bytes": missing if known else None,
                            "files": [{"repo": f.repo, "file": f.file, "size": f.size, "present": f.present} for f in files]})
                return
            table = Table("repo", "file", "size", "", title=f"download into {model_dir} ({layout} layout, from {source})")
            for f in files:
                table.add_row(f.repo, f.file, format_bytes(f.size), "present" if f.present else "")
            print_table(table)
            if known:
                out.print(f"total {format_bytes(total)}, to download {format_bytes(missing)}")
            else:
                out.print("sizes unknown: a ModelScope dry run does not ask the server; text_encoder/ is extracted locally "
                          "(Llama-3-8B in fp16, ~16 GB, besides the LLaVA download)")
            return
        dl.download(model_dir, layout, fp8, progress=not (as_json or quiet), source=source)
        layout_found, checks = dl.check_model_folder(model_dir)
        bad = [c for c in checks if not c.ok]
        if bad:
            raise UserError(f"downloaded, but {len(bad)} file(s) are incomplete (first: {bad[0].path}: {bad[0].problem}); run the same command again")
    if as_json:
        print_json({"ok": True, "model_dir": str(model_dir), "layout": layout_found, "files": len(checks)})
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
    quiet_libraries()
    reporter = make_reporter(enabled=not as_json)
    result = {}
    with user_errors(as_json), reporter:
        import torch

        from hyvideo.checkpoint import find_model_files, load_dit_state_dict
        from lowvram.setup.download import default_model_dir
        from lowvram.generation.preflight import CPU_MAX_DIT_PARAMS
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
