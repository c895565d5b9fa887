"""Data parallel training with gloo on the CPU: 2 ranks of 1 sample each == 1 process on the 2-sample batch.

The synthetic scenes have every pixel valid, so the loss of the combined batch is the mean of the per-sample
losses and DDP's averaged gradient is its gradient (see fast3r.train.distributed). After one step: AdamW's
moments (0.1 g and 0.001 g^2: the gradients themselves, magnitudes included) agree within 5e-4 of each tensor's
largest value (measured: 1e-4; the same sums over 10^5 pixels in another order, some of them cancelling), and
every parameter within 2% of one update (lr; measured 0.9%): a first AdamW update is lr * g / (|g| + eps), so
gradients that differ in the last bits near |g| ~ eps move a parameter by a fraction of lr. The test can fail:
one process reading only its own sample differs by >= 4e-2 in every tensor's moments.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import train_cases
from train_cases import small_config

from fast3r.train import TrainConfig, train
from fast3r.train.logging import read_metrics
from fast3r.train.state import latest


@pytest.fixture(autouse=True)
def one_thread():
    yield from train_cases.one_cpu_thread()


SCENES = [{"format": "synthetic", "scenes": 4, "seed": 0}]


def _rank(rank: int, world: int, port: int, config: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(TrainConfig.from_dict(config))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state(run_dir):
    return torch.load(latest(run_dir) / "state.pt", weights_only=True)


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 5e-4 * a.abs().max().clamp_min(1e-12))


LR = 1e-3


def test_two_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    common = {"steps": 1, "shuffle": False, "data": SCENES, "save_every": 1000, "lr": LR}
    combined = small_config(tmp_path / "combined", batch_size=2, **common)
    train(combined)
    ranks = small_config(tmp_path / "ranks", batch_size=1, **common)
    mp.spawn(_rank, args=(2, free_port(), ranks.to_dict()), nprocs=2, join=True)
    alone = small_config(tmp_path / "alone", batch_size=1, **common)
    train(alone)

    one, two, solo = state(tmp_path / "combined"), state(tmp_path / "ranks"), state(tmp_path / "alone")
    assert two["world_size"] == 2 and (tmp_path / "ranks" / "checkpoints" / latest(tmp_path / "ranks").name /
                                       "rng_rank1.pt").is_file()
    for index, moments in one["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert close(moments[name], two["optimizer"]["state"][index][name]), (index, name)
            assert not close(moments[name], solo["optimizer"]["state"][index][name]), (index, name)
    for key, value in one["model"].items():
        assert (value - two["model"][key]).abs().max() <= 0.02 * LR, key

    losses = {name: train_losses(tmp_path / name) for name in ("combined", "ranks")}
    assert losses["combined"] == pytest.approx(losses["ranks"], rel=1e-5)


def test_two_compiled_ranks_equal_one_eager_process(tmp_path):
    """compile: true under DDP (each rank compiles its blocks, DDP's hooks on the parameters): two steps equal the
    eager single-process run on the combined batch, as the eager ranks do above."""
    common = {"steps": 2, "shuffle": False, "data": SCENES, "save_every": 1000, "lr": LR}
    train(small_config(tmp_path / "combined", batch_size=2, **common))
    ranks = small_config(tmp_path / "ranks", batch_size=1, compile=True, **common)
    mp.spawn(_rank, args=(2, free_port(), ranks.to_dict()), nprocs=2, join=True)
    one, two = state(tmp_path / "combined"), state(tmp_path / "ranks")
    for index, moments in one["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert close(moments[name], two["optimizer"]["state"][index][name]), (index, name)
    losses = {name: train_losses(tmp_path / name) for name in ("combined", "ranks")}
    assert len(losses["ranks"]) == 2 and losses["combined"] == pytest.approx(losses["ranks"], rel=1e-5)
