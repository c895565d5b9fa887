"""Context parallelism (fast3r.parallel) on the CPU: gloo processes against single-process attention.

One world of 3 spawned processes runs every distributed case once (3 ranks on the default
group, 2 ranks on a subgroup of global ranks 1 and 2, so group ranks differ from global
ranks) and writes what it measured; the tests below assert on it. Every rank draws the same
full q/k/v from one seed and keeps its own tokens, in uneven shards of views with
different token counts.
"""

import itertools
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from fast3r import load_images
from fast3r.parallel import (
    InferenceOnlyError,
    RankMismatchError,
    ShardingError,
    fingerprint,
    gather_layout,
    merge_partials,
    preprocessed_size,
    ring_attention,
    shard_for_rank,
    split_views,
    torch_attention_with_lse,
    triton_attention_with_lse,
    ulysses_attention,
)

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIM, SCALE = 32, 0.21
WORLD = 3
DIST_TIMEOUT_S = 60  # a collective that waits longer fails instead of hanging
JOIN_TIMEOUT_S = 150
# Per rank, the token counts of its views: 7 views as 3+2+2 on three ranks, 5 as 3+2 on the pair.
SCENES = {"p3": [[12, 20, 9], [16, 6], [15, 12]], "p2": [[16, 9, 20], [12, 6]]}
HEADS = {"p3": 6, "p2": 4}
BATCH = {"p3": 2, "p2": 1}
KERNELS = {"torch": torch_attention_with_lse, "triton": triton_attention_with_lse}
METHODS = {"ring": ring_attention, "ulysses": ulysses_attention}


def math_attention(q, k, v, scale):
    """Reference in the inputs' precision: BLHD -> (out (B, L, H, D), lse (B, H, L))."""
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    out = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)
    return out, scores.logsumexp(-1)


def rel_error(out, ref) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


# ------------------------------------------------------------- single process
def test_merge_partials_is_exact_over_key_shards():
    b, length, h, d, keys = 2, 33, 3, 16, 50
    q = torch.randn(b, length, h, d, dtype=torch.float64) * 6  # wide score range: partial lse far apart
    k, v = torch.randn(b, keys, h, d, dtype=torch.float64), torch.randn(b, keys, h, d, dtype=torch.float64)
    ref_out, ref_lse = math_attention(q, k, v, SCALE)
    cuts = sorted(torch.randperm(keys - 1)[:2].add(1).tolist())
    partials = [math_attention(q, k[:, a:z], v[:, a:z], SCALE) for a, z in itertools.pairwise([0, *cuts, keys])]
    partials = [(o.float(), lse.float()) for o, lse in partials]
    before = [t.clone() for pair in partials for t in pair]
    out, lse = partials[0]
    for part in partials[1:]:
        out, lse = merge_partials(out, lse, *part)
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == (b, length, h, d) and lse.shape == (b, h, length)
    assert rel_error(out, ref_out) <= 5e-6  # fp32 partials and a few fp32 roundings per merge
    assert float((lse.double() - ref_lse).abs().max()) <= 1e-6 * float(ref_lse.abs().max())
    assert all(torch.equal(x, y) for x, y in zip(before, [t for pair in partials for t in pair]))


def test_merge_partials_rejects_mismatched_partials():
    out, lse = torch.randn(1, 5, 2, 8), torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="do not match"):
        merge_partials(out, lse, torch.randn(1, 6, 2, 8), torch.randn(1, 2, 6))
    with pytest.raises(ValueError, match=r"\(B, H, L\)"):
        merge_partials(out, lse.transpose(1, 2), out.clone(), lse.transpose(1, 2))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_torch_attention_with_lse_reads_packed_views(dtype, tol):
    qkv = torch.randn(2, 77, 3, 3, 16).to(dtype)
    q, k, v = qkv.unbind(2)  # strided views, token stride 3 * H * D
    out, lse = torch_attention_with_lse(q, k, v, SCALE)
    ref_out, ref_lse = math_attention(q.double(), k.double(), v.double(), SCALE)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32 and lse.shape == (2, 3, 77)
    assert rel_error(out, ref_out) <= tol
    assert float((lse.double() - ref_lse).abs().max()) <= tol


def test_triton_attention_with_lse_has_the_same_contract():
    q, k, v = torch.randn(3, 1, 70, 2, HEAD_DIM, device="cuda" if torch.cuda.is_available() else "cpu").unbind(0)
    out, lse = triton_attention_with_lse(q, k, v, SCALE)
    ref_out, ref_lse = math_attention(q.double(), k.double(), v.double(), SCALE)
    assert out.shape == q.shape and lse.shape == (1, 2, 70) and lse.dtype == torch.float32
    assert rel_error(out, ref_out) <= 1e-5
    assert float((lse.double() - ref_lse).abs().max()) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("length", [1000, 4133])
