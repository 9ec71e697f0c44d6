"""Full-size host-side check: the 13B and HunyuanVideo-1.5 checkpoints written with random weights,
then quantized and loaded by the product's own commands, with each command's peak memory measured.
The v15-* steps do the same for the 8.3B 1.5 DiT (float32 as Tencent ships it, 33.3 GB), one layout
at a time (each folder is deleted once quantized, so ~45 GB of scratch suffice).

    python -m bench.fullsize_cpu --scratch /path/with/60GB [--limit-gb 16] [--steps official-fp8,...]

Not a test (tens of GB of disk, minutes per step): it backs the README's host-RAM numbers.
Each step runs as its own process; a sampler thread reads the process tree's /proc/PID/status every
0.1 s for RssAnon (the process's own memory: what must fit in RAM) and RssFile (mapped file pages:
page cache the kernel can drop). With --limit-gb the commands also run inside a cgroup (v1
memory.limit_in_bytes, or v2 memory.max) of that size, as a machine with that much RAM.
The planner's prediction for the same work is saved next to each measurement.
Results: bench/results/fullsize_cpu-<machine>.{json,md}.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from lowvram.units import GIB

RESULTS = Path(__file__).parent / "results"
PY = sys.executable
STEPS = ("write-official", "official-fp8", "load-fp8", "official-int8", "official-fp8-limited",
         "write-diffusers", "diffusers-fp8", "diffusers-fp8-limited", "encoder-nf4",
         "v15-write-official", "v15-official-fp8", "v15-write-diffusers", "v15-diffusers-fp8")  # in run order


def tree_status(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) in bytes summed over `pid` and its descendants."""
    anon = file = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines() if ":" in line)
            anon += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
            file += int(fields.get("RssFile", "0 kB").split()[0]) * 1024
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except (OSError, ValueError):
            continue
        pids += [int(c) for c in children]
    return anon, file


