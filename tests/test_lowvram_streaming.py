"""Block streaming: the schedule logic (pure), the streamer's copy order, and exactness: a streamed
DiT gives bit-for-bit the output of the resident one (same modules, same weights copied exactly).
CPU runs the same streamer logic with synchronous copies; the CUDA tests add streams and events."""

import copy
import math
import time

import pytest
import torch
import torch.nn as nn

from lowvram.schedule import BlockSchedule, plan_schedule, spread_evenly

from quant.fp8 import FP8Linear, swap_linears_fp8
from lowvram.streaming import (
    BlockStreamer, PinReport, empty_module_like, leaf_bytes, pin_blocks_, tensor_leaves, unpin_slabs,
)
from tests.helpers import run_steps, schedule_for, streaming_dit, streaming_inputs


# ---------------------------------------------------------------------------------------------
# Schedule logic (pure)


@pytest.mark.parametrize("n", [1, 4, 8, 60])
def test_spread_evenly_is_distinct_sorted_and_balanced(n):
    for k in range(n + 1):
        picked = spread_evenly(n, k)
        assert picked == sorted(set(picked)) and len(picked) == k
        assert all(0 <= i < n for i in picked)
        if k >= 2:  # gaps differ by at most one block: evenly spread
            gaps = [b - a for a, b in zip(picked, picked[1:])]
            assert max(gaps) - min(gaps) <= 1
    assert spread_evenly(60, 60) == list(range(60))
    assert spread_evenly(60, 3) == [10, 30, 50]


def test_budget_schedule_is_the_largest_that_fits():
    kinds = ["double"] * 20 + ["single"] * 40
    sizes = [340] * 20 + [142] * 40  # the 13B FP8 proportions (MB)
    total = sum(sizes)
    assert plan_schedule(kinds, sizes, budget_bytes=total).resident == tuple(range(60))  # all fit: no ring
    for budget in (0, 1000, 5000, 9000, total - 1):
        s = plan_schedule(kinds, sizes, budget_bytes=budget, prefetch_depth=2)
        k = len(s.resident)
        if k:
            assert s.gpu_bytes <= budget
        bigger = plan_schedule(kinds, sizes, resident=k + 1, prefetch_depth=2) if k < 60 else None
        assert bigger is None or bigger.gpu_bytes > budget  # one more resident block would not fit
    assert len(plan_schedule(kinds, sizes, budget_bytes=0).resident) == 0  # ring alone too big: all streamed


def test_ring_slots_and_bytes():
    kinds = ["double"] * 20 + ["single"] * 40
    sizes = [340] * 20 + [142] * 40
    s = plan_schedule(kinds, sizes, resident=0, prefetch_depth=2)
    assert s.effective_depth == 2 and s.ring_slots == {"double": 3, "single": 3}
    assert s.ring_bytes == 3 * 340 + 3 * 142 and s.streamed_bytes_per_step == sum(sizes)
    one_left = plan_schedule(kinds, sizes, resident=59, prefetch_depth=2)
    assert one_left.effective_depth == 0 and sum(one_left.ring_slots.values()) == 1  # never the same block twice
    text = str(s)
    assert "prefetch depth 2" in text and "streamed 60" in text and "ring: 3 x double" in text
    d = s.to_dict()
    assert d["streamed"] == list(range(60)) and d["ring_slots"] == {"double": 3, "single": 3}


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError):
        BlockSchedule(("double",), (1,), (0,), prefetch_depth=0)
    with pytest.raises(ValueError):
        plan_schedule(["double"] * 4, [1] * 4, resident=5)


# ---------------------------------------------------------------------------------------------
# Exactness: streamed == resident, bit for bit


@pytest.fixture(scope="module")
def model_and_reference():
    model = streaming_dit()
    inputs = streaming_inputs()
    with torch.no_grad():
        reference = model(*inputs)
    return model, inputs, reference


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("resident", [0, 1, 3, 8])  # 0: all streamed; 8: all resident
def test_streamed_equals_resident_bit_for_bit(model_and_reference, resident, depth):
    model, inputs, reference = model_and_reference
    streamer = BlockStreamer(model.all_blocks(), schedule_for(model, resident=resident, prefetch_depth=depth), "cpu")
    outs = run_steps(model, streamer, inputs, steps=3)  # crosses the step boundary twice
    for out in outs:
        assert torch.equal(out, reference)
    stats = streamer.step_stats()
    per_step = sum(leaf_bytes(model.all_blocks()[i]) for i in streamer.schedule.streamed)
    assert [s.bytes_copied for s in stats] == [per_step] * 3
    assert [s.blocks_copied for s in stats] == [8 - resident] * 3


