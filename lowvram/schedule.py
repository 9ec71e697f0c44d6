"""Which DiT blocks stay on the GPU and which are streamed: a pure, printable plan.

A `BlockSchedule` splits the blocks (20 double then 40 single for the 13B model) into *resident*
blocks, kept on the GPU for the whole run, and *streamed* blocks, whose master copy lives in host
memory and is copied into a small ring of reused GPU buffers `prefetch_depth` streamed blocks ahead
of use. Resident blocks are spread evenly over the run order so that the copies of the streamed
blocks overlap the compute of the resident ones in between.

Ring size: each *kind* of block (double / single: different tensor shapes) gets its own ring with
`min(depth + 1, streamed blocks of that kind)` slots, where depth is the effective prefetch depth
`min(prefetch_depth, streamed - 1)`: at any time the block being computed and the `depth` blocks
after it in the (cyclic, across steps) streamed order are distinct blocks, and each needs a slot.

Real classifier-free guidance (HunyuanVideo-1.5's base checkpoints) runs `forwards_per_step` = 2
DiT forwards per step, one after the other: the ring and the resident blocks are the same, but
every streamed block is copied once per forward, so twice per step.
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .units import GIB


def spread_evenly(n: int, k: int) -> list[int]:
    """k distinct indices out of range(n), evenly spaced (the centre of each of k equal parts)."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} blocks")
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def _ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, start = [], None
    for pos, i in enumerate(indices):
        if start is None:
            start = i
        if pos + 1 == len(indices) or indices[pos + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts) or "none"


def pinned_blocks(block_bytes: Sequence[int], cap_bytes: int | None) -> list[bool]:
    """Which of these streamed blocks (in streamed order) are page-locked under `cap_bytes`: each
    whole block that still fits beside those before it. The streamer pins by this rule
    (lowvram/streaming.py, with the blocks' real bytes) and the planner counts by it."""
    pinned, total = [], 0
    for nbytes in block_bytes:
        fits = cap_bytes is None or total + nbytes <= cap_bytes
        total += nbytes if fits else 0
        pinned.append(fits)
    return pinned