def test_torch_attention_with_lse_on_cuda(dtype, tol, length):
    """cuDNN (bf16) and the efficient kernel (fp32, lse padded to 32) against fp64 math, on packed views."""
    qkv = torch.randn(1, length, 3, 4, 64, device="cuda").to(dtype)
    q, k, v = qkv.unbind(2)
    out, lse = torch_attention_with_lse(q, k, v, 0.125)
    ref_out, ref_lse = math_attention(q.double(), k.double(), v.double(), 0.125)
    assert out.shape == q.shape and lse.shape == (1, 4, length) and lse.dtype == torch.float32
    assert rel_error(out, ref_out) <= tol
    assert float((lse.double() - ref_lse).abs().max()) <= tol


# ------------------------------------------------------------- split_views
def _brute_force_largest(weights, parts):
    best = None
    for cuts in itertools.combinations(range(1, len(weights)), parts - 1):
        bounds = [0, *cuts, len(weights)]
        largest = max(sum(weights[a:z]) for a, z in itertools.pairwise(bounds))
        best = largest if best is None else min(best, largest)
    return best


def test_split_views_minimizes_the_largest_shard_and_keeps_view_order():
    for _ in range(40):
        n = int(torch.randint(1, 10, ()))
        parts = int(torch.randint(1, min(n, 4) + 1, ()))
        weights = torch.randint(1, 50, (n,)).tolist()
        views = [object() for _ in range(n)]
        shards = split_views(views, parts, tokens_per_view=weights)
        assert len(shards) == parts and all(shards)
        assert [id(x) for s in shards for x in s] == [id(x) for x in views]
        sizes = list(itertools.accumulate(len(s) for s in shards))
        largest = max(sum(weights[a:z]) for a, z in itertools.pairwise([0, *sizes]))
        assert largest == _brute_force_largest(weights, parts), (weights, parts, shards)


def test_split_views_of_mixed_tensor_sizes_balances_tokens():
    square, landscape, portrait = torch.randn(3, 224, 224), torch.randn(3, 384, 512), torch.randn(1, 3, 512, 384)
    views = [square, square, square, square, landscape, portrait]  # 196 x 4, then 768 and 768 tokens
    shards = split_views(views, 2)
    assert [len(s) for s in shards] == [4, 2]  # 784 + 1536 tokens; [5, 1] would be 1552 + 768
    assert [len(s) for s in split_views(views, 3)] == [4, 1, 1]
    assert [len(s) for s in split_views([square] * 5, 2)] == [3, 2]
    assert sorted(len(s) for s in split_views([square] * 7, 3)) == [2, 2, 3]


def test_split_views_of_stacked_tensors_returns_slices():
    scene = torch.randn(7, 3, 32, 48)
    shards = split_views(scene, 3)
    assert [s.shape[0] for s in shards] == [2, 3, 2]
    assert all(s.data_ptr() == scene[i].data_ptr() for s, i in zip(shards, [0, 2, 5]))
    batch = torch.randn(2, 5, 3, 32, 32)
    shards = split_views(batch, 2)
    assert [s.shape[1] for s in shards] == [3, 2] and torch.equal(torch.cat(shards, dim=1), batch)


def test_split_views_counts_image_file_tokens_from_headers(tmp_path, monkeypatch):
    paths = []
    for i, (w, h) in enumerate([(640, 480), (480, 640), (500, 500), (1000, 333), (300, 900), (1024, 768)]):
        path = tmp_path / f"view{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8).numpy()).save(path)
        paths.append(str(path))
    for size in (224, 512):
        loaded = load_images(paths, size)
        assert [preprocessed_size(p, size) for p in paths] == [tuple(t.shape[1:]) for t in loaded]
        expected = [len(s) for s in split_views(loaded, 3)]
        from PIL import ImageFile

        with monkeypatch.context() as m:  # counting tokens must not decode a single pixel
            m.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("split_views decoded an image"))
            assert [len(s) for s in split_views(paths, 3, size=size)] == expected


