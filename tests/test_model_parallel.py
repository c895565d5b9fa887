"""One scene across processes: ``model(shard, process_group=...)`` equals the single-process forward (gloo, CPU).

One world of 3 spawned processes (tiny preset, fp32, torch backend) runs every scenario once
and writes what it measured; the tests assert on it. Each rank builds the same weights and
the same whole scene from one seed, runs the single-process forward of the whole scene as
the reference, then its own shard with the process group. Tolerance: max |parallel -
single| / max |single| <= 1e-5 per output and view (issue 10), fp32.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fast3r import Fast3R, Fast3RConfig, memory
from fast3r.parallel import RankMismatchError, split_views

WORLD = 3
TOLERANCE = 1e-5
OUTPUTS = ("pts3d_in_other_view", "conf", "pts3d_local", "conf_local")
# name -> (ranks taking part, view shapes (H, W) of the whole scene, shard sizes, attention, image ids)
SCENARIOS = {
    "5_as_3+2": ((0, 1), [(32, 48)] * 5, (3, 2), "ring", "sequential"),
    "7_as_3+2+2": ((0, 1, 2), [(32, 48)] * 7, (3, 2, 2), "ring", "sequential"),
    "mixed_sizes_portrait": ((0, 1, 2), [(32, 48), (48, 32), (32, 48), (16, 64), (32, 48)], (2, 2, 1), "ring",
                             "sequential"),
    "ulysses_5_as_2+3": ((0, 1), [(32, 48)] * 5, (2, 3), "ulysses", "sequential"),
    "random_ids_seeded": ((1, 2), [(32, 48)] * 6, (4, 2), "ring", "random"),
    "auto_ulysses_2_ranks": ((0, 2), [(48, 32)] * 4, (1, 3), "auto", "sequential"),  # 2 heads % 2 ranks == 0
    "auto_ring_3_ranks": ((0, 1, 2), [(32, 48)] * 6, (2, 2, 2), "auto", "sequential"),  # 2 heads % 3 != 0
    "lean_ring_7_as_3+2+2": ((0, 1, 2), [(32, 48)] * 7, (3, 2, 2), "ring", "sequential"),
    "lean_ulysses_5_as_2+3": ((0, 1), [(32, 48)] * 5, (2, 3), "ulysses", "sequential"),
}
# Scenarios run with memory="lean" (hook layers on the host, blocks in place), in 16-token chunks.
LEAN = {"lean_ring_7_as_3+2+2", "lean_ulysses_5_as_2+3"}


def _scene(shapes):
    generator = torch.Generator().manual_seed(len(shapes))
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in shapes]


def _model(**overrides) -> Fast3R:
    torch.manual_seed(0)
    cfg = Fast3RConfig.preset("tiny")
    return Fast3R(Fast3RConfig.from_dict({**cfg.to_dict(), **overrides}) if overrides else cfg).eval()


def _max_rel(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                           timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    memory.LEAN_QUERY_TOKENS = memory.LEAN_MLP_TOKENS = 16
    report: dict = {}
    model = _model()
    for name, (ranks, shapes, shards, method, ids) in SCENARIOS.items():
        group = dist.new_group(list(ranks))  # every rank calls new_group, members or not
        if rank not in ranks:
            continue
        views = _scene(shapes)
        with torch.inference_mode():
            single = model(views, image_ids=ids, seed=7)
            me = ranks.index(rank)
            first = sum(shards[:me])
            shard = views[first : first + shards[me]]
            out = model(shard, image_ids=ids, seed=7, process_group=group, context_parallel=method,
                        output_device="cpu", memory="lean" if name in LEAN else "auto")
        report[name] = max(_max_rel(o[k], single[first + i][k]) for i, o in enumerate(out) for k in OUTPUTS)
        report[name + "/views"] = len(out)
    # split_views gives the shards a user starting from the whole list would pass.
    report["split_views"] = [len(s) for s in split_views(_scene([(32, 48)] * 7), WORLD)]
    for mismatch in ("config", "dtype"):
        mine = _model(fusion_depth=6) if mismatch == "config" and rank == 1 else _model()
        if mismatch == "dtype" and rank == 2:
            mine = mine.double()
        try:
            with torch.inference_mode():
                mine(_scene([(32, 48)] * 3)[:1], process_group=dist.group.WORLD)
            report[mismatch] = "no error"
        except RankMismatchError as err:
            report[mismatch] = str(err)
    try:
        model(_scene([(32, 48)] * 3)[:1], process_group=dist.group.WORLD)
        report["grad"] = "no error"
    except RuntimeError as err:
        report["grad"] = str(err)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("model_parallel")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_shards_reproduce_the_single_process_forward(reports, name):
    ranks, _, shards, _, _ = SCENARIOS[name]
    for rank in ranks:
        report = reports[rank]
        assert report[name + "/views"] == shards[ranks.index(rank)]
        assert report[name] <= TOLERANCE, f"rank {rank}: max relative error {report[name]:.2e}"


def test_split_views_balances_contiguous_shards(reports):
    assert sorted(reports[0]["split_views"]) == [2, 2, 3]


@pytest.mark.parametrize("mismatch, fragment", [("config", "model configuration"), ("dtype", "dtype")])
def test_a_mismatch_between_ranks_is_a_named_error_on_every_rank(reports, mismatch, fragment):
    for rank, report in enumerate(reports):
        assert fragment in report[mismatch], f"rank {rank}: {report[mismatch]}"


def test_context_parallelism_refuses_training(reports):
    assert all("inference" in report["grad"] for report in reports)
