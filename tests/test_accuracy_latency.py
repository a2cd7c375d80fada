"""Top-1 of a classifier whose predictions we control; the Wilson interval; the latency timer."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import methods
from bench.accuracy import EvalResult, evaluate, wilson_interval
from bench.latency import Timing, on_glibc, paired_ratio, time_interleaved
from tests.conftest import tiny_vit


def test_wilson_interval_reference_values() -> None:
    # p = 0.5, n = 100: centre 0.5, half-width 1.96*sqrt(.25/100 + 1.96^2/40000)/(1 + 1.96^2/100)
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.40383, abs=1e-4) and high == pytest.approx(0.59617, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no images: the interval says nothing
    for total in range(1, 80):  # the interval always holds the proportion; 0 and all correct end exactly at 0 and 1
        for correct in range(total + 1):
            low, high = wilson_interval(correct, total)
            assert 0.0 <= low <= correct / total <= high <= 1.0, (correct, total)
        assert wilson_interval(0, total)[0] == 0.0 and wilson_interval(total, total)[1] == 1.0, total


def test_exact_top1_and_top5_of_a_controlled_classifier() -> None:
    """The head is rewired so the prediction is the label we planted in the image's mean brightness."""
    model = tiny_vit(depth=1)
    methods.create("none").apply(model)
    labels = torch.arange(20) % 10
    images = labels.float().view(-1, 1, 1, 1).expand(20, 3, 32, 32).clone()
    planted = labels.clone()
    planted[:7] = (labels[:7] + 1) % 10  # 7 images "wrong": the model will predict label + 1
    images = planted.float().view(-1, 1, 1, 1).expand(20, 3, 32, 32).clone()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x.mean((1, 2, 3)).round().long(), 10).float() * 10 - \
            torch.arange(10).float() * 0.01  # ties broken: lower class index ranks higher

    model.forward = forward
    model._reduction_ctx.tokens_attn = [torch.full((10,), 65)]
    model._reduction_ctx.tokens_mlp = [torch.full((10,), 65)]
    result = evaluate(model, [(images[:10], labels[:10]), (images[10:], labels[10:])], embed=0, progress=False)
    assert result.images == 20 and result.top1_correct == 13
    # ranking = planted class, then 0, 1, 2, ... For wrong image i (label i, planted i + 1) the top 5 are
    # {i+1, 0, 1, 2, 3} (or {i+1, 0..4} minus i+1): it holds label i for i = 0..3, not for i = 4, 5, 6.
    assert result.top5_correct == 13 + 4


def test_token_counts_and_macs_are_summed_and_bounded_over_every_batch() -> None:
    """Per block and part, the sum, the smallest and the largest count over all images of all batches, and the mean,
    smallest and largest MACs per image: the second batch's extremes do not replace the first's (here the attention's
    largest count and the MLP's smallest are in the first batch, the others in the second)."""
    result = EvalResult()
    logits, labels = torch.zeros(2, 10), torch.zeros(2, dtype=torch.long)
    for counts, macs in (([[[60, 40]], [[65, 30]]], [1.0, 4.0]), ([[[50, 50]], [[55, 45]]], [2.0, 3.0])):
        result.add(logits, labels, torch.tensor(counts), torch.tensor(macs, dtype=torch.float64))  # (B=2, depth=1, 2)
    assert result.token_sum.tolist() == [[230, 165]]
    assert result.token_min.tolist() == [[50, 30]] and result.token_max.tolist() == [[65, 50]]
    assert result.tokens_mean().tolist() == [[57.5, 41.25]]
    assert result.macs_summary() == (2.5, 1.0, 4.0)


def test_timer_measures_a_sleep() -> None:
    result = time_interleaved({"a": lambda: time.sleep(0.01), "b": lambda: time.sleep(0.02)},
                              warmup_iters=2, warmup_s=0.0, min_iters=10, min_time_s=0.0)
    assert len(result["a"].times_ms) == 10
    assert result["a"].median_ms == pytest.approx(10.0, abs=3.0)
    assert result["b"].median_ms == pytest.approx(20.0, abs=3.0)
    assert result["b"].images_per_s(4) == pytest.approx(4 / (result["b"].median_ms / 1000))


