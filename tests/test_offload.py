"""Host copies of token layers (fast3r.offload): saved by chunks, waited on per rows, brought back per range.

CPU: the copies are synchronous and the same calls run; GPU (-m gpu): the copies run on a side stream, so
the test overwrites the device buffer right after asking to wait for each chunk and checks the host kept
the values from before, and the rows brought back match.
"""

import pytest
import torch

from fast3r.offload import HostLayers, rows_on_device


def test_saved_layers_are_copies_that_outlive_changes_to_the_device_buffer():
    x = torch.randn(2, 10, 8)
    before = x.clone()
    store = HostLayers(torch.device("cpu"), rows=4)
    store.save(0, x)
    for b in range(2):
        for start in range(0, 10, 4):
            store.wait(0, b, start, start + 4)
            x[b, start : start + 4] = -1.0
    store.done()
    assert torch.equal(store.layers[0], before)
    assert store.layers[0].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert store.nbytes == x.nbytes


def test_rows_come_back_range_by_range():
    layers = [torch.randn(2, 12, 8), torch.randn(2, 12, 3)]
    ranges = [(0, 5), (5, 6), (6, 12)]
    got = list(rows_on_device(layers, ranges, torch.device("cpu")))
    assert len(got) == len(ranges)
    for (start, stop), rows in zip(ranges, got):
        for layer, part in zip(layers, rows):
            assert torch.equal(part, layer[:, start:stop])
    assert list(rows_on_device(layers, [], torch.device("cpu"))) == []


@pytest.mark.gpu
def test_gpu_copies_leave_before_the_buffer_is_overwritten_and_come_back():
    x = torch.randn(2, 70_000, 1024, device="cuda", dtype=torch.bfloat16)
    before = x.cpu()
    store = HostLayers(x.device, rows=16_384)
    store.save(3, x)
    for b in range(2):  # what the next fusion block does: overwrite rows as soon as their copy allows
        for start in range(0, x.shape[1], 16_384):
            store.wait(3, b, start, start + 16_384)
            x[b, start : start + 16_384].mul_(-2.0)
    store.done()
    torch.cuda.synchronize()
    host = store.layers[3]
    assert host.is_pinned() and torch.equal(host, before)
    ranges = [(0, 20_000), (20_000, 20_001), (20_001, 70_000)]
    for (start, stop), (rows,) in zip(ranges, rows_on_device([host], ranges, x.device)):
        assert rows.is_cuda and torch.equal(rows.cpu(), before[:, start:stop])
