"""Regional compilation (lowvram/compile.py): the streamer's block modules compiled once per block
kind, no recompiles across blocks, ring shells or steps, and the result of the eager model within
float32 tolerance."""

import copy
import shutil

import pytest
import torch

from lowvram.compile import compile_blocks, dynamo_graphs
from lowvram.streaming import BlockStreamer
from tests.helpers import run_steps, schedule_for, streaming_dit, streaming_inputs


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # compile_blocks sets it to the test's folder
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_streamed_steps(backend: str, tmp_path, steps: int = 3):
    """3 double + 5 single blocks, 2 resident and 6 streamed through two rings (one per kind):
    eager outputs, compiled outputs, dynamo's graph count after each step, modules compiled."""
    model, inputs = streaming_dit().requires_grad_(False), streaming_inputs()  # as loaded for inference
    eager = run_steps(model, BlockStreamer(model.all_blocks(), schedule_for(model, resident=8), "cpu"), inputs, steps)
    streamed = copy.deepcopy(model)
    streamer = BlockStreamer(streamed.all_blocks(), schedule_for(streamed, resident=2, prefetch_depth=1), "cpu")
    before = dynamo_graphs()  # a process-wide counter: other tests may have compiled already
    compiled = compile_blocks(streamer, tmp_path, backend=backend)
    outs, graphs = [], []
    with torch.no_grad():
        for step in range(steps):
            outs.append(streamed(*inputs, blocks=streamer.blocks_for_step(prefetch_next_step=step + 1 < steps)))
            graphs.append(dynamo_graphs() - before)
    return eager, outs, graphs, compiled


@pytest.mark.slow
def test_no_recompiles_across_blocks_shells_and_steps(tmp_path):
    """aot_eager traces with dynamo exactly as inductor does, without generating code (fast)."""
    eager, outs, graphs, compiled = compiled_streamed_steps("aot_eager", tmp_path)
    assert compiled == 2 + 2 + 2  # 2 resident blocks + a double and a single ring of 2 shells each
    assert graphs == [2, 2, 2]  # one graph per block kind, on the first step; nothing recompiles after
    for a, b in zip(outs, eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # float32, decomposed ops may reorder sums


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on the CPU needs a C++ compiler")
@pytest.mark.slow
def test_inductor_matches_eager_within_float32_tolerance(tmp_path):
    """The real backend, generated C++ on the CPU (about a minute of compiling on 2 cores). Fused
    kernels change the order of float32 sums: 1e-4 relative is many times their rounding."""
    eager, outs, graphs, _ = compiled_streamed_steps("inductor", tmp_path, steps=2)
    assert graphs[1] == graphs[0]
    for a, b in zip(outs, eager):
        assert float((a - b).norm() / b.norm()) < 1e-4
    assert any((tmp_path / "inductor").iterdir())  # kernels cached for the next run