@pytest.mark.parametrize("budget_fraction", [0.0, 0.35, 0.7, 1.0])
def test_budget_schedules_are_exact(model_and_reference, budget_fraction):
    model, inputs, reference = model_and_reference
    total = sum(leaf_bytes(b) for b in model.all_blocks())
    schedule = schedule_for(model, budget_bytes=int(total * budget_fraction), prefetch_depth=2)
    streamer = BlockStreamer(model.all_blocks(), schedule, "cpu")
    for out in run_steps(model, streamer, inputs, steps=2):
        assert torch.equal(out, reference)


def test_streamed_bf16_and_chunked(model_and_reference):
    model = streaming_dit(dtype=torch.bfloat16)
    inputs = streaming_inputs()
    model.token_chunk = 5
    with torch.no_grad():
        reference = model(*inputs)
    streamer = BlockStreamer(model.all_blocks(), schedule_for(model, resident=2, prefetch_depth=2), "cpu")
    for out in run_steps(model, streamer, inputs, steps=2):
        assert torch.equal(out, reference)


def fp8_linear(linear):
    return FP8Linear.from_linear(linear)


def swap_linears(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            swap_linears(child, make)


def test_fp8_blocks_stream_exactly():
    model = streaming_dit(dtype=torch.bfloat16)
    for block in model.all_blocks():
        swap_linears(block, fp8_linear)
    assert any(t.dtype == torch.float8_e4m3fn for t in tensor_leaves(model.double_blocks[0]))
    inputs = streaming_inputs()
    with torch.no_grad():
        reference = model(*inputs)
    streamer = BlockStreamer(model.all_blocks(), schedule_for(model, resident=3, prefetch_depth=2), "cpu")
    for out in run_steps(model, streamer, inputs, steps=2):
        assert torch.equal(out, reference)


def test_int8_quanto_blocks_stream_exactly():
    """quanto's INT8 weights are tensor subclasses; their inner tensors (_data int8, _scale) are the
    leaves the streamer copies into shells rebuilt with __tensor_unflatten__."""
    quanto = pytest.importorskip("optimum.quanto")
    model = streaming_dit(dtype=torch.bfloat16)
    for block in model.all_blocks():
        quanto.quantize(block, weights=quanto.qint8)
        quanto.freeze(block)
    leaves = tensor_leaves(model.single_blocks[0])
    assert any(t.dtype == torch.int8 for t in leaves)
    inputs = streaming_inputs()
    with torch.no_grad():
        reference = model(*inputs)
    streamer = BlockStreamer(model.all_blocks(), schedule_for(model, resident=2, prefetch_depth=1), "cpu")
    for out in run_steps(model, streamer, inputs, steps=2):
        assert torch.equal(out, reference)
    shell = empty_module_like(model.single_blocks[0], "cpu")
    assert type(shell.linear1.weight) is type(model.single_blocks[0].linear1.weight)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(tensor_leaves(shell), leaves))


# ---------------------------------------------------------------------------------------------
# Copy order: what the CUDA events enforce, checked on the recorded trace


def test_copy_order_slots_and_cross_step_prefetch():
    model = streaming_dit()
    depth, steps = 2, 3
    schedule = schedule_for(model, resident=2, prefetch_depth=depth)
    streamer = BlockStreamer(model.all_blocks(), schedule, "cpu", trace=True)
    run_steps(model, streamer, streaming_inputs(), steps)
    trace, streamed = streamer.trace, list(schedule.streamed)
    position = {}  # (step, block) -> absolute streamed position
    for step in range(steps):
        for k, block in enumerate(streamed):
            position[step, block] = step * len(streamed) + k
    slot_holds, computed = {}, -1
    for event, step, block, slot in trace:
        if event == "copy":
            # never more than `depth` streamed blocks ahead of the next one to compute
            assert position[step, block] <= computed + 1 + depth
            # a slot is only overwritten once its previous block has been computed
            previous = slot_holds.get(slot)
            assert previous is None or position[previous] <= computed
            slot_holds[slot] = (step, block)
        elif event == "run" and slot != -1:
            assert slot_holds[slot] == (step, block)  # the slot holds this block's copy
            computed = position[step, block]
    copies = [(s, b) for e, s, b, _ in trace if e == "copy"]
    assert copies == sorted(copies, key=lambda sb: position[sb])  # streamed order, each once
    assert len(copies) == steps * len(streamed)  # the last step prefetched nothing beyond itself
    # step s+1's first depth+1 blocks are copied during step s, some before its last block runs
    for step in range(steps - 1):
        next_start = trace.index(("step", step + 1, -1, -1))
        last_run = max(i for i, (e, s, _, _) in enumerate(trace) if e == "run" and s == step)
        first = [i for i, (e, s, _, _) in enumerate(trace) if e == "copy" and s == step + 1][: depth + 1]
        assert len(first) == depth + 1 and all(i < next_start for i in first)
        assert first[0] < last_run