def test_split_views_errors_name_the_problem(tmp_path):
    views = [torch.randn(3, 32, 32)] * 2
    with pytest.raises(ShardingError, match="2 views cannot fill 3 ranks"):
        split_views(views, 3)
    with pytest.raises(ValueError, match="224 or 512"):
        split_views([str(tmp_path / "a.png")] * 2, 2)
    with pytest.raises(ValueError, match="one positive token count per view"):
        split_views(views, 2, tokens_per_view=[5])
    with pytest.raises(ValueError, match="at least one rank"):
        split_views(views, 0)
    with pytest.raises(TypeError, match="tensors or image file paths"):
        split_views([1, 2], 2)


# ------------------------------------------------------------- the gloo world
def _world(rank: int, world: int, out_dir: str, seed: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=DIST_TIMEOUT_S))
    pair = dist.new_group([1, 2])
    results = {"errors": {}, "layout": {}, "raised": {}}
    _attention_cases(results, "p3", None, seed)
    if rank in (1, 2):
        _attention_cases(results, "p2", pair, seed + 1)
        views = [torch.randn(3, 16 * (1 + i % 3), 32) for i in range(5)]
        results["pair_shard"] = [next(j for j, w in enumerate(views) if w is x) for x in shard_for_rank(views, pair)]
    _mismatch_cases(results, rank)
    _refusal_cases(results, rank)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _attention_cases(results: dict, tag: str, group, seed: int) -> None:
    """Ring and Ulysses over both kernels against single-process attention over all tokens."""
    view_tokens = SCENES[tag]
    layout = gather_layout(group, view_tokens[dist.get_rank(group)], torch.float32, fingerprint("tiny", "torch"))
    results["layout"][tag] = {"view_offset": layout.view_offset, "num_views": layout.num_views,
                              "shard_lengths": layout.shard_lengths, "token_offset": layout.token_offset}
    total = sum(layout.shard_lengths)
    generator = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(BATCH[tag], total, 3, HEADS[tag], HEAD_DIM, generator=generator).unbind(2)
    rows = slice(layout.token_offset, layout.token_offset + layout.shard_lengths[layout.rank])
    exact = math_attention(q.double(), k.double(), v.double(), SCALE)[0][:, rows]
    for kernel_name, kernel in KERNELS.items():
        single = kernel(q, k, v, SCALE)[0][:, rows]
        for method_name, method in METHODS.items():
            out = method(q[:, rows], k[:, rows], v[:, rows], scale=SCALE, group=group, local_attention=kernel,
                         shard_lengths=layout.shard_lengths)
            results["errors"][f"{tag}-{method_name}-{kernel_name}"] = {
                "vs_fp64": rel_error(out, exact), "vs_single": rel_error(out, single),
                "shape": list(out.shape), "expected_shape": list(q[:, rows].shape), "dtype": str(out.dtype)}


def _mismatch_cases(results: dict, rank: int) -> None:
    """One rank differs; every rank must raise, and none may hang."""
    cases = {
        "dtype": ([4, 4], torch.float32 if rank == 2 else torch.bfloat16, fingerprint("tiny")),
        "config": ([4, 4], torch.float32, fingerprint("tiny" if rank != 1 else "large")),
        "no_views": ([] if rank == 0 else [4], torch.float32, fingerprint("tiny")),
    }
    for name, (counts, dtype, config) in cases.items():
        try:
            gather_layout(None, counts, dtype, config)
            results["raised"][name] = None
        except Exception as err:  # noqa: BLE001 - the test asserts on the class and message
            results["raised"][name] = [type(err).__name__, str(err)]


