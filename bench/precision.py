"""Precision names -> autocast contexts. "fp32" runs without autocast."""
from __future__ import annotations

import contextlib

import torch

from bench.errors import BenchError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise BenchError(f"unknown precision {precision!r}: use one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if dtype is torch.float16 and device_type == "cpu":
        raise BenchError("fp16 autocast is for CUDA: use --precision bf16 or fp32 on CPU")
    return torch.autocast(device_type, dtype=dtype)