def test_interrupted_step_recovers():
    model = streaming_dit()
    inputs = streaming_inputs()
    with torch.no_grad():
        reference = model(*inputs)
    streamer = BlockStreamer(model.all_blocks(), schedule_for(model, resident=1, prefetch_depth=2), "cpu")
    blocks = streamer.blocks_for_step()
    next(blocks), next(blocks)
    blocks.close()  # e.g. an exception inside the DiT forward
    for out in run_steps(model, streamer, inputs, steps=2):
        assert torch.equal(out, reference)


def test_keep_host_copy_and_close():
    model = streaming_dit()
    inputs = streaming_inputs()
    with torch.no_grad():
        reference = model(*inputs)
    masters = [t.data_ptr() for b in model.all_blocks() for t in tensor_leaves(b)]
    streamer = BlockStreamer(model.all_blocks(), schedule_for(model, resident=4, prefetch_depth=1), "cpu", keep_host_copy=True)
    assert streamer.gpu_bytes == streamer.schedule.resident_bytes + streamer.schedule.ring_bytes
    run_steps(model, streamer, inputs, steps=1)
    streamer.close()
    assert [t.data_ptr() for b in model.all_blocks() for t in tensor_leaves(b)] == masters  # masters untouched
    with pytest.raises(RuntimeError):
        streamer.blocks_for_step()
    with torch.no_grad():
        assert torch.equal(model(*inputs), reference)


# ---------------------------------------------------------------------------------------------
# Pinned memory policy


def caching_host_allocator_bytes(nbytes: int) -> int:
    """What `Tensor.pin_memory()` takes for `nbytes`: PyTorch's CachingHostAllocatorImpl::allocate
    (aten/src/ATen/core/CachingHostAllocator.h) rounds every request up to a power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes else 0


def test_pinned_bytes_equal_the_blocks_not_the_allocators_powers_of_two():
    """The 13B model's FP8 blocks: pinned tensor by tensor through the caching allocator they took
    1.35x their bytes (computed here: double blocks 1.48x, single 1.19x; a double block's 37.7 MB
    MLP weight takes 64 MiB); packed into slabs, their bytes plus < 64 bytes of alignment per tensor."""
    from hyvideo.config import DIT_CONFIGS
    from hyvideo.dit import HunyuanVideoDiT
    from lowvram.streaming import SLAB_ALIGN, slab_layout

    with torch.device("meta"):
        model = HunyuanVideoDiT(DIT_CONFIGS["HYVideo-T/2-cfgdistill"]).to(torch.bfloat16)
    swap_linears_fp8(model, "blocks")
    sizes = [[t.numel() * t.element_size() for t in tensor_leaves(block)] for block in model.all_blocks()]
    planned = sum(map(sum, sizes))
    by_allocator = sum(caching_host_allocator_bytes(n) for block in sizes for n in block)
    in_slabs = sum(slab_layout(block)[1] for block in sizes)
    assert caching_host_allocator_bytes(12288 * 3072) == 2**26  # fc1: 37.7 MB in fp8 -> 64 MiB
    assert 1.3 < by_allocator / planned < 1.4
    assert 0 <= in_slabs - planned < SLAB_ALIGN * sum(map(len, sizes))


def test_pinning_packs_whole_blocks_under_the_cap_and_falls_back():
    blocks = [nn.Linear(16, 16), nn.Linear(16, 16)]  # 1088 bytes each (weight 1024 + bias 64)
    before = [copy.deepcopy(b.state_dict()) for b in blocks]
    registered = []
    report, slabs = pin_blocks_(blocks, cap_bytes=1100, register=registered.append)
    assert report.pinned_bytes == 1088 and report.unpinned_bytes == 1088 and "cap" in report.reason
    assert slabs == registered and len(slabs) == 1 and slabs[0].nbytes == 1088
    slab = slabs[0].untyped_storage().data_ptr()
    assert slabs[0].data_ptr() % 4096 == 0  # the registered range starts on a page
    for leaf in tensor_leaves(blocks[0]):  # block 0: its tensors are views of the registered slab
        assert leaf.untyped_storage().data_ptr() == slab
    assert tensor_leaves(blocks[1])[0].untyped_storage().data_ptr() != slab  # past the cap: left alone
    for block, state in zip(blocks, before):
        assert all(torch.equal(block.state_dict()[k], v) for k, v in state.items())
    unregistered = []
    unpin_slabs(slabs, unregister=unregistered.append)
    assert unregistered == registered and slabs == []

    def failing_register(slab):
        raise RuntimeError("cudaHostRegister:\n out of memory")

    report, slabs = pin_blocks_([nn.Linear(4, 4)], cap_bytes=None, register=failing_register)
    assert report == PinReport(0, 80, "pinning failed: cudaHostRegister: out of memory") and slabs == []


def test_the_planner_counts_the_blocks_the_streamer_pins():
    """Whole blocks under the cap, by the same rule (lowvram.schedule.pinned_blocks); the slabs
    exceed the blocks' bytes by alignment only (< 64 bytes per tensor)."""
    from lowvram.streaming import SLAB_ALIGN

    model = streaming_dit(dtype=torch.bfloat16)
    swap_linears_fp8(model, "blocks")
    schedule = schedule_for(model, resident=2)
    streamed = [model.all_blocks()[i] for i in schedule.streamed]
    cap = sum(leaf_bytes(b) for b in streamed) * 2 // 3  # some blocks pinned, some not
    tensors = sum(len(tensor_leaves(b)) for b in streamed)
    report, _ = pin_blocks_(streamed, cap, register=lambda slab: None)
    assert report.unpinned_bytes > 0
    assert 0 <= report.pinned_bytes - schedule.pinned_bytes(cap) < SLAB_ALIGN * tensors
    assert schedule.pinned_bytes(None) == schedule.streamed_bytes_per_step


