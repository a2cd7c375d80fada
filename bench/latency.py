"""Wall-clock latency of the model alone: inputs already on the device, ``inference_mode``, warm-up,
then timed iterations; medians and inter-quartile ranges. Methods and the baseline run interleaved
(A B A B ...) in one process so that machine drift cancels out of their ratio.

Before anything is timed, glibc's heap is told to keep freed memory (:func:`steady_heap`). By default it serves
large blocks with fresh ``mmap`` pages and unmaps them on free, so a forward pass that allocates large activations
pays a page fault for every 4 KiB of them on every call: measured here, 230-255 thousand faults (about 1 GB of
fresh pages) per forward pass of DeiT-S at batch 32, 12 % of its time, while a token-reduced model, whose
tensors are smaller, paid few or none. That flattered every method's speedup over the baseline, by as much as
the baseline's page faults; how much depended on what the process had allocated before (after threshold
training, the embedded model's baseline ran fault-free). With the heap kept, a warm model pays none.

An allocator preloaded in glibc's place (``LD_PRELOAD`` of jemalloc or tcmalloc) is detected and recorded as the
heap policy instead: glibc's settings do not reach it. jemalloc with its default settings hands freed pages back,
and the unreduced embedded model then paid ~43 thousand page faults a forward pass at batch 32 (1.37x slower),
which flattered every method's speedup again; the page faults of every timed call are stored, so it shows.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Collection

import torch

try:
    import resource
except ImportError:  # not a Unix: page faults are not counted
    resource = None

#: glibc ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@dataclass
class Timing:
    """Per-iteration times in milliseconds of one callable, and the process's minor page faults during each."""

    times_ms: list[float]
    page_faults: list[int] = field(default_factory=list)

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

    @property
    def page_faults_per_call(self) -> float | None:
        """Median minor page faults of one timed call (0 for a warm model on a kept heap); None where not counted."""
        return statistics.median(self.page_faults) if self.page_faults else None


