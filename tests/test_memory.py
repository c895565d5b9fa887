"""The chunk planner of the lean inference path."""

import torch

from fast3r import Fast3RConfig, memory


def test_chunks_are_bounded_by_the_budget_and_by_free_memory(monkeypatch):
    cuda = torch.device("cuda")
    per_view = 10 * 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * 2**30, 80 * 2**30))
    assert memory.chunk_size(cuda, per_view, 256, 8) == memory.CHUNK_MEMORY_BUDGET // per_view
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (400 * 2**20, 80 * 2**30))
    assert memory.chunk_size(cuda, per_view, 256, 8) == 10  # a quarter of 400 MiB
    assert memory.chunk_size(cuda, 10 * 2**30, 256, 8) == 1  # never below one view
    assert memory.chunk_size(torch.device("cpu"), per_view, 256, 8) == 8


def test_per_view_estimates_grow_with_the_work():
    large, tiny = Fast3RConfig.preset("large"), Fast3RConfig.preset("tiny")
    assert memory.encoder_bytes_per_view(large, 768, 2) > memory.encoder_bytes_per_view(large, 196, 2)
    assert memory.encoder_bytes_per_view(large, 196, 2) > memory.encoder_bytes_per_view(tiny, 196, 2)
    assert memory.head_bytes_per_view(large, 384 * 512, 2) == 384 * 512 * (3 * 128 * 2 + 64)


def test_forward_accepts_explicit_chunks_and_gives_the_same_result():
    from fast3r import Fast3R

    model = Fast3R("tiny").eval()
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        a = model(images, encoder_chunk=2, head_chunk=3)
        b = model(images)
    torch.testing.assert_close(a[4]["pts3d_local"], b[4]["pts3d_local"], rtol=1e-5, atol=1e-5)
