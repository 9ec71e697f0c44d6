"""Stage placement: each stage's weights are on the GPU only while that stage works.

The pipeline runs three stages in turn, and between them frees what the next one does not need:

    places = StagePlacement("cuda")
    with places.stage("text", llm.model, clip.model, release="meta"):   # encoders dropped after
        embeddings = encode_prompts(llm, clip, prompt, frames)             # embeddings are kept
    streamer = prepare_dit(dit, plan, "cuda")                              # trunk + resident blocks
    with places.stage("dit", release=None):
        ... denoise with dit(..., blocks=streamer.blocks_for_step()) ...
    release_dit(dit, streamer, keep_on_host=False)
    with places.stage("vae", vae.decoder, vae.post_quant_conv):
        video = TiledVAE(vae, ...).decode(latents)
    places.records  # per stage: seconds and peak device memory

`torch.cuda.empty_cache()` runs after every stage so the next one starts from an empty cache. On
the CPU every step still runs (the moves are no-ops, the cache calls are skipped), so the code path
is the same everywhere.
"""

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from .planner import Plan
from .streaming import BlockStreamer

BLOCK_LISTS = ("double_blocks", "single_blocks")


def empty_cache(device) -> None:
    """Return cached, unused device memory to the driver (CUDA only)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def move(modules: Sequence[nn.Module], device) -> None:
    for module in modules:
        module.to(device)


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_bytes: int | None  # torch.cuda.max_memory_allocated during the stage; None off CUDA


class StagePlacement:
    """Runs stages with their modules on `device`, records each stage's time and peak memory."""

    def __init__(self, device, offload_device="cpu"):
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.records: list[StageRecord] = []

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    @contextmanager
    def stage(self, name: str, *modules: nn.Module, release: str | None = "offload") -> Iterator[None]:
        """Move `modules` to the device for the body; afterwards `release` them:
        "offload" back to the offload device (kept for reuse), "meta" dropped (weights freed),
        None left where they are. Then empty the CUDA cache."""
        if release not in ("offload", "meta", None):
            raise ValueError(f"release must be 'offload', 'meta' or None, got {release!r}")
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        began = time.perf_counter()
        move(modules, self.device)
        try:
            yield
        finally:
            if release is not None:
                move(modules, self.offload_device if release == "offload" else "meta")
            peak = torch.cuda.max_memory_allocated(self.device) if self._cuda else None
            self.records.append(StageRecord(name, time.perf_counter() - began, peak))
            empty_cache(self.device)


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