def paired_ratio(numerator: Timing, denominator: Timing) -> tuple[float, float, float]:
    """Median and quartiles (q1, median, q3) of the per-round ratios ``numerator / denominator`` of two callables
    timed by :func:`time_interleaved`: round ``i`` of both ran back to back, so each ratio cancels the drift of
    the machine between rounds. ``speedup = paired_ratio(base, method)``."""
    ratios = [a / b for a, b in zip(numerator.times_ms, denominator.times_ms, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return q1, statistics.median(ratios), q3


def on_glibc() -> bool:
    """Whether this process runs on Linux with glibc, whose ``mallopt`` :func:`steady_heap` sets."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.cache
def steady_heap() -> str:
    """Make glibc keep freed memory in the heap for the rest of the process: no ``mmap`` for large blocks
    (``M_MMAP_MAX`` 0) and no returning the heap's top to the system (``M_TRIM_THRESHOLD`` at its maximum), so
    repeated forward passes reuse the same pages instead of faulting in new ones. Idempotent; returns the policy
    in force (see :func:`heap_policy`). Elsewhere than glibc, or where another allocator replaces glibc's ``malloc``
    (:func:`preloaded_malloc`), it changes nothing."""
    if not on_glibc():
        return "system default"
    libc = _libc()
    if preloaded_malloc(libc):
        return f"preloaded allocator (LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}): its own policy, not glibc's"
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) != 1:
        return "glibc default (mallopt refused)"
    return "glibc, freed memory kept (no mmap, no trim)"


def release_heap() -> None:
    """Hand the kept heap's free pages back to the system (glibc's ``malloc_trim``); the heap stays kept. With no
    ``mmap`` and no trimming, a heap that served blocks of many sizes fragments and its free pages pile up from cell to
    cell: a run of the default config reached 8.5 GB resident and one of ``fmnist_full`` 16.6 GB (on glibc's default
    heap the default config's LTMP cells peak at 3.2 GB). ``run`` releases after every cell (the default config then
    peaked at 6.8 GB: one cell's fit and evaluation still grew the kept heap by ~3 GB), and a cell that fits releases
    between its fit and its evaluation too (8 LTMP cells of ``fmnist_full`` in one process, 1,536-image fits, 1,000
    test images: peak 2.78 -> 3.45 GB from the first cell to the last without it, 2.83 -> 2.90 GB with it); what
    follows faults its pages in again once (the release takes ~0.3 s). Within one evaluation the release cannot help:
    the ragged batches' blocks of varying sizes fragment the heap, and evaluations in batches of 500 peaked higher from
    cell to cell (2.3 -> 7.3 GB over nine LTMP cells); the Fashion-MNIST configs evaluate in batches of 100, whose
    blocks fit the holes (1.2-2.6 GB). A no-op where :func:`steady_heap` changes nothing."""
    if on_glibc() and not preloaded_malloc(_libc()):
        _libc().malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library (on Linux, glibc), loaded once: ``find_library`` searches the system's library cache."""
    return ctypes.CDLL(ctypes.util.find_library("c"))


def preloaded_malloc(libc: ctypes.CDLL) -> bool:
    """Whether the process's ``malloc`` is not glibc's own: the symbol the dynamic linker resolves for everyone
    (an ``LD_PRELOAD`` library's, if one defines it) against the one inside ``libc``."""
    address = lambda function: ctypes.cast(function, ctypes.c_void_p).value
    return address(ctypes.CDLL(None).malloc) != address(libc.malloc)


def heap_policy() -> str:
    """The heap policy in force, as recorded with every timing (``environment()['heap']``): what :func:`steady_heap`
    set, or the system's default in a process that has timed nothing (reading it changes nothing); and, where
    ``THP_MEM_ALLOC_ENABLE`` is set, that torch asks the kernel for transparent huge pages for its tensors of 2 MB and
    more (it changes how their memory is mapped, so a timing records it; on the Zen 5 EPYC, session 35, LTMP's
    realisation moved within its run-to-run spread with it)."""
    policy = steady_heap() if steady_heap.cache_info().currsize else "system default"
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE")
    return policy if thp is None else f"{policy}; THP_MEM_ALLOC_ENABLE={thp}: torch madvises huge pages for >= 2 MB"


def _minor_faults() -> int:
    """Minor page faults of this process so far (all threads); 0 where ``resource`` is unavailable."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
                     max_iters: int = 1000, warm: Collection[str] = ()) -> dict[str, Timing]:
    """Time several callables round-robin. Warm-up lasts >= ``warmup_iters`` rounds and >= ``warmup_s``;
    timing lasts >= ``min_iters`` rounds and >= ``min_time_s`` (at most ``max_iters`` rounds). The heap is made
    steady first (:func:`steady_heap`), so the warm-up also settles it; the page faults of each timed call are
    counted, so a stored timing shows whether it was free of them.

    ``warm`` names callables that were already warmed up this way earlier in the process on the same inputs (the
    harness's baseline after the first cell): they sit out the warm-up and run once after it, just before the timed
    rounds, which interleave every callable as usual."""
    unknown = set(warm) - set(fns)
    if unknown:
        raise ValueError(f"warm names {sorted(unknown)}, which are not among the timed callables {sorted(fns)}")
    steady_heap()
    run = _timer(torch.device(device))
    names = list(fns)
    cold = [name for name in names if name not in warm]
    with torch.inference_mode():
        start, rounds = time.perf_counter(), 0
        while cold and (rounds < warmup_iters or time.perf_counter() - start < warmup_s):
            for name in cold:
                run(fns[name])
            rounds += 1
        for name in (name for name in names if name in warm):  # once each, right before the timed rounds
            run(fns[name])
        timings = {name: Timing([], []) for name in names}
        start, rounds = time.perf_counter(), 0
        while rounds < max_iters and (rounds < min_iters or time.perf_counter() - start < min_time_s):
            for name in names:
                faults = _minor_faults()
                timings[name].times_ms.append(run(fns[name]))
                timings[name].page_faults.append(_minor_faults() - faults)
            rounds += 1
    return timings