def test_cpu_streamer_does_not_pin():
    model = streaming_dit()
    streamer = BlockStreamer(model.all_blocks(), schedule_for(model, resident=0), "cpu")
    assert streamer.pin_report.pinned_bytes == 0 and streamer.pin_report.reason == "not a CUDA device"


# ---------------------------------------------------------------------------------------------
# CUDA: streams, events, pinned memory


@pytest.mark.cuda
@pytest.mark.parametrize("depth", [1, 2])
def test_cuda_streamed_equals_resident(depth):
    model = streaming_dit(dtype=torch.bfloat16)
    inputs = streaming_inputs()
    device = torch.device("cuda")
    reference_model = streaming_dit(dtype=torch.bfloat16).to(device)
    cuda_inputs = [t.to(device) for t in inputs]
    with torch.no_grad():
        reference = reference_model(*cuda_inputs)
    for resident in (0, 3, 8):
        fresh = streaming_dit(dtype=torch.bfloat16)
        for name, child in fresh.named_children():
            if name not in ("double_blocks", "single_blocks"):
                child.to(device)
        began = time.perf_counter()
        streamer = BlockStreamer(fresh.all_blocks(), schedule_for(fresh, resident=resident, prefetch_depth=depth), device)
        assert streamer.pin_report.pinned_bytes > 0 or resident == 8
        for out in run_steps(fresh, streamer, cuda_inputs, steps=3):
            assert torch.equal(out, reference)
        torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - began) * 1000
        stats = streamer.step_stats()
        # CUDA events time each copy (one copy stream) and each stall of the compute stream: with
        # every block resident there is neither; copying a block's bytes takes measurable time; and
        # all of it happened, one after another on its stream, within `elapsed_ms`.
        assert [s.blocks_copied for s in stats] == [8 - resident] * 3
        if resident == 8:
            assert all(s.copy_ms == 0 and s.wait_ms == 0 for s in stats)
        else:
            assert all(s.copy_ms > 0 for s in stats)
        assert sum(s.copy_ms for s in stats) <= elapsed_ms and sum(s.wait_ms for s in stats) <= elapsed_ms
        streamer.close()
    del model