def test_a_warm_callable_sits_out_the_warm_up() -> None:
    """3 warm-up rounds and 4 timed ones: the cold callable runs 3 + 4 times, the one named warm 1 + 4 (once just
    before the timed rounds); without ``warm`` both run 7 times. Naming an unknown callable warm is an error."""
    calls = {"a": 0, "b": 0}
    fns = {name: (lambda name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls}
    result = time_interleaved(fns, warmup_iters=3, warmup_s=0.0, min_iters=4, min_time_s=0.0, warm=("a",))
    assert calls == {"a": 5, "b": 7} and len(result["a"].times_ms) == len(result["b"].times_ms) == 4
    calls.update(a=0, b=0)
    time_interleaved(fns, warmup_iters=3, warmup_s=0.0, min_iters=4, min_time_s=0.0)
    assert calls == {"a": 7, "b": 7}
    with pytest.raises(ValueError, match="warm names \\['c'\\]"):
        time_interleaved(fns, warm=("c",))


def test_the_baseline_is_warmed_up_once_per_setting(tmp_path: Path, tiny_imagefolder: Path, monkeypatch) -> None:
    """Every cell times the same baseline on the same inputs: the first cell warms it up at each (precision, batch),
    the later cells only warm up their own method."""
    import tests.tiny_model  # noqa: F401  (registers test_tiny_vit)
    from bench import config as config_mod, runner
    from bench.store import Store
    from tests.test_store import tiny_config

    config = config_mod.load(str(tiny_config(tmp_path, tiny_imagefolder, [2, 4])))
    config["latency"]["batch_sizes"] = [1, 2]
    warm_args = []
    real = runner.time_interleaved
    monkeypatch.setattr(runner, "time_interleaved", lambda fns, **kw: warm_args.append(kw["warm"]) or real(fns, **kw))
    store = Store(tmp_path / "s.sqlite")
    runner.run(runner.prepare(config), store, progress=False, echo=lambda line: None)
    store.close()
    assert warm_args == [(), (), ("baseline",), ("baseline",), ("baseline",), ("baseline",)]  # 3 cells x 2 batches


def test_timer_counts_the_page_faults_of_each_call() -> None:
    """Touching every page of a fresh 8 MiB anonymous map faults each of its 2,048 pages in once; sleeping faults
    none (a few from the timer itself are allowed)."""
    import mmap

    def touch_fresh_pages() -> None:
        with mmap.mmap(-1, 8 * 2 ** 20) as buffer:
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                buffer.madvise(mmap.MADV_NOHUGEPAGE)  # 4 KiB pages even where transparent huge pages are "always"
            for offset in range(0, len(buffer), mmap.PAGESIZE):
                buffer[offset] = 1

    result = time_interleaved({"touch": touch_fresh_pages, "sleep": lambda: time.sleep(0.001)},
                              warmup_iters=1, warmup_s=0.0, min_iters=5, min_time_s=0.0)
    assert len(result["touch"].page_faults) == 5
    assert result["touch"].page_faults_per_call >= 8 * 2 ** 20 // mmap.PAGESIZE
    assert result["sleep"].page_faults_per_call < 50


def test_timing_summaries() -> None:
    """Median, inter-quartile range (exclusive quartiles of 1..5 at positions 1.5 and 4.5: 1.5 and 4.5) and the
    median page faults of a call; one time has no spread, and no fault counts give None."""
    timing = Timing([5.0, 1.0, 4.0, 2.0, 3.0], [0, 7, 100, 5, 6])
    assert (timing.median_ms, timing.iqr_ms, timing.page_faults_per_call) == (3.0, 3.0, 6)
    assert timing.images_per_s(8) == 8 / 0.003
    assert Timing([7.0]).iqr_ms == 0.0 and Timing([7.0]).page_faults_per_call is None


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    """Rounds (10, 5), (20, 10), (30, 10), (40, 10): ratios 2, 2, 3, 4 -> median 2.5; exclusive quartiles at
    positions 1.25 and 3.75 of the sorted ratios -> 2.0 and 3 + 0.75 * (4 - 3) = 3.75. The ratio of the medians
    (25 / 10 = 2.5) happens to agree here; with drift between rounds it would not."""
    assert paired_ratio(Timing([10.0, 20.0, 30.0, 40.0]), Timing([5.0, 10.0, 10.0, 10.0])) == (2.0, 2.5, 3.75)
    assert paired_ratio(Timing([6.0]), Timing([3.0])) == (2.0, 2.0, 2.0)
    # round by round, not sorted: rounds (40, 10), (10, 5), (30, 10), (20, 10) give ratios 4, 2, 3, 2
    assert paired_ratio(Timing([40.0, 10.0, 30.0, 20.0]), Timing([10.0, 5.0, 10.0, 10.0])) == (2.0, 2.5, 3.75)


def test_latency_is_timed_on_the_evaluation_images() -> None:
    """Input-dependent reducers keep as many tokens as the image gives, so latency inputs are real evaluation
    images (in order, repeated when the set is smaller than the batch), not noise."""
    from bench.runner import Workload
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 2, 2)

    def eval_batches():
        for start in range(0, 5, 2):
            yield images[start:start + 2], torch.zeros(len(images[start:start + 2]))

    work = Workload({}, torch.nn.Identity(), "sha", "d", 5, eval_batches, eval_batches, "cpu")
    assert work.latency_inputs(3)[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert work.latency_inputs(7)[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 1.0]
    assert work.latency_inputs(3) is work.latency_inputs(3)  # cached: loaded once per run


def test_cells_are_measured_on_the_kept_heap(monkeypatch) -> None:
    """``run`` keeps the heap (:func:`bench.latency.steady_heap`) before the first cell: evaluations and fits then
    reuse pages, as the timings do, instead of faulting in fresh ones for every large batch. After every cell it
    hands the heap's free pages back (:func:`bench.latency.release_heap`), so that they do not pile up."""
    from bench import runner

    events = []
    monkeypatch.setattr(runner, "steady_heap", lambda: events.append("steady heap"))
    monkeypatch.setattr(runner, "release_heap", lambda: events.append("release"))
    monkeypatch.setattr(runner, "measure_cell", lambda work, entry, knobs, store, progress: events.append("cell"))
    config = {"methods": [{"method": "none"}, {"method": "tome", "sweep": {"r": [1]}}], "fit": {}, "model": "m",
              "seed": 0, "eval_precision": "fp32", "latency": {"precisions": []}}
    work = runner.Workload(config, torch.nn.Identity(), "sha", "d", 5, None, None, "cpu")
    counts, _ = runner.run(work, None, progress=False)
    assert events == ["steady heap", "cell", "release", "cell", "release"] and counts["done"] == 2


@pytest.mark.parametrize("method, released", [("ltmp", True), ("tome", False)])
def test_a_fitting_cell_hands_back_the_fits_free_pages_before_evaluating(monkeypatch, method: str,
                                                                          released: bool) -> None:
    """A method that trains releases the heap (:func:`bench.latency.release_heap`) after its fit and before its
    evaluation, whose large batches ask for blocks of other sizes: without it a fit's free pages stayed resident
    through the evaluation, and the peak grew from cell to cell (8 LTMP cells of ``fmnist_full`` in one process,
    1,536-image fits, 1,000 test images: 2.78 -> 3.45 GB without, 2.83 -> 2.90 GB with). A method that does not
    train skips the release (it would cost ~0.3 s)."""
    from bench import runner

    events = []

    class Stop(Exception):
        pass

    def train_batches():
        events.append("fit batch")
        yield torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)

    def evaluate(*args, **kwargs):
        events.append("evaluate")
        raise Stop  # what follows the evaluation is not this test's concern

    monkeypatch.setattr(runner, "release_heap", lambda: events.append("release"))
    monkeypatch.setattr(runner, "evaluate", evaluate)
    config = {"fit": {"budget_images": 2, "batch_size": 2, "precision": "fp32"}, "model": "m", "seed": 0,
              "eval_precision": "fp32", "latency": {"precisions": []}}
    work = runner.Workload(config, tiny_vit(), "sha", "d", 2, lambda: iter(()), train_batches, "cpu", train_images=2)
    with pytest.raises(Stop):
        runner.measure_cell(work, {"method": method}, {}, None, False)
    assert events == (["fit batch", "release", "evaluate"] if released else ["evaluate"])


