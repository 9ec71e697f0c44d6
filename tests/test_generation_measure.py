"""StageMeter (lowvram/generation/measure.py): per stage seconds, peak VRAM allocated and reserved,
peak host memory."""

import pytest
import torch

from lowvram.generation.measure import StageMeter


def test_cpu_stage_has_host_figures_and_no_vram():
    meter = StageMeter(torch.device("cpu"))
    with meter.stage("work"):
        torch.ones(1024, 1024).sum()
    result = meter.results["work"]
    assert result["seconds"] >= 0 and result["peak_vram_gb"] is None and result["peak_vram_reserved_gb"] is None


@pytest.mark.cuda
def test_cuda_stage_records_the_reserved_peak_which_the_cap_limits():
    """64 MiB + 96 MiB allocated one after the other, the first freed: the allocated peak is the
    larger tensor's, the reserved peak at least the allocated one (the allocator keeps the freed
    block cached), which is what set_per_process_memory_fraction counts."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    meter = StageMeter(device)
    with meter.stage("work"):
        a = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
        del a
        b = torch.empty(96 * 2**20, dtype=torch.uint8, device=device)
        del b
    result = meter.results["work"]
    assert result["peak_vram_gb"] * 2**30 >= 96 * 2**20
    assert result["peak_vram_reserved_gb"] >= result["peak_vram_gb"]
