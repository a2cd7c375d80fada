"""Wall-clock latency of the model alone: inputs already on the device, ``inference_mode``, warm-up,
then timed iterations; medians and inter-quartile ranges. Methods and the baseline run interleaved
(A B A B ...) in one process so that machine drift cancels out of their ratio.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    """Per-iteration times in milliseconds of one callable."""

    times_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def iqr_ms(self) -> float:
        if len(self.times_ms) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times_ms, n=4)
        return q3 - q1

    def images_per_s(self, batch: int) -> float:
        return batch / (self.median_ms / 1000.0)


def paired_ratio(numerator: Timing, denominator: Timing) -> tuple[float, float, float]:
    """Median and quartiles (q1, median, q3) of the per-round ratios ``numerator / denominator`` of two callables
    timed by :func:`time_interleaved`: round ``i`` of both ran back to back, so each ratio cancels the drift of
    the machine between rounds. ``speedup = paired_ratio(base, method)``."""
    ratios = [a / b for a, b in zip(numerator.times_ms, denominator.times_ms, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return q1, statistics.median(ratios), q3


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function that runs ``fn`` once and returns its duration in ms (CUDA events on GPU)."""
    if device.type == "cuda":
        def run(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)
        return run

    def run(fn: Callable[[], object]) -> float:
        tic = time.perf_counter()
        fn()
        return (time.perf_counter() - tic) * 1000.0
    return run


def time_interleaved(fns: dict[str, Callable[[], object]], device: str = "cpu", warmup_iters: int = 20,
                     warmup_s: float = 2.0, min_iters: int = 10, min_time_s: float = 2.0,
                     max_iters: int = 1000) -> dict[str, Timing]:
    """Time several callables round-robin. Warm-up lasts >= ``warmup_iters`` rounds and >= ``warmup_s``;
    timing lasts >= ``min_iters`` rounds and >= ``min_time_s`` (at most ``max_iters`` rounds)."""
    run = _timer(torch.device(device))
    names = list(fns)
    with torch.inference_mode():
        start, rounds = time.perf_counter(), 0
        while rounds < warmup_iters or time.perf_counter() - start < warmup_s:
            for name in names:
                run(fns[name])
            rounds += 1
        times: dict[str, list[float]] = {name: [] for name in names}
        start, rounds = time.perf_counter(), 0
        while rounds < max_iters and (rounds < min_iters or time.perf_counter() - start < min_time_s):
            for name in names:
                times[name].append(run(fns[name]))
            rounds += 1
    return {name: Timing(values) for name, values in times.items()}
