"""What `lowvram doctor`'s check of what a weight file holds costs on a full-size file: the 13B
33-channel I2V DiT (25.6 GB, random weights) is written into a scratch folder, then, each in a fresh
process, its index is read (`weight_io.read_weight_index`: the zip directory and data.pkl through
the weights-only unpickler onto meta storages) and its place checked (`weight_contents.check_dit`:
the loader's key and shape check against the DiT built on the meta device), first in the I2V place,
then moved (a rename) into the text-to-video place, where it must be named.

    python -m bench.bench_doctor_index --scratch /path/with/30GB [--keep]

Not a test (26 GB of disk, ~5 min to write). Measured per process: wall time, bytes read through
read() (/proc/self/io rchar), page faults (a touched page of the mapping is a fault), RssFile /
RssAnon before and after, peak RSS (VmHWM; ru_maxrss would count the forking parent's). The page
cache is not dropped (that needs root and disturbs the machine): the first process runs right
after the write, the others read a warm cache. --keep keeps the file for a rerun.
Results: bench/results/doctor_index-<machine>.{json,md}.
"""

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from hyvideo.checkpoint import OFFICIAL_DIT, OFFICIAL_I2V_DIT

RESULTS = Path(__file__).parent / "results"

MEASURE = """
import json, resource, sys, time
from pathlib import Path
from hyvideo.checkpoint import releases_in
from hyvideo.errors import HyVideoError
from hyvideo.weight_contents import check_dit
from hyvideo.weight_io import read_weight_index

def status(key):  # kB
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

def rchar():
    return int(next(line for line in open("/proc/self/io") if line.startswith("rchar:")).split()[1])

root = Path(sys.argv[1])
files = next(f for f in releases_in(root) if f.dit_weights[0].is_file())  # the place the DiT is in now
before = (time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), status("RssFile:"), status("RssAnon:"), rchar())
index = read_weight_index(files.dit_weights)
index_s = time.perf_counter() - before[0]
try:
    check_dit(files)
    result = "ok"
except HyVideoError as error:
    result = str(error)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "file_bytes": files.dit_weights[0].stat().st_size, "tensors": len(index),
    "params": sum(t.numel() for t in index.values()), "index_s": index_s,
    "index_and_check_s": time.perf_counter() - before[0], "read_bytes": rchar() - before[4],
    "minor_faults": usage.ru_minflt - before[1].ru_minflt, "major_faults": usage.ru_majflt - before[1].ru_majflt,
    "rss_file_mib": [before[2] / 1024, status("RssFile:") / 1024], "rss_anon_mib": [before[3] / 1024, status("RssAnon:") / 1024],
    "peak_rss_mib": status("VmHWM:") / 1024, "check": result}))
"""


def measure(root: Path, place: str, run: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(root)], capture_output=True, text=True, check=True)
    return {"place": place, "run": run, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--keep", action="store_true", help="keep the 25.6 GB file")
    args = parser.parse_args()
    from lowvram.setup.synthetic_checkpoint import FolderPlan, plan_folder, write_plan

    root = args.scratch / "doctor-index-ckpts"
    dit = [f for f in plan_folder("official", "full-i2v-33ch").weights if f.path == OFFICIAL_I2V_DIT]
    if not (root / OFFICIAL_I2V_DIT).is_file():
        write_plan(root, FolderPlan(dit, {}, {}))
    elif (root / OFFICIAL_DIT).is_file():  # kept from a run before (--keep)
        (root / OFFICIAL_DIT).rename(root / OFFICIAL_I2V_DIT)
    rows = [measure(root, "i2v", "first after writing"), measure(root, "i2v", "repeat")]
    (root / OFFICIAL_DIT).parent.mkdir(parents=True, exist_ok=True)
    (root / OFFICIAL_I2V_DIT).rename(root / OFFICIAL_DIT)
    rows.append(measure(root, "t2v", "repeat"))
    if not args.keep:
        shutil.rmtree(root)
    machine = f"cpu-{len(__import__('os').sched_getaffinity(0))}core"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"doctor_index-{machine}.json").write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=1) + "\n")
    lines = ["| place | run | index s | index + check s | read() bytes | faults minor/major | RssFile MiB | RssAnon MiB | peak RSS MiB | check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['place']} | {r['run']} | {r['index_s']:.3f} | {r['index_and_check_s']:.3f} | {r['read_bytes']:,} | "
                     f"{r['minor_faults']}/{r['major_faults']} | {r['rss_file_mib'][0]:.0f} -> {r['rss_file_mib'][1]:.0f} | "
                     f"{r['rss_anon_mib'][0]:.0f} -> {r['rss_anon_mib'][1]:.0f} | {r['peak_rss_mib']:.0f} | {r['check']} |")
    header = (f"{rows[0]['file_bytes'] / 1e9:.2f} GB DiT file, {rows[0]['tensors']} tensors, "
              f"{rows[0]['params'] / 1e9:.3f} B parameters ({platform.platform()})\n\n")
    (RESULTS / f"doctor_index-{machine}.md").write_text(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
