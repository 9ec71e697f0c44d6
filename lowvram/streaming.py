"""`BlockStreamer`: runs the DiT with only some blocks resident on the GPU, and the DiT's placement
for a run's memory plan.

    streamer = place_dit(model, plan, "cuda")   # trunk + resident blocks on the GPU, the rest streamed
    for step in range(steps):
        v = model(x, t, ..., blocks=streamer.blocks_for_step(prefetch_next_step=step + 1 < steps))
    print(streamer.schedule); stats = streamer.step_stats()
    release_dit(model, streamer)                 # ring, resident blocks and trunk freed

Every profile goes through here: with all blocks resident (profile "plain", or a 24 GB card at
540p) the streamer yields the model's own blocks and copies nothing.

Design:
- Resident blocks are moved to the GPU once. Streamed blocks keep their master copy in host
  memory, pinned where allowed (whole blocks up to a RAM cap; unpinned when pinning fails or the
  cap is reached): each block's tensors packed into one buffer of exactly their size and
  page-locked with cudaHostRegister, unlocked when the streamer closes (`pin_blocks_` says why not
  `Tensor.pin_memory()`). The host copy is the master: nothing is ever copied back to the host.
- The GPU side of a streamed block is a *shell*: a structural copy of the block whose tensors are
  preallocated GPU buffers, one shell per ring slot per kind (double / single blocks have
  different shapes). Loading block i into a slot is `copy_` of every tensor leaf of the master into
  the shell's leaf; the shell module is what the DiT runs. Copying into fixed shells (rather than
  swapping `param.data` pointers on the model's own modules) never mutates the model, allocates
  nothing in the loop, keeps buffer addresses stable, and works unchanged for any module whose state
  is tensors: bf16 Linear, FP8 (float8 weight + float32 scale buffers) and quanto's INT8 tensor
  subclasses, whose inner tensors (`__tensor_flatten__`) are the leaves that get copied.
- Copies run on a side CUDA stream, `depth` streamed blocks ahead of use, in the cyclic streamed
  order: after step s's last streamed block, the first blocks of step s+1 are already copying while
  step s's tail (resident blocks, final layer) computes. Ordering uses CUDA events only: a slot's
  `ready` event (copy done; the compute stream waits on it before the block runs) and its `free`
  event (compute done with the slot's previous block; the copy stream waits on it before
  overwriting). No torch.cuda.synchronize() in the loop.
- On the CPU (device="cpu") the same logic runs with synchronous copies into CPU shells and no
  streams, which is what the bit-exactness tests exercise.

Real classifier-free guidance (HunyuanVideo-1.5's base checkpoints) runs two DiT forwards per step,
one after the other: each is one `blocks_for_step` call, so the streamed blocks are copied once per
forward (`forward_blocks` gives the denoising loop its per-forward iterator, prefetching across
forwards). The "step" of the counters and the trace is a forward.

Counters per step: blocks and bytes copied, copy time (CUDA events on the copy stream) and the time
the compute stream waited for copies (events around the wait). Timings are read lazily by
`step_stats()`, which waits for those events only.
"""

import copy
import gc
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .planner import Plan
from .schedule import BlockSchedule, pinned_blocks
from .units import GIB

BLOCK_LISTS = ("double_blocks", "single_blocks")


# ---------------------------------------------------------------------------------------------
# Tensor leaves: the plain tensors that hold a module's state (inner tensors of subclasses)


