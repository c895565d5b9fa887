"""Data parallel training on torch.distributed: DDP, one process per GPU, started by torchrun.

``torchrun --nproc-per-node 8 -m fast3r.cli train CONFIG.yaml`` sets RANK / WORLD_SIZE / LOCAL_RANK;
``setup`` joins the group (NCCL on GPUs, gloo on the CPU) and each rank trains on its own samples.
DDP (not FSDP2) because the whole model and its AdamW state fit on one GPU many times over
(648M parameters: 10.4 GB of the H200's 141), so sharding them would only add communication; DDP
averages the gradients, overlapped with the backward. A step's global batch is batch_size x
grad_accum x world_size samples. Each rank's loss is the loss of its own samples, and the ranks'
gradients are averaged, as the official (Lightning DDP) training does; this equals one process on
the combined batch when every sample has the same number of valid pixels per view (the loss averages
over a batch's valid pixels).
Single node: the checkpoint directory must be one filesystem that every rank sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

TIMEOUT = timedelta(minutes=30)  # validation and checkpoint writes on rank 0 keep the others waiting


@dataclass(frozen=True)
class World:
    """This process's place in the run."""

    rank: int
    size: int
    device: torch.device
    owns_group: bool  # we initialized the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str = "auto") -> World:
    """Join the torchrun group if there is one (or use the caller's), and pick this rank's device."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA GPU is visible; use device: cpu (or auto)")
    owns = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
        owns = True
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        return World(rank, size, torch.device("cuda", local), owns)
    return World(rank, size, torch.device("cpu"), owns)


def teardown(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World) -> nn.Module:
    """DDP over the trainable parameters (rank 0's weights are broadcast to all); the model itself alone."""
    if not world.distributed:
        return model
    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank if it is true on any (so that all ranks take the same branch)."""
    if not world.distributed:
        return flag
    value = torch.tensor([float(flag)], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(values: dict[str, float], world: World) -> dict[str, float]:
    """Element-wise sum of each rank's numbers (keys in the same order on every rank)."""
    if not world.distributed or not values:
        return dict(values)
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return dict(zip(values, tensor.tolist()))


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def gather_objects(obj: object, world: World) -> list:
    """Every rank's ``obj``, in rank order, on every rank (small Python objects: names for a message)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out