@dataclass(frozen=True)
class BlockSchedule:
    kinds: tuple[str, ...]  # kind of each block, in run order
    block_bytes: tuple[int, ...]  # bytes of each block's tensors
    resident: tuple[int, ...]  # indices of blocks kept on the GPU, ascending
    prefetch_depth: int  # requested: copies run this many streamed blocks ahead
    forwards_per_step: int = 1  # DiT forwards per denoising step (2 under real CFG)

    def __post_init__(self):
        if len(self.kinds) != len(self.block_bytes):
            raise ValueError("kinds and block_bytes must have one entry per block")
        if self.prefetch_depth < 1:
            raise ValueError("prefetch_depth must be at least 1")
        if sorted(set(self.resident)) != list(self.resident) or any(not 0 <= i < len(self.kinds) for i in self.resident):
            raise ValueError(f"resident must be ascending distinct block indices, got {self.resident}")

    @property
    def streamed(self) -> tuple[int, ...]:
        resident = set(self.resident)
        return tuple(i for i in range(len(self.kinds)) if i not in resident)

    @property
    def effective_depth(self) -> int:
        """Streamed blocks copied ahead of the one being computed (never the same block twice)."""
        return max(0, min(self.prefetch_depth, len(self.streamed) - 1))

    @property
    def ring_slots(self) -> dict[str, int]:
        counts = Counter(self.kinds[i] for i in self.streamed)
        return {kind: min(self.effective_depth + 1, n) for kind, n in sorted(counts.items())}

    def kind_bytes(self, kind: str) -> int:
        """Bytes of one ring slot of `kind` (the largest streamed block of that kind)."""
        return max((self.block_bytes[i] for i in self.streamed if self.kinds[i] == kind), default=0)

    @property
    def resident_bytes(self) -> int:
        return sum(self.block_bytes[i] for i in self.resident)

    @property
    def streamed_bytes_per_step(self) -> int:
        """Bytes copied per denoising step: every streamed block once per forward."""
        return self.forwards_per_step * sum(self.block_bytes[i] for i in self.streamed)

    def pinned_bytes(self, cap_bytes: int | None) -> int:
        """Host bytes page-locked for the streamed blocks under `cap_bytes` (`pinned_blocks`)."""
        sizes = [self.block_bytes[i] for i in self.streamed]
        return sum(n for n, pinned in zip(sizes, pinned_blocks(sizes, cap_bytes)) if pinned)

    @property
    def ring_bytes(self) -> int:
        return sum(n * self.kind_bytes(kind) for kind, n in self.ring_slots.items())

    @property
    def gpu_bytes(self) -> int:
        """Block weights on the GPU at any time: resident blocks plus the ring."""
        return self.resident_bytes + self.ring_bytes

    def to_dict(self) -> dict:
        return {
            "blocks": len(self.kinds),
            "resident": list(self.resident),
            "streamed": list(self.streamed),
            "prefetch_depth": self.prefetch_depth,
            "effective_depth": self.effective_depth,
            "ring_slots": self.ring_slots,
            "resident_gb": self.resident_bytes / GIB,
            "ring_gb": self.ring_bytes / GIB,
            "streamed_gb_per_step": self.streamed_bytes_per_step / GIB,
            **({"forwards_per_step": self.forwards_per_step} if self.forwards_per_step != 1 else {}),
        }

    def __str__(self) -> str:
        counts = Counter(self.kinds)
        kinds = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        ring = " + ".join(f"{n} x {kind} ({self.kind_bytes(kind) / GIB:.2f} GiB)" for kind, n in self.ring_slots.items())
        return "\n".join([
            f"{len(self.kinds)} blocks ({kinds}); prefetch depth {self.prefetch_depth} (effective {self.effective_depth})",
            f"resident {len(self.resident)} ({self.resident_bytes / GIB:.2f} GiB): {_ranges(self.resident)}",
            f"streamed {len(self.streamed)} ({self.streamed_bytes_per_step / GIB:.2f} GiB copied per step"
            + (f", {self.forwards_per_step} forwards" if self.forwards_per_step != 1 else "") + f"): {_ranges(self.streamed)}",
            f"ring: {ring or 'none'} = {self.ring_bytes / GIB:.2f} GiB; block weights on GPU {self.gpu_bytes / GIB:.2f} GiB",
        ])


def plan_schedule(
    kinds: Sequence[str], block_bytes: Sequence[int], *, prefetch_depth: int = 2,
    resident: int | None = None, budget_bytes: int | None = None, keep: Sequence[int] = (),
) -> BlockSchedule:
    """Pick the resident blocks.

    `resident`: exactly this many, spread evenly. Otherwise `budget_bytes`: the most resident blocks
    (spread evenly) whose bytes plus the ring's fit the budget; all blocks if it is None. When even
    zero resident blocks do not fit (the ring alone is too big), the all-streamed schedule is
    returned and the caller sees `gpu_bytes > budget`. `keep`: blocks resident in any case (the
    block DeepCache runs alone), in addition to the spread ones.
    """
    n = len(kinds)

    def schedule_of(k: int) -> BlockSchedule:
        chosen = tuple(sorted({*spread_evenly(n, k), *keep}))
        return BlockSchedule(tuple(kinds), tuple(block_bytes), chosen, prefetch_depth)

    if resident is not None:
        if not 0 <= resident <= n:
            raise ValueError(f"resident blocks must be between 0 and {n}, got {resident}")
        return schedule_of(resident)
    for k in range(n, -1, -1):
        schedule = schedule_of(k)
        if budget_bytes is None or schedule.gpu_bytes <= budget_bytes:
            return schedule
    return schedule
