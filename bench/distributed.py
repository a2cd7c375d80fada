"""torch.distributed support: ``torchrun --nproc_per_node N run_bench.py ...`` (multi-node with the usual
``--nnodes/--node_rank/--rdzv_*`` flags).

* evaluation is sharded: rank r takes positions r, r + N, r + 2N, ... of the evaluation list. This is
  ``DistributedSampler(shuffle=False)`` without its padding (the sampler repeats images to even out the
  shards, which would count them twice), so no image is duplicated or dropped;
* counts, token statistics and GMACs are all-reduced (sums, mins, maxes of integers in float64: exact), so the
  results equal a single-process run;
* training (LTMP/LTP thresholds, Prune-and-Merge M/R) runs under ``DistributedDataParallel`` on per-rank shards
  of the training data (see :func:`methods.parallel.data_parallel`);
* latency is measured on rank 0 only: it is a per-device figure (one model on one device), and timing the other
  ranks concurrently would only add contention;
* only rank 0 opens and writes the results store; the others learn from it which cells to skip.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bench.errors import BenchError
from methods.parallel import collective_device


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str) -> Process:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Process()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as exc:
            raise BenchError(f"cannot join the process group ({str(exc).splitlines()[0]}): start with torchrun") from exc
    return Process(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return dist.get_rank() if active() else 0


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's share of an index list (strided, no padding)."""
    if not active():
        return indices
    return indices[dist.get_rank()::dist.get_world_size()]


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce (``sum``, ``min``, ``max``) where distributed, returned on the tensor's device; else as is."""
    if not active():
        return tensor
    moved = tensor.to(collective_device())
    dist.all_reduce(moved, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return moved.to(tensor.device)


def broadcast_flag(value: bool) -> bool:
    """Rank 0's boolean, on every rank."""
    if not active():
        return value
    flag = torch.tensor([int(value)], device=collective_device())
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