def test_a_cells_speedup_is_the_baselines_time_over_the_methods(monkeypatch, tmp_path: Path) -> None:
    """A ToMe cell timed with fixed per-round times (baseline 30, 30, 30, 30 ms; method 10, 12, 10, 15 ms): speedup
    30 / 11 = 2.73 (medians), per-round quartiles of 3, 2.5, 3, 2 (2.125 and 3.0), realisation = speedup / GMACs ratio,
    GMACs ratio = dense / reduced > 1; the timed "baseline" is the unpatched model and "method" the patched one. The
    timing row also keeps the method's iteration count, the threads, and each side's median page faults per call."""
    from bench import runner
    from bench.store import Store

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = tiny_vit()
    timed = {}

    def fixed_times(fns, device, **kwargs):
        with torch.no_grad():
            timed.update({name: fn() for name, fn in fns.items()})
        return {"baseline": Timing([30.0] * 4, [9, 9, 9, 9]), "method": Timing([10.0, 12.0, 10.0, 15.0], [3, 2, 3, 4])}

    monkeypatch.setattr(runner, "time_interleaved", fixed_times)
    config = {"fit": {"budget_images": 0}, "model": "m", "seed": 0, "eval_precision": "fp32",
              "latency": {"precisions": ["fp32"], "batch_sizes": [4], "warmup_iters": 1, "warmup_s": 0.0,
                          "min_iters": 1, "min_time_s": 0.0}}
    work = runner.Workload(config, base, "sha", "d", 4, lambda: iter([(x, torch.zeros(4, dtype=torch.long))]),
                           lambda: iter(()), "cpu")
    store = Store(tmp_path / "s.sqlite")
    row = runner.measure_cell(work, {"method": "tome"}, {"r": 8}, store, False)
    (timing,) = store.timings().itertuples()
    assert row["gmacs_ratio"] == pytest.approx(row["gmacs_dense"] / row["gmacs"]) and row["gmacs_ratio"] > 1.2
    assert timing.speedup == pytest.approx(30 / 11) and (timing.speedup_q1, timing.speedup_q3) == (2.125, 3.0)
    assert timing.baseline_median_ms == 30.0 and timing.median_ms == 11.0
    # exclusive quartiles of 10, 10, 12, 15 at positions 1.25 and 3.75: 10 and 12 + 0.75 * 3 = 14.25
    assert (timing.iqr_ms, timing.baseline_iqr_ms) == (4.25, 0.0) and timing.images_per_s == pytest.approx(4000 / 11)
    assert timing.realisation == pytest.approx(timing.speedup / row["gmacs_ratio"])
    assert (timing.iterations, timing.threads) == (4, torch.get_num_threads())
    assert (timing.page_faults_per_call, timing.baseline_page_faults_per_call) == (3, 9)  # medians
    with torch.no_grad():
        assert torch.equal(timed["baseline"], base(x)) and not torch.allclose(timed["method"], base(x))
    store.close()


