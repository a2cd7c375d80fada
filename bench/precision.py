"""Precision names -> autocast contexts. "fp32" runs without autocast."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Mapping

import torch

from bench.errors import BenchError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check(device: str, precision: str, where: str = "--precision") -> None:
    """Raise :class:`BenchError` for a precision ``device`` cannot run; ``where`` names the setting that asked for
    it (a flag or a config key), so the message says what to change."""
    if precision not in PRECISIONS:
        raise BenchError(f"unknown precision {precision!r} in {where}: use one of {sorted(PRECISIONS)}")
    if PRECISIONS[precision] is torch.float16 and torch.device(device).type == "cpu":
        raise BenchError(f"{where} asks for fp16, and fp16 autocast is for CUDA: on the CPU use bf16 or fp32")


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a null context for fp32)."""
    check(device, precision)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


#: /proc/cpuinfo flags of bf16 arithmetic: x86 AVX-512 BF16 and AMX-BF16, Arm's BF16 extension
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def native_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU has bf16 arithmetic instructions (read from ``/proc/cpuinfo``, or the text given); False
    where it cannot tell. Without them oneDNN emulates bf16, several times slower than fp32 (4x on an AVX2 EPYC)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & BF16_FLAGS)


#: how a run asks for fp32 instead, for each setting :func:`bench.runner.run_precisions` names
FP32_FIXES = {"eval_precision": "--eval-precision fp32", "latency.precisions": "--precisions fp32",
              "fit.precision": "fit precision fp32 in the config"}


def emulation_warning(settings: Mapping[str, Iterable[str]], device: str, native: bool | None = None) -> str | None:
    """The warning for bf16 asked of a CPU that lacks bf16 instructions (``native``: :func:`native_bf16` unless
    given), or None: its timings would measure the emulation, and its evaluation would run several times longer.
    ``settings`` maps each precision setting (keys of :data:`FP32_FIXES`) to the precisions it asks for; the warning
    names those that ask for bf16 and how to ask for fp32 instead."""
    asking = [name for name, precisions in settings.items() if "bf16" in set(precisions)]
    if not asking or torch.device(device).type != "cpu":
        return None
    if native_bf16() if native is None else native:
        return None
    fixes = " and ".join(FP32_FIXES[name] for name in asking)
    return (f"warning: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 instructions, so bf16 runs "
            f"emulated, several times slower than fp32, and its timings measure the emulation: {', '.join(asking)} "
            f"{'asks' if len(asking) == 1 else 'ask'} for bf16; for fp32 use {fixes}")
