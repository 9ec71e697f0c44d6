"""Regional torch.compile: the DiT's blocks compiled, not the whole model.

Whole-model compilation does not fit block streaming: the blocks a step runs are ring shells whose
weights are copied in per block, and the trunk around them is cheap. Compiling every module the
streamer yields (resident blocks and shells) with `nn.Module.compile` gives one graph per block
kind: dynamo treats module parameters as graph inputs (inlined built-in nn modules, the default
since torch 2.5), so block 7, block 31 and the shell holding either reuse the double or single
block's compiled code; nothing recompiles per block or per step. Shapes are static
(dynamic=False): within a run every step has the same token count. Inductor's compiled kernels
are cached on disk (`<cache dir>/inductor`), so a second run with the same sizes starts without
compiling again. The runner reports the compile time apart (the first step's extra seconds).
"""

import os
from pathlib import Path

from .streaming import BlockStreamer


def compile_blocks(streamer: BlockStreamer, cache_dir: Path, backend: str = "inductor") -> int:
    """Compile every block module of `streamer` in place; returns how many."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir) / "inductor"))
    modules = streamer.block_modules()
    for module in modules:
        module.compile(backend=backend, dynamic=False)
    return len(modules)


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