def _is_wrapper(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def _leaves_of(t: torch.Tensor) -> list[torch.Tensor]:
    if _is_wrapper(t):
        names, _ = t.__tensor_flatten__()
        return [leaf for name in names for leaf in _leaves_of(getattr(t, name))]
    return [t]


def _module_tensors(module: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """(owner, name, is_parameter, tensor) for every parameter and buffer, shared ones once."""
    seen, out = set(), []
    for owner in module.modules():
        for is_param, table in ((True, owner._parameters), (False, owner._buffers)):
            for name, t in table.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append((owner, name, is_param, t))
    return out


def tensor_leaves(module: nn.Module) -> list[torch.Tensor]:
    """The plain tensors holding `module`'s parameters and buffers, in a fixed order."""
    return [leaf for *_, t in _module_tensors(module) for leaf in _leaves_of(t)]


def leaf_bytes(module: nn.Module) -> int:
    return sum(leaf.numel() * leaf.element_size() for leaf in tensor_leaves(module))


def leaf_signature(module: nn.Module) -> tuple:
    """Type, shape and dtype of every leaf: blocks with equal signatures can share ring slots."""
    return (type(module).__name__,) + tuple((tuple(t.shape), t.dtype) for t in tensor_leaves(module))


def _map_leaves_(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every leaf by fn(leaf), in place (tensor objects keep their identity)."""

    def remap(t):
        if _is_wrapper(t):
            names, _ = t.__tensor_flatten__()
            for name in names:
                inner = getattr(t, name)
                if _is_wrapper(inner):
                    remap(inner)
                else:
                    setattr(t, name, fn(inner))
        else:
            t.data = fn(t.data)

    for *_, t in _module_tensors(module):
        remap(t)


def _empty_like_tree(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if _is_wrapper(t):
        names, ctx = t.__tensor_flatten__()
        inner = {name: _empty_like_tree(getattr(t, name), device) for name in names}
        return type(t).__tensor_unflatten__(inner, ctx, t.size(), t.stride())
    return torch.empty_like(t, device=device)


def empty_module_like(module: nn.Module, device) -> nn.Module:
    """A structural copy of `module` whose parameters/buffers are new, uninitialised tensors on
    `device` (same shapes, dtypes and tensor subclasses). deepcopy with the tensors pre-seeded in
    the memo: the module tree is copied, the tensors are not."""
    device = torch.device(device)
    memo = {}
    for _, _, is_param, t in _module_tensors(module):
        new = _empty_like_tree(t.detach() if not _is_wrapper(t) else t, device)
        memo[id(t)] = nn.Parameter(new, requires_grad=False) if is_param else new
    return copy.deepcopy(module, memo)


# ---------------------------------------------------------------------------------------------
# Pinned host memory


SLAB_ALIGN = 64  # byte offset of each leaf in its slab: a multiple of every dtype's size
PAGE = 4096  # a slab starts on a page boundary


@dataclass
class PinReport:
    pinned_bytes: int = 0
    unpinned_bytes: int = 0
    reason: str | None = None  # why some (or all) bytes are not pinned


def cuda_host_register(slab: torch.Tensor) -> None:
    """Page-lock `slab`'s bytes in place (cudaHostRegister); raises RuntimeError when CUDA refuses."""
    cudart = torch.cuda.cudart()
    code = cudart.cudaHostRegister(slab.data_ptr(), slab.nbytes, 0)
    if code != cudart.cudaError.success:
        raise RuntimeError(f"cudaHostRegister: {cudart.cudaGetErrorString(code)}")


def cuda_host_unregister(slab: torch.Tensor) -> None:
    """Unlock what `cuda_host_register` locked; the bytes stay, as ordinary memory."""
    torch.cuda.cudart().cudaHostUnregister(slab.data_ptr())


def slab_layout(leaf_sizes: Sequence[int]) -> tuple[list[int], int]:
    """(byte offset of each leaf, slab bytes) for leaves of these sizes packed in order, each offset
    a multiple of SLAB_ALIGN: the slab exceeds the leaves' bytes by less than SLAB_ALIGN per leaf."""
    offsets, size = [], 0
    for nbytes in leaf_sizes:
        size = -(-size // SLAB_ALIGN) * SLAB_ALIGN
        offsets.append(size)
        size += nbytes
    return offsets, size


def pack_leaves_(module: nn.Module) -> torch.Tensor:
    """Move `module`'s leaves into one new host buffer of exactly their bytes (each leaf's offset
    rounded up to SLAB_ALIGN), in place: every leaf becomes a view of it. Returns the buffer."""
    leaves = tensor_leaves(module)
    offsets, size = slab_layout([leaf.numel() * leaf.element_size() for leaf in leaves])
    buffer = torch.empty(size + PAGE, dtype=torch.uint8)
    start = -buffer.data_ptr() % PAGE  # cudaHostRegister locks whole pages: start the slab on one
    slab = buffer[start:start + size]
    views = iter(zip(offsets, leaves))

    def into_slab(leaf: torch.Tensor) -> torch.Tensor:
        offset, expected = next(views)
        assert leaf is expected or leaf.data_ptr() == expected.data_ptr()  # _map_leaves_ walks tensor_leaves' order
        nbytes = leaf.numel() * leaf.element_size()
        view = slab[offset:offset + nbytes].view(leaf.dtype).view(leaf.shape)
        return view.copy_(leaf)

    _map_leaves_(module, into_slab)
    return slab


def pin_blocks_(modules: Sequence[nn.Module], cap_bytes: int | None,
                register: Callable[[torch.Tensor], None] = cuda_host_register) -> tuple[PinReport, list[torch.Tensor]]:
    """Page-lock the host copies of `modules` (streamed blocks, in streamed order), each whole block
    that fits under `cap_bytes` beside those before it (lowvram.schedule.pinned_blocks). Returns the
    report and the pinned slabs, for `unpin_slabs` when the DiT stage ends.

    Why not `Tensor.pin_memory()`: it allocates through PyTorch's caching host allocator
    (aten/src/ATen/core/CachingHostAllocator.h), whose `CachingHostAllocatorImpl::allocate` rounds
    every request up to a power of two (`c10::llvm::PowerOf2Ceil`: a 13B double block's 37.7 MB
    FP8 MLP weight takes 64 MiB) and whose `CachingHostAllocatorImpl::free` keeps a released block
    in its free list, for reuse, until `empty_cache`. Pinned RAM was 1.35x the plan for the 13B FP8
    blocks (double blocks 1.48x, single 1.19x) and stayed locked after the DiT stage. Here each
    block's leaves are packed into one ordinary buffer of their size (`pack_leaves_`), page-locked with cudaHostRegister: the pinned bytes are the
    blocks' bytes, and `unpin_slabs` unlocks them. A block whose registration fails stays in
    ordinary memory (its copies are slower, still correct)."""
    report, slabs = PinReport(), []
    sizes = [leaf_bytes(module) for module in modules]
    for module, nbytes, fits in zip(modules, sizes, pinned_blocks(sizes, cap_bytes)):
        if not fits:
            report.unpinned_bytes += nbytes
            report.reason = report.reason or f"pinned RAM cap of {cap_bytes / GIB:.1f} GiB reached"
            continue
        slab = pack_leaves_(module)
        try:
            register(slab)
        except RuntimeError as error:
            report.unpinned_bytes += nbytes
            report.reason = report.reason or f"pinning failed: {' '.join(str(error).split())}"
            continue
        report.pinned_bytes += slab.nbytes
        slabs.append(slab)
    return report, slabs


def unpin_slabs(slabs: list[torch.Tensor], unregister: Callable[[torch.Tensor], None] = cuda_host_unregister) -> None:
    """Unlock the slabs `pin_blocks_` locked (empties the list); the blocks keep their bytes."""
    while slabs:
        unregister(slabs.pop())


# ---------------------------------------------------------------------------------------------
# The streamer


@dataclass
class StepStats:
    step: int
    blocks_copied: int
    bytes_copied: int
    copy_ms: float  # time spent copying (copy-stream events on CUDA, wall time on CPU)
    wait_ms: float  # time the compute stream stalled waiting for copies (0 on CPU)


@dataclass
class _StepCounters:
    blocks: int = 0
    bytes: int = 0
    copy_events: list = field(default_factory=list)
    wait_events: list = field(default_factory=list)
    cpu_copy_s: float = 0.0


class _Slot:
    def __init__(self, shell: nn.Module, cuda: bool):
        self.shell = shell
        self.leaves = tensor_leaves(shell)
        self.ready = torch.cuda.Event() if cuda else None
        self.free = torch.cuda.Event() if cuda else None
        self.used = False


class BlockStreamer:
    def __init__(
        self, blocks: Sequence[nn.Module], schedule: BlockSchedule, device, *,
        pin_memory: bool = True, pinned_cap_bytes: int | None = None, keep_host_copy: bool = False,
        trace: bool = False,
    ):
        """`blocks`: the model's blocks in run order (e.g. `model.all_blocks()`), anywhere.
        Resident blocks are moved to `device` (with keep_host_copy: copied, leaving the modules as
        they are); streamed blocks are moved to host memory and pinned (CUDA only).
        trace: record ("step" | "copy" | "run", step, block, slot) events in `self.trace` (tests)."""
        if len(blocks) != len(schedule.kinds):
            raise ValueError(f"schedule has {len(schedule.kinds)} blocks, got {len(blocks)}")
        self.schedule = schedule
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.keep_host_copy = keep_host_copy
        self._blocks = list(blocks)
        self._run = list(blocks)  # the module yielded for each block index
        for i in schedule.resident:
            if keep_host_copy:
                self._run[i] = empty_module_like(blocks[i], self.device)
                for dst, src in zip(tensor_leaves(self._run[i]), tensor_leaves(blocks[i])):
                    dst.copy_(src)
            else:
                blocks[i].to(self.device)

        self._streamed = list(schedule.streamed)
        for i in self._streamed:
            if any(leaf.device.type != "cpu" for leaf in tensor_leaves(blocks[i])):
                blocks[i].to("cpu")
        streamed_modules = [blocks[i] for i in self._streamed]
        self._pinned_slabs: list[torch.Tensor] = []
        if self.cuda and pin_memory:
            self.pin_report, self._pinned_slabs = pin_blocks_(streamed_modules, pinned_cap_bytes)
        else:
            total = sum(leaf_bytes(m) for m in streamed_modules)
            self.pin_report = PinReport(0, total, None if not total else
                                        "pinning off" if not pin_memory else "not a CUDA device")

        # One ring per leaf signature (= per kind unless a kind mixes layouts, e.g. partly quantized).
        self._ring_key = {i: leaf_signature(blocks[i]) for i in self._streamed}
        self._master_leaves = {i: tensor_leaves(blocks[i]) for i in self._streamed}
        self._bytes = {i: sum(t.numel() * t.element_size() for t in self._master_leaves[i]) for i in self._streamed}
        depth = schedule.effective_depth
        self._rings: dict[tuple, list[_Slot]] = {}
        for key in dict.fromkeys(self._ring_key.values()):
            members = [i for i in self._streamed if self._ring_key[i] == key]
            slots = min(depth + 1, len(members))
            self._rings[key] = [_Slot(empty_module_like(blocks[members[0]], self.device), self.cuda) for _ in range(slots)]
        self._next_slot = {key: 0 for key in self._rings}
        self.ring_bytes = sum(leaf_bytes(slot.shell) for ring in self._rings.values() for slot in ring)

        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._issued: deque[tuple[int, _Slot]] = deque()  # (absolute streamed position, slot), in order
        self._next_issue = 0  # next absolute streamed position to copy
        self._step = 0
        self._counters: dict[int, _StepCounters] = {}
        self._closed = False
        self.trace: list[tuple[str, int, int, int]] | None = [] if trace else None

    # -- copies ---------------------------------------------------------------------------------

    def _issue(self, position: int) -> None:
        n = len(self._streamed)
        block = self._streamed[position % n]
        key = self._ring_key[block]
        ring = self._rings[key]
        slot = ring[self._next_slot[key] % len(ring)]
        self._next_slot[key] += 1
        counters = self._counters.setdefault(position // n, _StepCounters())
        pairs = list(zip(slot.leaves, self._master_leaves[block]))
        if self.cuda:
            with torch.cuda.stream(self._copy_stream):
                if slot.used:
                    self._copy_stream.wait_event(slot.free)  # compute is done with the slot's last block
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self._copy_stream)
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                end.record(self._copy_stream)
                slot.ready.record(self._copy_stream)
            counters.copy_events.append((start, end))
        else:
            began = time.perf_counter()
            for dst, src in pairs:
                dst.copy_(src)
            counters.cpu_copy_s += time.perf_counter() - began
        slot.used = True
        if self.trace is not None:
            self.trace.append(("copy", position // n, block, id(slot)))
        counters.blocks += 1
        counters.bytes += self._bytes[block]
        self._issued.append((position, slot))
        self._next_issue = position + 1

    def _top_up(self, next_position: int, limit: int) -> None:
        """Issue copies up to `depth` positions after `next_position`, never at or past `limit`."""
        last = min(next_position + self.schedule.effective_depth, limit - 1)
        while self._next_issue <= last:
            self._issue(self._next_issue)

    def _reset(self) -> None:
        """After an interrupted step: finish pending copies and start the next step afresh."""
        if self.cuda:
            self._copy_stream.synchronize()
        self._issued.clear()
        self._next_issue = self._step * len(self._streamed)

    # -- the block iterator ---------------------------------------------------------------------

    def blocks_for_step(self, prefetch_next_step: bool = True) -> Iterator[nn.Module]:
        """Yield the blocks of one DiT forward in order, streamed ones just in time.

        prefetch_next_step: after this step's last streamed block, start copying the next step's
        first ones (pass False on the last step so no copy is wasted).
        """
        if self._closed:
            raise RuntimeError("this BlockStreamer is closed")
        step = self._step
        self._step += 1
        return self._iterate(step, prefetch_next_step)

    def _iterate(self, step: int, prefetch_next_step: bool) -> Iterator[nn.Module]:
        n = len(self._streamed)
        base = step * n
        limit = base + n + (self.schedule.effective_depth + 1 if prefetch_next_step else 0)
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        counters = self._counters.setdefault(step, _StepCounters())
        streamed = set(self._streamed)
        if self.trace is not None:
            self.trace.append(("step", step, -1, -1))
        done = 0  # streamed blocks of this step computed so far
        finished = False
        try:
            for index in range(len(self._blocks)):
                if index not in streamed:
                    if n:
                        self._top_up(base + done, limit)
                    if self.trace is not None:
                        self.trace.append(("run", step, index, -1))
                    yield self._run[index]
                    continue
                position = base + done
                self._top_up(position, limit)
                issued_position, slot = self._issued.popleft()
                assert issued_position == position, (issued_position, position)
                if self.cuda:
                    before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    before.record(compute)
                    compute.wait_event(slot.ready)
                    after.record(compute)
                    counters.wait_events.append((before, after))
                if self.trace is not None:
                    self.trace.append(("run", step, index, id(slot)))
                yield slot.shell
                if self.cuda:
                    slot.free.record(compute)  # kernels of this block are enqueued before this point
                done += 1
            if n:
                self._top_up(base + n, limit)  # next step's first blocks overlap this step's tail
            finished = True
        finally:
            if not finished:
                self._reset()

    # -- reporting and teardown -----------------------------------------------------------------

    def resident_block(self, index: int) -> nn.Module:
        """Block `index` where it runs, for a caller that runs it alone (DeepCache's cached steps,
        hyvideo/v15_step_cache.py, whose plan keeps that block resident)."""
        if index in self._streamed:
            raise ValueError(f"block {index} is streamed, not resident")
        return self._run[index]

    def step_stats(self) -> list[StepStats]:
        """Per-step counters for the steps run so far (waits for their timing events)."""
        out = []
        for step in sorted(self._counters):
            if step >= self._step:
                continue  # prefetches for a step that has not run yet
            c = self._counters[step]
            if self.cuda:
                for _, end in c.copy_events + c.wait_events:
                    end.synchronize()
                copy_ms = sum(a.elapsed_time(b) for a, b in c.copy_events)
                wait_ms = sum(a.elapsed_time(b) for a, b in c.wait_events)
            else:
                copy_ms, wait_ms = c.cpu_copy_s * 1000, 0.0
            out.append(StepStats(step, c.blocks, c.bytes, copy_ms, wait_ms))
        return out

    def block_modules(self) -> list[nn.Module]:
        """Every module this streamer yields as a block: the resident blocks and the ring shells."""
        return [self._run[i] for i in self.schedule.resident] + [slot.shell for ring in self._rings.values() for slot in ring]

    @property
    def forwards(self) -> int:
        """Forwards started so far: the index `step_stats()` gives the next one."""
        return self._step

    @property
    def gpu_bytes(self) -> int:
        """Block weights this streamer keeps on the device: resident blocks and the ring."""
        return sum(leaf_bytes(self._run[i]) for i in self.schedule.resident) + self.ring_bytes

    def close(self, keep_on_host: bool = True) -> None:
        """Free the ring and the resident blocks' device memory, and unlock the streamed blocks'
        pinned host memory (they keep their bytes, unpinned). Resident blocks go back to host
        memory (keep_on_host) or are dropped to the meta device; with keep_host_copy the device
        copies are simply released. The model is then all on the host (or partly on meta)."""
        if self._closed:
            return
        if self.cuda:
            self._copy_stream.synchronize()  # no copy reads the pinned slabs any more
        unpin_slabs(self._pinned_slabs)
        self._issued.clear()
        self._rings.clear()
        for i in self.schedule.resident:
            if self.keep_host_copy:
                self._run[i] = self._blocks[i]
            else:
                self._blocks[i].to("cpu" if keep_on_host else "meta")
        self._closed = True
        if self.cuda:
            torch.cuda.empty_cache()

    def __enter__(self) -> "BlockStreamer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def forward_blocks(streamer: BlockStreamer, steps: int, forwards_per_step: int) -> Callable[[int], Iterator[nn.Module]]:
    """`blocks_for_forward(i)` for a loop of `steps` steps with `forwards_per_step` DiT forwards
    each (real CFG: 2), called once per forward: every forward streams the streamed blocks once,
    and every forward but the run's last prefetches the next forward's first blocks."""
    calls: dict[int, int] = {}

    def blocks_for_forward(step: int) -> Iterator[nn.Module]:
        calls[step] = calls.get(step, 0) + 1
        last = step == steps - 1 and calls[step] == forwards_per_step
        return streamer.blocks_for_step(prefetch_next_step=not last)

    return blocks_for_forward


# ---------------------------------------------------------------------------------------------
# Placement of the DiT for a run's plan


def empty_cache(device) -> None:
    """Collect unreachable models (transformers' hold reference cycles), then return cached,
    unused device memory to the driver (CUDA only)."""
    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def dit_trunk(model: nn.Module) -> list[nn.Module]:
    """The DiT's modules outside the block lists (embedders, token refiner, final layer)."""
    return [child for name, child in model.named_children() if name not in BLOCK_LISTS]


def place_dit(model: nn.Module, plan: Plan, device, *, keep_host_copy: bool = False) -> BlockStreamer:
    """Put the DiT in place for `plan`: trunk on the device, blocks resident or streamed per the
    plan's schedule (its runtime options, the token chunk among them, are set before by
    `lowvram.stages.configure_dit`). Returns the streamer whose `blocks_for_step()` the denoising
    loop passes as `blocks=`."""
    for module in dit_trunk(model):
        module.to(device)
    profile = plan.profile
    return BlockStreamer(model.all_blocks(), plan.schedule, device, pin_memory=profile.pin_memory,
                         pinned_cap_bytes=profile.pinned_ram_cap_bytes, keep_host_copy=keep_host_copy)


def release_dit(model: nn.Module, streamer: BlockStreamer, keep_on_host: bool = True) -> None:
    """Free the DiT's device memory: the streamer's ring and resident blocks, and the trunk
    (back to the host with keep_on_host, else dropped to the meta device)."""
    device = streamer.device
    streamer.close(keep_on_host=keep_on_host)
    for module in dit_trunk(model):
        module.to("cpu" if keep_on_host else "meta")
    empty_cache(device)
