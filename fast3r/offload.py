"""Token layers in host memory: copied off the GPU as they are produced, brought back one head chunk at a time.

The lean plan (``fast3r.memory``) keeps the four layers the DPT heads read in pinned host memory instead of
on the GPU. ``HostLayers.save`` copies a (B, L, D) layer out on a side stream, in chunks of rows, each chunk
recording an event, while the compute stream goes on with the next fusion block; that block updates the same
device buffer in place, so before it overwrites rows it calls ``HostLayers.wait`` for them, which makes the
compute stream (not the host) wait for those rows' copy. Nothing here synchronizes the host.
``rows_on_device`` brings the rows of one head chunk back, the next chunk's copy in flight while the heads
run on the current one. On the CPU the same calls copy in order, so the plan runs, and is tested, there too.

Pinned blocks come from PyTorch's caching host allocator: the first forward of a size pays for pinning
(cudaHostAlloc), later ones reuse the blocks; the allocator rounds each block up to a power of two.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class HostLayers:
    """(B, L, D) layers saved to host memory by index, with per-chunk events of their copies.

    device: where the layers are produced; rows: tokens per copy (the chunk the writer waits on).
    """

    def __init__(self, device: torch.device, rows: int):
        self.device, self.rows = device, rows
        self.layers: dict[int, torch.Tensor] = {}
        self._copies: dict[int, list[tuple[int, int, int, torch.cuda.Event]]] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def nbytes(self) -> int:
        """Host bytes of the saved layers."""
        return sum(t.nbytes for t in self.layers.values())

    def save(self, index: int, x: torch.Tensor) -> None:
        """Copy x (B, L, D) to host memory as layer ``index``, after the work queued so far on the device.

        x must stay unchanged until ``wait`` for its rows (or ``done``) has been called.
        """
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=self._stream is not None)
        self.layers[index] = host
        if self._stream is None:
            host.copy_(x)
            return
        copies = self._copies[index] = []
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for b in range(x.shape[0]):
                for start in range(0, x.shape[1], self.rows):
                    stop = min(x.shape[1], start + self.rows)
                    host[b, start:stop].copy_(x[b, start:stop], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                    copies.append((b, start, stop, event))

    def wait(self, index: int, b: int, start: int, stop: int) -> None:
        """Make the current stream wait until rows [start, stop) of scene b of layer ``index`` are on the host."""
        stream = torch.cuda.current_stream(self.device) if self._stream is not None else None
        for copy_b, copy_start, copy_stop, event in self._copies.get(index, ()):
            if copy_b == b and copy_start < stop and start < copy_stop:
                stream.wait_event(event)

    def done(self) -> None:
        """Make the current stream wait for every copy, so the device buffers saved from may be reused."""
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)


def rows_on_device(layers: Sequence[torch.Tensor], ranges: Sequence[tuple[int, int]],
                   device: torch.device) -> Iterator[list[torch.Tensor]]:
    """For each token range [start, stop), yield every layer's rows (B, stop - start, D_i) on ``device``.

    From pinned host memory to a GPU the copies run on a side stream, one range ahead: range i + 1 is
    copied while the caller works on range i (the caller's stream waits on an event, the host never does).
    Layers already on ``device`` give views, without copies.
    """
    if not ranges:
        return
    if device.type != "cuda" or all(t.device == device for t in layers):
        for start, stop in ranges:
            yield [t[:, start:stop].to(device) for t in layers]
        return
    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)

    def issue(start: int, stop: int) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        # Allocated on the caller's stream (where they are used and freed); the side stream first waits for
        # the work already queued there, which may still use the memory these blocks come from.
        out = [torch.empty((t.shape[0], stop - start, *t.shape[2:]), dtype=t.dtype, device=device) for t in layers]
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for dst, src in zip(out, layers):
                for b in range(src.shape[0]):
                    dst[b].copy_(src[b, start:stop], non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
        return out, event

    pending = issue(*ranges[0])
    for i in range(len(ranges)):
        out, event = pending
        current.wait_event(event)
        if i + 1 < len(ranges):
            pending = issue(*ranges[i + 1])
        yield out
