"""Measuring a training step with torch alone (no lit_llama import), so that benchmarks/peer_worker.py can
use it inside another project's environment: the time after the device's queued work, and the peak memory of
one step on a GPU or a CPU."""

import statistics
import time
import weakref
from typing import Any, Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def sync_time(device: torch.device) -> float:
    """The time after the device finished its queued work (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The median time of `repeats` calls of `fn` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = sync_time(device)
        fn()
        times.append(sync_time(device) - t0)
    return statistics.median(times)


class PeakTensorMemory(TorchDispatchMode):
    """On a CPU, where no allocator keeps statistics: the peak bytes of the tensors created while it is active
    and alive together, counted over their storages (a view is not counted twice; tensors that existed before,
    such as weights and optimizer states, are not counted). The CPU analogue of CUDA's max_memory_allocated
    minus what was allocated at the start. It sees what runs through PyTorch's dispatcher: not the buffers
    inside a torch.compile'd graph."""

    def __init__(self) -> None:
        super().__init__()
        self.live: Dict[int, int] = {}  # storage id -> bytes, for storages created inside and still alive
        self.bytes = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.live or key in inputs:  # a view or an in-place result: nothing new
                continue
            self.live[key] = storage.nbytes()
            self.bytes += self.live[key]
            self.peak = max(self.peak, self.bytes)
            weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        self.bytes -= self.live.pop(key, 0)


def step_peak_memory(step: Callable[[], Any], device: torch.device) -> float:
    """GB: the peak memory of `step()` above what was allocated when it started (GPU: the CUDA allocator's
    statistics; CPU: PeakTensorMemory)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - before) / 1e9
    with PeakTensorMemory() as tracker:
        step()
    return tracker.peak / 1e9
