"""`lowvram doctor`: what this machine has, and what is missing for a real run.

Each check is a `Check(name, status, detail)` with status "ok", "warn" (works, but slower or with
less headroom) or "fail" (a real-size run cannot work until fixed). Nothing here prints; the CLI
draws the list as a table or JSON.
"""

import importlib.metadata
import importlib.util
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowvram.memory import host_ram, pinned_memory_limit
from lowvram.units import GIB

from .download import download_commands
from .model_folder import check_model_folder

FP8_MIN_CAPABILITY = (8, 9)  # Ada (RTX 4090, L4, L40) and Hopper have FP8 tensor cores
MIN_VRAM_GIB = 15  # the smallest profile's target (16 GB cards report about 15.6 GiB)


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def _package(name: str, module: str | None = None) -> str | None:
    """Installed version of a distribution whose module imports, else None."""
    if importlib.util.find_spec(module or name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def gpu_checks() -> list[Check]:
    checks = [Check("torch", "ok", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")]
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no NVIDIA GPU or driver visible"
        checks.append(Check("CUDA", "fail", f"not available ({why}); real-size runs need one (the demo runs on the CPU)"))
        return checks
    props = torch.cuda.get_device_properties(0)
    capability = (props.major, props.minor)
    vram = props.total_memory / GIB
    checks.append(Check("CUDA", "ok", f"{torch.version.cuda}, {torch.cuda.device_count()} device(s)"))
    checks.append(Check("GPU", "ok", props.name))
    checks.append(Check("VRAM", "ok" if vram >= MIN_VRAM_GIB else "warn",
                        f"{vram:.1f} GiB" + ("" if vram >= MIN_VRAM_GIB else " (profiles target at least 16 GB)")))
    checks.append(Check("compute capability", "ok", f"{props.major}.{props.minor}"))
    fp8 = capability >= FP8_MIN_CAPABILITY
    checks.append(Check("FP8 tensor cores", "ok" if fp8 else "warn",
                        "yes (cc >= 8.9): FP8 matmuls" if fp8 else "no (cc < 8.9): FP8 weights are upcast per layer, slower; INT8 is an option"))
    return checks


def package_checks() -> list[Check]:
    checks = []
    for label, dist, module, needed, optional in (
        ("bitsandbytes", "bitsandbytes", "bitsandbytes", "NF4 text encoder (profiles for 16 GB cards)", False),
        ("optimum-quanto", "optimum-quanto", "optimum.quanto", "INT8 DiT profiles", False),
        ("flash-attn", "flash-attn", "flash_attn", "--attention flash (optional; sdpa is the default)", True),
        ("yunchang", "yunchang", "yunchang", "--gpus N, several GPUs per clip (optional extra [multigpu])", True),
    ):
        version = _package(dist, module)
        status = "ok" if version or optional else "warn"
        checks.append(Check(label, status, f"{version}" if version else f"not installed: needed for {needed}"))
    return checks


def ram_check(total: int, available: int | None) -> Check:
    """Which shipped profiles' host-RAM plan (lowvram/planner.py) fits this machine at 720p x 129."""
    from lowvram.planner import plan
    from lowvram.profiles import shipped_profiles

    ram = available or total
    needs = {p.name: plan(p, 1280, 720, 129).peak_ram_bytes for p in shipped_profiles()}
    fitting = [name for name, need in needs.items() if need <= ram]
    detail = f"{total / GIB:.1f} GiB total, {ram / GIB:.1f} GiB available"
    if not fitting:
        smallest = min(needs, key=needs.get)
        return Check("host RAM", "fail", f"{detail}: no profile fits at 720p x 129 ({smallest} needs "
                     f"{needs[smallest] / GIB:.1f} GiB); close other programs, or try 540p / fewer frames")
    left_out = [f"{name} needs {need / GIB:.1f}" for name, need in needs.items() if name not in fitting]
    return Check("host RAM", "ok" if len(left_out) <= 1 else "warn",
                 f"{detail}: enough for {', '.join(fitting)} at 720p x 129" + (f" ({'; '.join(left_out)})" if left_out else ""))


def host_checks(paths: list[Path]) -> list[Check]:
    checks = []
    total, available = host_ram()
    if total is not None:
        checks.append(ram_check(total, available))
    limit = pinned_memory_limit()
    if limit is None:
        checks.append(Check("pinned memory limit (ulimit -l)", "ok", "unlimited"))
    else:
        shown = f"{limit / GIB:.1f} GiB" if limit >= GIB else f"{limit / 2**20:.0f} MiB"
        checks.append(Check("pinned memory limit (ulimit -l)", "ok" if limit >= 8 * GIB else "warn",
                            shown + ("" if limit >= 8 * GIB else "; if pinning streamed weights fails they stay in pageable "
                                     "memory (slower copies): `ulimit -l unlimited` lifts the limit")))
    seen = set()
    for path in paths:
        existing = Path(path)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        usage = shutil.disk_usage(existing)
        key = os.stat(existing).st_dev
        if key in seen:
            continue
        seen.add(key)
        free = usage.free / GIB
        checks.append(Check(f"disk space ({path})", "ok" if free >= 5 else "warn", f"{free:.1f} GiB free"))
    return checks


def weight_checks(model_dir: Path) -> tuple[list[Check], list[dict]]:
    """One summary check plus per-file rows {file, size, status}."""
    layout, files = check_model_folder(model_dir)
    if layout is None:
        return [Check("weights", "fail", f"none found in {model_dir}; `lowvram download --model-dir {model_dir}`")], []
    rows = [{"file": str(c.path.relative_to(model_dir)) if c.path.is_relative_to(model_dir) else str(c.path),
             "size": c.size, "status": "ok" if c.ok else c.problem} for c in files]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:  # a file's problem is the loader's message or names what the file is and what belongs there (download.py)
        download = any(r["status"] in ("missing", "empty") for r in bad)
        summary = Check("weights", "fail", f"{layout} layout in {model_dir}: {len(bad)} of {len(rows)} files with a problem "
                        f"(first: {bad[0]['file']}: {bad[0]['status']})"
                        + ("; " + " and ".join(f"`{c}`" for c in download_commands(model_dir, layout)) if download else ""))
    else:
        total = sum(r["size"] for r in rows) / 1e9
        summary = Check("weights", "ok", f"{layout} layout in {model_dir}: {len(rows)} files, {total:.1f} GB, all complete")
    return [summary], rows


def run_doctor(model_dir: Path, runs_dir: Path) -> dict:
    """Everything `lowvram doctor` shows: {"checks": [...], "files": [...], "ok": bool}."""
    weights, rows = weight_checks(Path(model_dir))
    checks = [Check("python", "ok", platform.python_version()), *gpu_checks(), *package_checks(),
              *host_checks([Path(model_dir), Path(runs_dir)]), *weights]
    return {"checks": [c.to_dict() for c in checks], "files": rows, "ok": all(c.status != "fail" for c in checks)}