def _refusal_cases(results: dict, rank: int) -> None:
    """Errors raised before any communication: the same on every rank."""
    q, k, v = torch.randn(3, 1, [5, 4, 3][rank], 4, HEAD_DIM).unbind(0)
    for name, method in METHODS.items():
        try:
            method(q.detach().requires_grad_(), k, v, scale=SCALE, group=None, local_attention=torch_attention_with_lse,
                   shard_lengths=[5, 4, 3])
            results["raised"][f"grad-{name}"] = None
        except Exception as err:  # noqa: BLE001
            results["raised"][f"grad-{name}"] = [type(err).__name__, str(err)]
    with torch.no_grad():
        try:
            ulysses_attention(q, k, v, scale=SCALE, group=None, local_attention=torch_attention_with_lse,
                              shard_lengths=[5, 4, 3])
            results["raised"]["heads"] = None
        except Exception as err:  # noqa: BLE001
            results["raised"]["heads"] = [type(err).__name__, str(err)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Spawn the gloo world once; -> (seed, per-rank results). Fails (never hangs) past JOIN_TIMEOUT_S."""
    out_dir = tmp_path_factory.mktemp("gloo")
    seed = int.from_bytes(os.urandom(4), "little") % 2**31
    with pytest.MonkeyPatch.context() as env:  # the workers run Triton on CPU tensors, also on a GPU machine
        env.setenv("TRITON_INTERPRET", "1")
        context = mp.start_processes(_world, args=(WORLD, str(out_dir), seed), nprocs=WORLD, join=False,
                                     start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the gloo world did not finish in {JOIN_TIMEOUT_S} s (seed {seed})")
    return seed, [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("case", [f"{t}-{m}-{k}" for t in SCENES for m in METHODS for k in KERNELS])
def test_sharded_attention_equals_single_process_attention(world, case):
    seed, ranks = world
    measured = [r["errors"][case] for r in ranks if case in r["errors"]]
    assert len(measured) == len(SCENES[case.split("-")[0]])
    for m in measured:
        assert m["shape"] == m["expected_shape"] and m["dtype"] == "torch.float32"
    assert max(m["vs_single"] for m in measured) <= 1e-5, f"seed {seed}: {measured}"
    assert max(m["vs_fp64"] for m in measured) <= 1e-5, f"seed {seed}: {measured}"


def test_gather_layout_gives_every_rank_the_scene_layout(world):
    _, ranks = world
    for tag, view_tokens in SCENES.items():
        members = [r["layout"][tag] for r in ranks if tag in r["layout"]]
        lengths = [sum(t) for t in view_tokens]
        assert [m["shard_lengths"] for m in members] == [lengths] * len(view_tokens)
        assert [m["num_views"] for m in members] == [sum(map(len, view_tokens))] * len(view_tokens)
        assert [m["view_offset"] for m in members] == list(itertools.accumulate([0, *map(len, view_tokens[:-1])]))
        assert [m["token_offset"] for m in members] == list(itertools.accumulate([0, *lengths[:-1]]))


@pytest.mark.parametrize("case, error, words", [
    ("dtype", RankMismatchError.__name__, ["dtype", "rank 2: torch.float32", "rank 0: torch.bfloat16"]),
    ("config", RankMismatchError.__name__, ["model configuration", "rank 1"]),
    ("no_views", ShardingError.__name__, ["rank(s) [0]", "at least one view"]),
])
def test_rank_mismatch_is_a_named_error_on_every_rank(world, case, error, words):
    _, ranks = world
    raised = [r["raised"][case] for r in ranks]
    assert all(r is not None and r[0] == error for r in raised), raised
    assert len({r[1] for r in raised}) == 1
    assert all(w in raised[0][1] for w in words), raised[0][1]


@pytest.mark.parametrize("method", METHODS)
def test_grad_enabled_inputs_are_refused_as_inference_only(world, method):
    _, ranks = world
    raised = [r["raised"][f"grad-{method}"] for r in ranks]
    assert all(r is not None and r[0] == InferenceOnlyError.__name__ for r in raised), raised
    assert "context parallelism is for inference" in raised[0][1] and "process_group" in raised[0][1]


def test_ulysses_refuses_heads_not_divisible_by_ranks(world):
    _, ranks = world
    raised = [r["raised"]["heads"] for r in ranks]
    assert all(r is not None and r[0] == ShardingError.__name__ and "4 % 3" in r[1] for r in raised), raised


def test_shard_for_rank_gives_each_group_rank_its_shard(world):
    _, ranks = world
    shards = [r["pair_shard"] for r in ranks if "pair_shard" in r]
    assert len(shards) == 2 and all(shards)
    assert [i for s in shards for i in s] == list(range(5))


def test_benchmark_smoke_run_on_two_gloo_processes(tmp_path):
    out = tmp_path / "cp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "benchmarks/bench_context_parallel.py", "--smoke", "--out", str(out)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["P"] == 2 and doc["backend"] == "gloo" and doc["dtype"] == "float32"
    assert doc["env"]["NCCL_NVLS_ENABLE"] == "0" and doc["env"]["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    for record in doc["records"]:
        assert sum(record["shard_lengths"]) == record["tokens"] and record["single_gpu"]["torch_sdpa_s"] > 0
        for name in ("ring_torch", "ulysses_torch"):
            result = record["methods"][name]
            assert result["seconds"] > 0 and result["rel_error"] <= 1e-5 and result["speedup_vs_1gpu"] > 0, result
        assert "CUDA only" in record["methods"]["context_parallel_torch"]["skipped"]
        step = record["step"]
        assert min(step["compute_torch_s"], step["merge_s"], step["kv_transfer_s"], step["alltoall_qkv_s"]) > 0
        assert step["kv_bytes"] == 2 * record["shard_lengths"][0] * doc["heads"] * doc["head_dim"] * 4