def memory_cgroup(limit_bytes: int) -> Path | None:
    """A real memory cgroup with this limit (v2 with the memory controller, else v1), or None.
    Only files the kernel made count: /sys/fs/cgroup can be a plain tmpfs, where a written
    "memory.max" would be an ordinary file that limits nothing."""
    candidates = []
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):  # v2, where it has the memory controller
        controllers = root / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            candidates.append((root, "memory.max"))
    candidates.append((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"))
    for root, limit_file in candidates:
        if not (root / limit_file).exists() and not (root / "cgroup.procs").exists():
            continue
        group = root / "lowvram-bench"
        try:
            group.mkdir(exist_ok=True)
            if not (group / limit_file).exists():  # not made by the kernel: not a cgroup
                group.rmdir()
                continue
            (group / limit_file).write_text(str(limit_bytes))
            return group
        except OSError:
            continue
    return None


def measure(name: str, command: list[str], env: dict, cgroup: Path | None = None) -> dict:
    """Run `command`, sampling its memory; returns the record for the results file."""
    def enter_cgroup():
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    peak_file = None
    if cgroup is not None:
        # Page cache is charged to the cgroup that first reads a page: drop what earlier steps read,
        # so this step's checkpoint pages count against its own limit, and reset the group's peak.
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1")
        except OSError:
            pass
        peak_file = next((cgroup / n for n in ("memory.max_usage_in_bytes", "memory.peak") if (cgroup / n).exists()), None)
        if peak_file is not None and peak_file.name == "memory.max_usage_in_bytes":
            peak_file.write_text("0")

    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, preexec_fn=enter_cgroup, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"anon": 0, "file": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            anon, file = tree_status(proc.pid)
            peak["anon"], peak["file"] = max(peak["anon"], anon), max(peak["file"], file)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    sampler.join()
    record = {"step": name, "command": " ".join(command), "rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
              "peak_anon_gib": round(peak["anon"] / GIB, 3), "peak_file_gib": round(peak["file"] / GIB, 3),
              "cgroup_limit_gib": None, "output_tail": output[-1500:]}
    if cgroup is not None:
        limit_file = "memory.limit_in_bytes" if (cgroup / "memory.limit_in_bytes").exists() else "memory.max"
        record["cgroup_limit_gib"] = int((cgroup / limit_file).read_text()) / GIB
        if peak_file is not None:  # the group's own peak: anonymous memory plus the page cache charged to it
            record["cgroup_peak_gib"] = round(int(peak_file.read_text()) / GIB, 3)
    print(f"{name}: rc {record['rc']}, {record['seconds']} s, anon {record['peak_anon_gib']} GiB, "
          f"file {record['peak_file_gib']} GiB", flush=True)
    return record


def write_folder(root: Path, layout: str, only: tuple[str, ...] | None = None) -> list[str]:
    """The command that writes the full-size folder (only the given top folders, if set)."""
    code = (
        "import sys; from pathlib import Path; from lowvram.setup.synthetic_checkpoint import plan_folder, write_plan\n"
        f"plan = plan_folder({layout!r}, 'full', seed=0)\n"
        f"only = {only!r}\n"
        "if only:\n"
        "    plan.weights = [w for w in plan.weights if w.path.split('/')[0] in only]\n"
        "    plan.json_files = {k: v for k, v in plan.json_files.items() if k.split('/')[0] in only}\n"
        "    plan.tokenizers = {k: v for k, v in plan.tokenizers.items() if k.split('/')[0] in only}\n"
        f"write_plan(Path({str(root)!r}), plan)\n"
    )
    return [PY, "-c", code]


def write_v15_folder(root: Path, layout: str) -> list[str]:
    """The command that writes a full-size HunyuanVideo-1.5 folder (DiT, VAE, encoder configs)."""
    code = ("from pathlib import Path; from lowvram.setup.synthetic_v15 import write_v15_checkpoint\n"
            f"write_v15_checkpoint(Path({str(root)!r}), {layout!r}, 'full', seed=0)\n")
    return [PY, "-c", code]


def planned(profile: str) -> dict:
    """The planner's host-side prediction for a 16 GiB-RAM machine (first-use included)."""
    out = subprocess.run([PY, "-m", "cli", "plan", "--profile", profile, "--vram", "16", "--ram", "16", "--json"],
                         capture_output=True, text=True)
    data = json.loads(out.stdout)
    return {name: {"ram_gb": round(s["ram_gb"], 2), "page_cache_gb": round(s["page_cache_gb"], 2),
                   "ram_parts_gb": {k: round(v, 2) for k, v in s["ram_parts_gb"].items()}} for name, s in data["stages"].items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, required=True, help="folder for ~60 GB of checkpoints (emptied at the end)")
    parser.add_argument("--limit-gb", type=float, default=16.0, help="memory limit for the *-limited steps")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--keep", action="store_true", help="keep the scratch files")
    parser.add_argument("--merge", action="store_true", help="replace only these steps' records in the saved results")
    args = parser.parse_args(argv)
    steps = args.steps.split(",")
    official, diffusers = args.scratch / "official", args.scratch / "diffusers"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cgroup = memory_cgroup(int(args.limit_gb * GIB)) if any(s.endswith("-limited") for s in steps) else None
    records = []

    def run(name, command, limited=False):
        if name in steps:
            records.append(measure(name, command, env, cgroup if limited else None))

    def quantize(root, scheme, only="dit"):
        shutil.rmtree(root / "lowvram-cache", ignore_errors=True)
        return [PY, "-m", "cli", "quantize", "--model-dir", str(root), "--scheme", scheme, "--only", only, "--json"]

    args.scratch.mkdir(parents=True, exist_ok=True)
    run("write-official", write_folder(official, "official"))
    run("official-fp8", quantize(official, "fp8"))
    load = ("import sys, torch; from hyvideo.checkpoint import find_model_files; from lowvram.stages import dit_config_for, default_cache_dir\n"
            "from quant.cache import load_cached_dit\n"
            f"files = find_model_files({str(official)!r})\n"
            "model = load_cached_dit(default_cache_dir(files), dit_config_for(files), 'fp8', 'blocks', files.dit_weights, torch.bfloat16)\n"
            "total = sum(float(p.float().abs().sum()) if p.dtype != torch.float8_e4m3fn else float(p.view(torch.uint8).sum()) for p in model.parameters())\n"
            "print('touched every weight', total)\n")
    run("load-fp8", [PY, "-c", load])
    run("official-int8", quantize(official, "int8"))
    run("official-fp8-limited", quantize(official, "fp8"), limited=True)
    if any(s.startswith(("write-diffusers", "diffusers")) for s in steps):
        shutil.rmtree(official / "lowvram-cache", ignore_errors=True)
        (official / "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt").unlink(missing_ok=True)
        diffusers.mkdir(parents=True, exist_ok=True)
        for link, target in (("text_encoder", "text_encoder"), ("tokenizer", "text_encoder"),
                             ("text_encoder_2", "text_encoder_2"), ("tokenizer_2", "text_encoder_2")):
            if not (diffusers / link).exists():
                (diffusers / link).symlink_to(official / target)
    run("write-diffusers", write_folder(diffusers, "diffusers", only=("transformer", "vae")))
    run("diffusers-fp8", quantize(diffusers, "fp8"))
    run("diffusers-fp8-limited", quantize(diffusers, "fp8"), limited=True)
    run("encoder-nf4", quantize(diffusers, "fp8", only="encoder"))
    for layout in ("official", "diffusers"):
        if f"v15-write-{layout}" in steps or f"v15-{layout}-fp8" in steps:
            shutil.rmtree(args.scratch / "official", ignore_errors=True)  # the 13B folders, done with: room for 1.5
            shutil.rmtree(args.scratch / "diffusers", ignore_errors=True)
            root = args.scratch / f"v15-{layout}"
            run(f"v15-write-{layout}", write_v15_folder(root, layout))
            run(f"v15-{layout}-fp8", quantize(root, "fp8"))
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)

    machine = f"cpu-{os.cpu_count()}core-{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB)}gib"
    saved = RESULTS / f"fullsize_cpu-{machine}.json"
    if args.merge and saved.is_file():
        new = {r["step"]: r for r in records}
        old = [new.pop(r["step"], r) for r in json.loads(saved.read_text())["records"]]
        records = old + list(new.values())
    result = {"machine": machine, "python": platform.python_version(), "records": records,
              "planner_16gb_profile_on_16gib_ram": planned("16gb"), "limit_gb": args.limit_gb,
              "cgroup": str(cgroup) if cgroup else None}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"fullsize_cpu-{machine}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Full-size host-side check on {machine}", "",
             "13B DiT with random weights (official `.pt` 25.6 GB; diffusers shards), the product's own commands; v15-*: the 8.3B HunyuanVideo-1.5 DiT (float32 safetensors, 33.3 GB, Tencent's and diffusers' names) and its VAE.",
             "anon = peak RssAnon (own memory), file = peak RssFile (mapped file pages, droppable).", "",
             "cgroup peak = the memory cgroup's own peak usage (anon + page cache charged to it) under its limit.", "",
             "| step | rc | seconds | peak anon GiB | peak file GiB | memory limit GiB | cgroup peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['step']} | {r['rc']} | {r['seconds']} | {r['peak_anon_gib']} | {r['peak_file_gib']} | "
                     f"{r['cgroup_limit_gib'] or '-'} | {r.get('cgroup_peak_gib', '-')} |")
    lines += ["", "Planner, profile 16gb on a 16 GiB-RAM machine (first use included):", "",
              "```", json.dumps(result["planner_16gb_profile_on_16gib_ram"], indent=1), "```"]
    (RESULTS / f"fullsize_cpu-{machine}.md").write_text("\n".join(lines) + "\n")
    if not args.keep:
        shutil.rmtree(args.scratch, ignore_errors=True)
    if cgroup is not None:
        try:
            cgroup.rmdir()
        except OSError:
            pass
    return 0 if all(r["rc"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
