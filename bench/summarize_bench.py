"""Collect `lowvram bench --json` outputs into one JSON + markdown file named by device.

    python -m bench.summarize_bench OUT_DIR   # reads OUT_DIR/lowvram-bench-*.json

Writes OUT_DIR/lowvram_bench-<device>.{json,md}: per configuration and stage, measured peak VRAM
(allocated, and reserved: what a cap limits) and host RAM next to the planner's prediction and the
error in %, s/step and the full-run estimate. A configuration without its JSON (stopped by a time
limit, or failed) is summarized from its run's manifest (`lowvram-bench-NAME.manifest.json`, which
bench/run_gpu.sh keeps): the stages it finished and its step seconds.
"""

import json
import sys
from pathlib import Path


def fmt(value, spec="{:.2f}") -> str:
    return "-" if value is None else spec.format(value)


def partial(manifest_path: Path) -> dict:
    """What a run's manifest says of a bench that did not finish: its state and measurements."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return {}
    return {"state": manifest.get("state"), "step": manifest.get("step"), "measured": manifest.get("measured", {})}


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:] or ["bench/results"])[0])
    runs = []
    for path in sorted(out.glob("lowvram-bench-*.json")):
        if path.name.endswith(".manifest.json"):
            continue
        config = path.stem.removeprefix("lowvram-bench-")
        try:
            runs.append({"config": config, **json.loads(path.read_text())})
        except ValueError:
            runs.append({"config": config, "error": "no JSON (timed out or failed)", **partial(path.with_suffix(".manifest.json"))})
    device = next((r.get("gpu") or r.get("device") for r in runs if "stages" in r), "unknown").replace(" ", "-")
    lines = [f"# lowvram bench on {device}", "",
             "Random weights of the real size, the generate path end to end. Measured peak VRAM is",
             "torch.cuda.max_memory_allocated per stage; RAM is peak RssAnon (the process's own memory).", ""]
    for run in runs:
        if "stages" not in run:
            lines += [f"## {run['config']}: {run.get('error') or run.get('ok')}", ""]
            if run.get("measured"):
                lines += [f"stopped in state {run['state']} after step {run['step']}; measured before that:", "",
                          "```", json.dumps(run["measured"], indent=1), "```", ""]
            continue
        video = run["video"]
        i2v = f", image-to-video ({run['model']['size']})" if run["model"].get("image") else ""
        if str(run["model"].get("name")).startswith("1.5-"):
            i2v = f", HunyuanVideo-{run['model']['name']} ({run['model']['size']})"
        lines += [f"## {run['config']}: {run['profile']} at {video['width']}x{video['height']}x{video['frames']}{i2v}, "
                  f"cap {fmt(run['cap_gb'], '{:g}')} GiB" + (f" per GPU, {run['parallel']['ranks']} GPUs (Ulysses "
                  f"{run['parallel']['ulysses']} x ring {run['parallel']['ring']})" if run.get("parallel") else ""), "",
                  f"s/step {fmt(run['s_per_step'])}, DiT load {fmt(run['dit_load_seconds'], '{:.1f}')} s, "
                  f"estimate for {run['estimate']['steps']} steps {fmt(run['estimate']['seconds'], '{:.0f}')} s; "
                  f"blocks resident/streamed {run['schedule']['resident'].__len__()}/{run['schedule']['streamed'].__len__()}", "",
                  "| stage | s | VRAM GiB | reserved | planned | error | RAM GiB | planned | error |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, st in run["stages"].items():
            lines.append(f"| {name} | {fmt(st['seconds'], '{:.1f}')} | {fmt(st['vram_gb'])} | {fmt(st.get('vram_reserved_gb'))} | "
                         f"{fmt(st['planned_vram_gb'])} | "
                         f"{fmt(st['vram_error_pct'], '{:+.1f} %')} | {fmt(st['ram_gb'])} | {fmt(st['planned_ram_gb'])} | "
                         f"{fmt(st['ram_error_pct'], '{:+.1f} %')} |")
        lines.append("")
    (out / f"lowvram_bench-{device}.json").write_text(json.dumps(runs, indent=1))
    (out / f"lowvram_bench-{device}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'lowvram_bench-{device}.md'} ({len(runs)} configurations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