GLIBC_ONLY = pytest.mark.skipif(not on_glibc(), reason="glibc's mallopt")

_FAULTS_OF_LARGE_TENSORS = """
import torch
from bench.latency import _minor_faults, heap_policy, steady_heap
def faults():  # minor page faults of allocating, touching and freeing a 64 MiB tensor 5 times
    start = _minor_faults()
    for _ in range(5):
        torch.ones(16 * 2 ** 20).sum()
    return _minor_faults() - start
faults()
before = faults()
print(heap_policy())  # reading the policy does not set it
policy = steady_heap()
faults()  # the heap grows once
print(heap_policy() == policy)
print(policy, before, min(faults() for _ in range(3)))
"""


@GLIBC_ONLY
def test_steady_heap_stops_page_faults_of_repeated_large_allocations() -> None:
    """By default glibc maps each 64 MiB block fresh and unmaps it on free: every call faults its 16,384 pages
    in again (fewer with transparent huge pages). With the heap kept, repeated calls reuse the same pages: the
    fewest faults of three rounds of 5 calls, since once in ~17 runs of the suite one round saw a block faulted in
    afresh (16,384 faults) where 40 runs of this script alone never did."""
    plain_heap = {name: value for name, value in os.environ.items() if name != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", _FAULTS_OF_LARGE_TENSORS], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent, env=plain_heap).stdout.splitlines()
    assert out[:2] == ["system default", "True"]
    out = out[2].split()
    before, after = int(out[-2]), int(out[-1])
    assert " ".join(out[:-2]) == "glibc, freed memory kept (no mmap, no trim)"
    assert before >= 5 * 32, before  # mapped afresh on every call: >= 32 faults each even with 2 MiB huge pages
    assert after < 100 and after <= before // 10, (before, after)


_RELEASED_PAGES = """
import torch
from bench.latency import release_heap, steady_heap
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 // 2 ** 20  # MiB
steady_heap()
freed = torch.ones(16 * 2 ** 20)  # 64 MiB, touched
pinned = torch.ones(2 ** 18)  # 1 MiB above it in the heap, kept alive: the freed block is a hole, not the top
del freed
kept = resident()
release_heap()
print(kept - resident(), float(pinned.sum()))
"""


@GLIBC_ONLY
def test_release_heap_returns_the_kept_heaps_free_pages() -> None:
    """On the kept heap a freed 64 MiB block below a live one stays resident (the heap never shrinks below a live
    block); :func:`bench.latency.release_heap` hands its pages back, and the live block keeps its values."""
    out = subprocess.run([sys.executable, "-c", _RELEASED_PAGES], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split()
    assert int(out[0]) >= 60 and float(out[1]) == 2 ** 18, out


_INTERPOSED_MALLOC = """
#include <stddef.h>
extern void *__libc_malloc(size_t size);
void *malloc(size_t size) { return __libc_malloc(size); }
"""


@GLIBC_ONLY
def test_steady_heap_reports_an_allocator_preloaded_in_glibcs_place(tmp_path: Path) -> None:
    """With ``malloc`` interposed by an ``LD_PRELOAD`` library (as jemalloc or tcmalloc are), glibc's settings do not
    reach the allocator: the recorded policy says so instead of claiming glibc's kept heap."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the interposing library")
    (tmp_path / "interpose.c").write_text(_INTERPOSED_MALLOC)
    library = tmp_path / "libinterpose.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(tmp_path / "interpose.c")], check=True)
    script = "from bench.latency import steady_heap; print(steady_heap())"
    root = Path(__file__).resolve().parent.parent
    unloaded = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root,
                           env=unloaded)
    preloaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root,
                               env={**unloaded, "LD_PRELOAD": str(library)})
    assert plain.stdout.strip() == "glibc, freed memory kept (no mmap, no trim)"
    assert preloaded.stdout.strip() == f"preloaded allocator (LD_PRELOAD={library}): its own policy, not glibc's"


def test_torchs_huge_page_request_is_recorded_with_the_heap_policy(monkeypatch) -> None:
    """``THP_MEM_ALLOC_ENABLE`` makes torch madvise huge pages for its large tensors: the recorded policy names it
    (with its value) after the heap's own; unset, the policy is the heap's alone."""
    from bench.latency import heap_policy

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    plain = heap_policy()
    assert "THP" not in plain
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert heap_policy() == f"{plain}; THP_MEM_ALLOC_ENABLE=1: torch madvises huge pages for >= 2 MB"


def test_bf16_without_bf16_instructions_is_flagged() -> None:
    """An AVX2 CPU (flags as /proc/cpuinfo lists them) emulates bf16: a run asking for it is warned; AVX-512 BF16,
    AMX and Arm BF16 are native; fp32-only runs and GPUs are never warned."""
    from bench.precision import emulation_warning, native_bf16

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert not native_bf16(avx2) and not native_bf16("")
    assert native_bf16("flags\t\t: avx2 avx512f avx512_bf16\n") and native_bf16("flags\t\t: avx2 amx_bf16 amx_tile\n")
    assert native_bf16("Features\t: fp asimd bf16 i8mm\n")
    latency_only = {"eval_precision": ["fp32"], "latency.precisions": ["fp32", "bf16"], "fit.precision": ["fp32"]}
    warning = emulation_warning(latency_only, "cpu", native=False)
    assert warning.endswith(": latency.precisions asks for bf16; for fp32 use --precisions fp32")
    everywhere = {"eval_precision": ["bf16"], "latency.precisions": ["bf16"], "fit.precision": ["fp32", "bf16"]}
    assert emulation_warning(everywhere, "cpu", native=False).endswith(
        ": eval_precision, latency.precisions, fit.precision ask for bf16; for fp32 use --eval-precision fp32 and "
        "--precisions fp32 and fit precision fp32 in the config")
    assert emulation_warning(latency_only, "cpu", native=True) is None
    assert emulation_warning({"eval_precision": ["fp32"], "fit.precision": []}, "cpu", native=False) is None
    assert emulation_warning(everywhere, "cuda", native=False) is None


def test_the_cpu_is_recorded_by_its_family_and_model_numbers() -> None:
    """A VM's bare "AMD EPYC" hides the generation: the first processor's vendor, family, model and stepping are
    recorded beside the name; a cpuinfo without them records None, and later processors are not read."""
    from bench.runner import cpu_identity

    zen5 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
            "stepping\t: 1\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n")
    assert cpu_identity(zen5) == ("AMD EPYC", "AuthenticAMD family 26 model 2 stepping 1")
    name, number = cpu_identity("Features\t: fp asimd\n")  # an Arm cpuinfo: no family
    assert number is None and name


def test_run_precisions_include_each_training_entrys_own_fit(tmp_path: Path) -> None:
    """The bf16 warning and the precision checks see an entry's own ``fit.precision``, not only the config's: an
    LTP entry fitting in bf16 under an fp32 config puts bf16 in the run; a method that does not train adds nothing."""
    from bench import config as config_mod
    from bench.runner import run_precisions

    path = tmp_path / "entry_bf16.yaml"
    path.write_text("eval_precision: fp32\nlatency: {precisions: [fp32]}\nfit: {precision: fp32}\nmethods:\n"
                    "  - method: tome\n    fit: {precision: fp16}\n  - method: ltp\n    fit: {precision: bf16}\n")
    assert run_precisions(config_mod.load(str(path))) == {"eval_precision": ["fp32"], "latency.precisions": ["fp32"],
                                                          "fit.precision": ["bf16"]}


def test_paired_difference_hand_values() -> None:
    """A right on 4 of 5, B on 1, the one B gets also A's: b = 3 discordant for A, c = 0. Difference 3/5; the
    per-image differences (1, 1, 1, 0, 0) have variance 3/5 - (3/5)^2 = 0.24, so the half-width is
    1.96 * sqrt(0.24 / 5); McNemar: 3 : 0 among 3 fair flips, two-sided p = 2 / 8."""
    import math

    import numpy as np

    from bench.accuracy import paired_difference

    a = np.array([1, 1, 1, 0, 1], bool)
    b = np.array([0, 0, 0, 0, 1], bool)
    difference, half, p_value = paired_difference(a, b)
    assert difference == pytest.approx(0.6)
    assert half == pytest.approx(1.959963984540054 * math.sqrt(0.24 / 5))
    assert p_value == pytest.approx(0.25)
    assert paired_difference(b, a)[0] == pytest.approx(-0.6) and paired_difference(b, a)[2] == pytest.approx(0.25)
    # 6 : 1 among 7: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125; identical hits: 0 ± 0, p = 1
    six_one = (np.array([1] * 6 + [0] + [1] * 3, bool), np.array([0] * 6 + [1] + [1] * 3, bool))
    assert paired_difference(*six_one)[2] == pytest.approx(0.125)
    assert paired_difference(a, a) == (0.0, 0.0, 1.0)


def test_packed_hits_round_trip() -> None:
    from bench.accuracy import pack_hits, unpack_hits

    hits = torch.rand(1003, generator=torch.Generator().manual_seed(0)) > 0.3
    packed = pack_hits(hits)
    assert len(packed) == 126  # ceil(1003 / 8)
    assert (unpack_hits(packed, 1003) == hits.numpy()).all()
