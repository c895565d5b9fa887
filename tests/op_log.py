"""The aten ops a piece of code dispatches, in order, with the shape of each op's first argument.

Used to count the kernels the loss launches and to see which attention ops a backward recomputes. Only
shapes are kept, not the tensors, so recording a whole backward holds no activation alive.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[object, tuple[int, ...] | None]] = []  # (op, shape of its first argument)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.ops.append((func, None if first is None else tuple(first.shape)))
        return func(*args, **(kwargs or {}))
