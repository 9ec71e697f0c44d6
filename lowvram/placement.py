"""Placement of the DiT for a run's memory plan, and freeing device memory between stages.

The runner loads each stage's models only while that stage works (text encoders -> embeddings
kept, encoders freed -> DiT -> freed -> VAE) and calls `empty_cache` between stages. For the DiT:

    streamer = prepare_dit(dit, plan, "cuda")       # token chunk, trunk + resident blocks on the GPU
    ... denoise with dit(..., blocks=streamer.blocks_for_step()) ...
    release_dit(dit, streamer, keep_on_host=False)  # ring, resident blocks and trunk freed

On the CPU the same calls run (moves are no-ops, the cache call is skipped).
"""

import gc
from collections.abc import Sequence

import torch
import torch.nn as nn

from .planner import Plan
from .streaming import BlockStreamer

BLOCK_LISTS = ("double_blocks", "single_blocks")


def empty_cache(device) -> None:
    """Collect unreachable models (transformers' hold reference cycles), then return cached,
    unused device memory to the driver (CUDA only)."""
    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def move(modules: Sequence[nn.Module], device) -> None:
    for module in modules:
        module.to(device)


def dit_trunk(model: nn.Module) -> list[nn.Module]:
    """The DiT's modules outside the block lists (embedders, token refiner, final layer)."""
    return [child for name, child in model.named_children() if name not in BLOCK_LISTS]


def prepare_dit(model: nn.Module, plan: Plan, device, *, keep_host_copy: bool = False) -> BlockStreamer:
    """Put the DiT in place for `plan`: token chunk set, trunk on the device, blocks resident or
    streamed per the plan's schedule. Returns the streamer whose `blocks_for_step()` the denoising
    loop passes as `blocks=`."""
    model.token_chunk = plan.token_chunk
    move(dit_trunk(model), device)
    profile = plan.profile
    return BlockStreamer(model.all_blocks(), plan.schedule, device, pin_memory=profile.pin_memory,
                         pinned_cap_bytes=profile.pinned_ram_cap_bytes, keep_host_copy=keep_host_copy)


def release_dit(model: nn.Module, streamer: BlockStreamer, keep_on_host: bool = True) -> None:
    """Free the DiT's device memory: the streamer's ring and resident blocks, and the trunk
    (back to the host with keep_on_host, else dropped to the meta device)."""
    device = streamer.device
    streamer.close(keep_on_host=keep_on_host)
    move(dit_trunk(model), "cpu" if keep_on_host else "meta")
    empty_cache(device)
