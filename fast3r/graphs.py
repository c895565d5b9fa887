"""CUDA graphs for repeated same-shape inference: one replay instead of hundreds of kernel launches.

At 1-100 views a Fast3R forward is a few TFLOP but ~1000 kernel launches, so the host's
launch and Python time, not the GPU, sets the latency. A captured graph replays all of
them at once. It needs a forward with no host synchronization (the Triton backend's
forward has none: token counts, RoPE table sizes and chunk sizes are known on the host)
and fixed shapes, so graphs are cached per input shape, dtype and options. Each cached
graph keeps its own activation memory; that is what a replay costs, so use it for the
small, repeated scenes it pays for (see benchmarks/scale_views.py --cuda-graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    images: torch.Tensor
    outputs: list[dict[str, torch.Tensor]]


class GraphCache:
    """Captures ``forward(images)`` once per key and replays it; outputs are copied out of the graph's memory."""

    def __init__(self) -> None:
        self._graphs: dict[tuple, _Captured] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def __deepcopy__(self, memo: dict) -> GraphCache:
        return GraphCache()  # a copied model captures its own graphs (a graph cannot be copied)

    def __getstate__(self) -> dict:
        return {"_graphs": {}}  # likewise when pickled

    def run(self, forward: Callable[[torch.Tensor], list[dict[str, torch.Tensor]]], images: torch.Tensor,
            key: tuple) -> list[dict[str, torch.Tensor]]:
        key = (tuple(images.shape), images.dtype, images.device, *key)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = _capture(forward, images)
        captured.images.copy_(images)
        captured.graph.replay()
        return [{name: t.clone() for name, t in view.items()} for view in captured.outputs]


def _capture(forward: Callable, images: torch.Tensor) -> _Captured:
    static = images.clone()
    side = torch.cuda.Stream(images.device)
    side.wait_stream(torch.cuda.current_stream(images.device))
    with torch.cuda.stream(side):  # warm-up: compiles kernels and fills caches outside the capture
        forward(static)
    torch.cuda.current_stream(images.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = forward(static)
    return _Captured(graph, static, outputs)
