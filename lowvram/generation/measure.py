"""What each stage of a run really used: wall time, peak VRAM and peak host memory.

    meter = StageMeter(device)
    with meter.stage("denoising"):
        ...
    meter.results  # {"denoising": {"seconds", "peak_vram_gb", "peak_vram_reserved_gb", "peak_ram_gb", ...}}

Peak VRAM is `torch.cuda.max_memory_allocated` since the stage began (what the planner predicts),
and `peak_vram_reserved_gb` is `torch.cuda.max_memory_reserved`: what the caching allocator held
from the driver, allocated bytes plus its fragmentation and cached free blocks. The reserved figure
is the one a card's size (and `lowvram bench --cap-gb`, i.e. set_per_process_memory_fraction)
limits: a stage whose allocated peak fits can still fail when reserved memory reaches the cap.
Peak host memory is sampled from /proc/self/status every 50 ms by a thread: RssAnon, the process's
own memory (pinned buffers included), and RssFile, mapped file pages (page cache the kernel can
drop); a peak shorter than the interval can be missed. Elsewhere than Linux the host figures are
None.
"""

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from lowvram.units import GIB
INTERVAL_S = 0.05


def host_rss() -> tuple[int, int] | None:
    """(RssAnon, RssFile) of this process in bytes, or None where /proc is not there."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


class StageMeter:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.results: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)  # both the allocated and the reserved peak
        peak = {"anon": 0, "file": 0}
        done = threading.Event()

        def sample():
            while True:
                rss = host_rss()
                if rss is not None:
                    peak["anon"], peak["file"] = max(peak["anon"], rss[0]), max(peak["file"], rss[1])
                if done.wait(INTERVAL_S):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            done.set()
            sampler.join()
            has_host = host_rss() is not None
            self.results[name] = {
                "seconds": round(seconds, 3),
                "peak_vram_gb": torch.cuda.max_memory_allocated(self.device) / GIB if cuda else None,
                "peak_vram_reserved_gb": torch.cuda.max_memory_reserved(self.device) / GIB if cuda else None,
                "peak_ram_gb": peak["anon"] / GIB if has_host else None,
                "peak_page_cache_gb": peak["file"] / GIB if has_host else None,
            }


def combine_stages(first: dict, second: dict) -> dict:
    """One stage's measurement from two parts run one after the other (1.5's text stage: the text
    encoders, then the image encoders): seconds added, each peak the larger."""
    combined = {"seconds": round(first["seconds"] + second["seconds"], 3)}
    for key in first.keys() - {"seconds"}:
        values = [v for v in (first[key], second.get(key)) if v is not None]
        combined[key] = max(values) if values else None
    return combined