@pytest.mark.cuda
def test_cuda_streamed_blocks_are_page_locked_in_slabs_and_unlocked_on_close():
    """cudaHostRegister'ed slabs: the streamed blocks' tensors report pinned, the copies from them are
    exact, and closing the streamer unlocks them (the bytes stay, as ordinary memory)."""
    device = torch.device("cuda")
    model = streaming_dit(dtype=torch.bfloat16)
    inputs = [t.to(device) for t in streaming_inputs()]
    with torch.no_grad():
        reference = copy.deepcopy(model).to(device)(*inputs)
    for name, child in model.named_children():
        if name not in ("double_blocks", "single_blocks"):
            child.to(device)
    schedule = schedule_for(model, resident=2)
    streamer = BlockStreamer(model.all_blocks(), schedule, device)
    streamed = [leaf for i in schedule.streamed for leaf in tensor_leaves(model.all_blocks()[i])]
    assert streamer.pin_report.unpinned_bytes == 0 and streamer.pin_report.pinned_bytes >= schedule.pinned_bytes(None)
    assert all(leaf.is_pinned() for leaf in streamed)
    for out in run_steps(model, streamer, inputs, steps=2):
        assert torch.equal(out, reference)
    streamer.close()
    assert not any(leaf.is_pinned() for leaf in streamed)


STALL_CYCLES = 50_000_000  # ~25 ms of GPU spinning: far longer than a tiny block's copy or compute


def stall_copies(streamer: BlockStreamer) -> None:
    """Every copy issued from now on waits behind a spin on the copy stream."""
    issue = streamer._issue

    def slow_issue(position):
        with torch.cuda.stream(streamer._copy_stream):
            torch.cuda._sleep(STALL_CYCLES)
        issue(position)

    streamer._issue = slow_issue


def stall_compute(blocks):
    """Each block's compute waits behind a spin on the compute stream."""
    for block in blocks:
        torch.cuda._sleep(STALL_CYCLES)
        yield block


@pytest.mark.cuda
@pytest.mark.parametrize("stalled", ["copy", "compute"])
def test_cuda_streaming_is_exact_when_either_stream_lags(stalled):
    """The two event waits are what keep streaming exact: with the copy stream stalled, a block that
    ran without waiting for its `ready` event would read the slot's previous weights; with the
    compute stream stalled, a copy that did not wait for the slot's `free` event would overwrite
    weights still in use. Either mistake changes the output, so this fails if a wait is removed."""
    device = torch.device("cuda")
    model = streaming_dit(dtype=torch.bfloat16)
    inputs = [t.to(device) for t in streaming_inputs()]
    with torch.no_grad():
        reference = streaming_dit(dtype=torch.bfloat16).to(device)(*inputs)
    for name, child in model.named_children():
        if name not in ("double_blocks", "single_blocks"):
            child.to(device)
    streamer = BlockStreamer(model.all_blocks(), schedule_for(model, resident=1, prefetch_depth=1), device)
    if stalled == "copy":
        stall_copies(streamer)
    for step in range(3):
        blocks = streamer.blocks_for_step(prefetch_next_step=step < 2)
        with torch.no_grad():
            out = model(*inputs, blocks=stall_compute(blocks) if stalled == "compute" else blocks)
        assert torch.equal(out, reference)
    streamer.close()


@pytest.mark.cuda
def test_cuda_int8_quanto_blocks_stream_exactly():
    device = torch.device("cuda")
    quanto = pytest.importorskip("optimum.quanto")
    model = streaming_dit(dtype=torch.bfloat16)
    for block in model.all_blocks():
        quanto.quantize(block, weights=quanto.qint8)
        quanto.freeze(block)
    inputs = [t.to(device) for t in streaming_inputs()]
    resident = copy.deepcopy(model).to(device)
    with torch.no_grad():
        reference = resident(*inputs)
    for name, child in model.named_children():
        if name not in ("double_blocks", "single_blocks"):
            child.to(device)
    streamer = BlockStreamer(model.all_blocks(), schedule_for(model, resident=2, prefetch_depth=2), device)
    for out in run_steps(model, streamer, inputs, steps=2):
        assert torch.equal(out, reference)
    streamer.close()


@pytest.mark.cuda
def test_cuda_streaming_loop_never_synchronizes():
    """The block iterator issues copies and event waits only: under sync debug mode 'error' any
    host-device synchronization inside it raises."""
    model = streaming_dit(dtype=torch.bfloat16)
    device = torch.device("cuda")
    streamer = BlockStreamer(model.all_blocks(), schedule_for(model, resident=2, prefetch_depth=2), device)
    x = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            for block in streamer.blocks_for_step(prefetch_next_step=step < 2):
                w = next(iter(block.parameters()))  # some compute that reads the block's weights
                x = x + w.flatten()[:64].to(x.dtype)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert math.isfinite(float(x.float().sum()))
    streamer.close()
