"""What this machine has free right now: VRAM of a device, host RAM, the pinned-memory limit.

Probed in one place: preflight, `plan`, `doctor` and the ranks of a multi-GPU run all ask here.
"""

from pathlib import Path

import torch


def host_ram() -> tuple[int | None, int | None]:
    """(total, available) bytes from /proc/meminfo (Linux), else (None, None)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, None


def free_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(free VRAM of `device`, available host RAM) in bytes, for choosing and checking a profile.
    VRAM is None on the CPU (there is none to plan for); RAM None where it cannot be read."""
    vram = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    total, available = host_ram()
    return vram, available or total


def pinned_memory_limit() -> int | None:
    """RLIMIT_MEMLOCK (`ulimit -l`) in bytes; None = unlimited or unknown. CUDA's pinned host
    allocations are not bound by it, but containers often cap locked memory in other ways."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft
