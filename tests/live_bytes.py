"""Peak bytes of live tensors during a piece of code, counted on the CPU (no CUDA allocator needed).

Every storage an aten op allocates is recorded as it appears (a TorchDispatchMode; outputs that share an
input's storage, i.e. views and in-place or ``out=`` results, allocate nothing) and as it is freed (a
weakref finalizer on the storage, which fires when the last tensor and C++ owner let go). ``peak``
replays the timeline, leaving out storages named afterwards, e.g. the host copies of the lean plan: on
a CPU those live in the same memory as the work, on a GPU they are in host memory and do not count.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.timeline: list[tuple[int, int]] = []  # (storage id, bytes) on allocation, (id, -1) when freed
        self._live: dict[int, int] = {}  # data pointer -> storage id
        self._next = 0

    def track(self, *tensors: torch.Tensor) -> None:
        """Count tensors that existed before the mode was entered (from now on)."""
        for t in tensors:
            self._see(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._see(t)
        return out

    def _see(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._live or storage.nbytes() == 0:
            return
        sid, self._next = self._next, self._next + 1
        self._live[ptr] = sid
        self.timeline.append((sid, storage.nbytes()))
        weakref.finalize(storage, self._freed, ptr, sid)

    def _freed(self, ptr: int, sid: int) -> None:
        if self._live.get(ptr) == sid:
            del self._live[ptr]
        self.timeline.append((sid, -1))

    def peak(self, exclude: tuple[torch.Tensor, ...] = ()) -> int:
        """Largest sum of live bytes over the timeline, without the storages of ``exclude`` (still alive)."""
        left_out = {self._live[t.untyped_storage().data_ptr()] for t in exclude}
        sizes: dict[int, int] = {}
        live = best = 0
        for sid, nbytes in self.timeline:
            if sid in left_out:
                continue
            if nbytes >= 0:
                sizes[sid] = nbytes
                live += nbytes
            else:
                live -= sizes.pop(sid, 0)
            best = max(best, live)
        return best
