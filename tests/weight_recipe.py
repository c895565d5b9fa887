"""The deterministic weights every official fixture was made with (SPEC.md, 'Golden fixtures').

Only torch and the standard library: the fixture generators, which run the official code in
a venv of their own, import this file too, so the recipe is written once.
"""

from __future__ import annotations

import math
import zlib

import torch


def recipe_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The weight of state-dict entry ``key``: seeded by the key's CRC32, scaled like a fan-in init."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def recipe_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {key: recipe_tensor(key, tuple(shape)) for key, shape in shapes.items()}
