"""Peak bytes of live tensors, measured on any device (the CPU included) with a TorchDispatchMode.

CUDA has `torch.cuda.max_memory_allocated`; the CPU has no allocator statistics. `PeakTracker`
counts every tensor storage created by an op while it is active, and releases it when the last
tensor seen on that storage is garbage collected, so `peak_bytes` is the most bytes of tensor
storage alive at once. It sees what Python sees: storages created before the tracker (weights,
inputs) are not counted (also when an op returns a view of them), and scratch memory that a kernel
allocates and frees inside one op (im2col, attention workspaces) is invisible.

Collectives (c10d ops) get detached copies of their tensors (same storage, another tensor object):
gloo's worker thread holds a collective's tensors until it drops its Work, which it may do after
the caller has seen the collective complete and moved on (in a 2-rank test, 28 % of all-to-alls
were still held on return), whenever the OS and the GIL let that thread run. Handed the program's
own tensors, it would decide when their storages count as released, and the peak would depend on
thread timing; this way a storage is released where the program drops its last tensor on it.

Use it to check memory estimates on small configs:

    with torch.no_grad(), PeakTracker() as tracker:
        model(...)
    tracker.peak_bytes
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only


def _storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr()), storage.nbytes()


class PeakTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._live: dict = {}  # storage key -> [nbytes, tensors seen on it that are still alive]
        self._external: set = set()  # storages that existed before the tracker
        self.current_bytes = 0
        self.peak_bytes = 0

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    def _release(self, key) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[key]
            self.current_bytes -= entry[0]

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            return
        key, nbytes = _storage_key(t)
        if key[1] == 0 or key in self._external:
            return
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [nbytes, 0]
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs, _ = tree_flatten((args, kwargs))
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key, _ = _storage_key(t)
                if key not in self._live:
                    self._external.add(key)
        if func.namespace == "c10d":  # (the docstring) a collective returns its arguments: nothing new
            args, kwargs = tree_map_only(torch.Tensor, torch.Tensor.detach, (args, kwargs))
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        outputs, _ = tree_flatten(out)
        for t in outputs:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
