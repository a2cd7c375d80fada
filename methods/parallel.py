"""DistributedDataParallel for plug-ins that train: wraps the model so gradients of the plug-in's own
parameters (thresholds, M/R) are averaged across ranks; a plain pass-through in a single process."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


@contextmanager
def data_parallel(model: nn.Module, trainable: list[nn.Parameter]) -> Iterator[nn.Module]:
    """Yield the module to call during training. Under torch.distributed the plug-in's ``trainable`` parameters
    are attached to the model for the duration (DDP only synchronises a module's own parameters)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield model
        return
    model.add_module("_plugin_trainables", nn.ParameterList(trainable))
    try:
        device = next(iter(trainable)).device
        yield nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    finally:
        del model._plugin_trainables


def collective_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (calibration statistics); returned on the tensor's own device. No-op in one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    moved = tensor.to(collective_device())
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def all_ranks_true(flag: bool) -> bool:
    """True only if ``flag`` holds on every rank (so all ranks skip a step together)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())
