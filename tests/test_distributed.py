"""torchrun with two gloo processes on the embedded data equals a single-process run, and so do two spawned gloo ranks'
evaluations of one batch, synchronised, and their fits (LTMP's gradients averaged, Prune-and-Merge's scores summed)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

import methods
from bench import distributed
from bench.accuracy import EvalResult
from bench.store import Store
from methods.parallel import all_ranks_true
from tests.conftest import ROOT
from tests.test_ltmp import FAST_FIT, _thresholds, _training_batch, peaked_vit

CONFIG = """
model: vit_fmnist_convstem
dataset: fashion-mnist
limit: 61
eval_precision: fp32
eval_batch_size: 16
latency: {precisions: [fp32], batch_sizes: [2], warmup_iters: 1, warmup_s: 0.0, min_iters: 2, min_time_s: 0.0}
fit: {budget_images: 64, batch_size: 16, precision: fp32}
methods:
  - method: none
  - method: tome
    sweep: {r: [24]}
  - method: topk
    sweep: {keep_rate: [0.5]}
  - method: ltmp
    knobs: {lr_merge: 0.05, lr_prune: 0.0005}
    sweep: {r_target: [0.6]}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(tmp_path: Path, name: str, processes: int, env: dict | None = None) -> subprocess.CompletedProcess:
    config = tmp_path / "dist.yaml"
    config.write_text(CONFIG)
    args = ["run", "--config", str(config), "--store", str(tmp_path / f"{name}.sqlite"),
            "--reports", str(tmp_path / name), "--quiet", "--threads", "1"]
    if processes == 1:
        command = [sys.executable, str(ROOT / "run_bench.py"), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "run_bench.py"), *args]
    import os
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path: Path) -> None:
    single = launch(tmp_path, "single", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch(tmp_path, "double", 2)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("cells measured") == 1  # only rank 0 reports (and writes)
    one, two = Store(tmp_path / "single.sqlite").cells(), Store(tmp_path / "double.sqlite").cells()
    assert len(one) == len(two) == 4
    one, two = one.set_index("label"), two.set_index("label")
    for label in ("none", "tome", "topk"):  # evaluation only: must be identical
        assert int(one.loc[label, "eval_images"]) == int(two.loc[label, "eval_images"]) == 61
        assert int(one.loc[label, "top1_correct"]) == int(two.loc[label, "top1_correct"])
        assert one.loc[label, "top1_hits"] == two.loc[label, "top1_hits"]  # each image's hit back in its place
        assert json.loads(one.loc[label, "tokens_attn"]) == pytest.approx(json.loads(two.loc[label, "tokens_attn"]), abs=1e-9)
        assert float(one.loc[label, "gmacs"]) == pytest.approx(float(two.loc[label, "gmacs"]), rel=1e-12)
        assert float(one.loc[label, "gmacs_min"]) == float(two.loc[label, "gmacs_min"])
    # LTMP trained under DDP on two shards: it ran and counted every image; the fit's budget of 64 images is global,
    # so each rank saw 32 (two batches of 16) and the cell records the 64 of both, as the single process does
    assert int(two.loc["ltmp", "eval_images"]) == 61
    assert int(one.loc["ltmp", "ft_images"]) == int(two.loc["ltmp", "ft_images"]) == 64
    for cells in (one, two):  # the fine-tune cost in epochs: images seen over Fashion-MNIST's 60,000 training images
        assert float(cells.loc["ltmp", "ft_epochs"]) == int(cells.loc["ltmp", "ft_images"]) / 60000
        assert float(cells.loc["tome", "ft_epochs"]) == 0.0
    timings = Store(tmp_path / "double.sqlite").timings()
    assert len(timings) == 4  # latency measured once per cell, on rank 0
    assert (timings["speedup_q1"] <= timings["speedup_q3"]).all() and timings["speedup_q1"].gt(0).all()


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_with_its_message(tmp_path: Path) -> None:
    result = launch(tmp_path, "fail", 2, env={"TOKENBENCH_PLUGINS": "tests.fail_rank1"})
    assert result.returncode != 0
    assert "rank 1 cannot read its data shard" in result.stderr
    assert not (tmp_path / "fail.sqlite").exists() or len(Store(tmp_path / "fail.sqlite").cells()) == 0


def evaluation_batch() -> tuple[torch.Tensor, ...]:
    """Seven images' ``logits: (7, 10)``, ``labels: (7,)``, token ``counts: (7, 3, 2)`` and ``macs: (7,)`` float64.
    Rank 1 of two takes images 1, 3 and 5: image 1 has every largest count and the largest MACs, image 3 every
    smallest count, image 5 the smallest MACs, so a rank 0 that kept its own extremes, or took the other extreme
    across ranks, would be wrong. Top-1 is right for images 0, 3, 4 and 6 only."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 10, generator=generator)
    right = torch.tensor([True, False, False, True, True, False, True])
    labels = torch.where(right, logits.argmax(1), (logits.argmax(1) + 1) % 10)
    counts = torch.randint(2, 197, (7, 3, 2), generator=generator)
    counts[1], counts[3] = 197, 1
    macs = 1e8 + torch.rand(7, generator=generator).double() * 1e8
    macs[1], macs[5] = 3e8, 5e7
    return logits, labels, counts, macs


def synchronise_on_rank(rank: int, folder: str) -> None:
    """One of two gloo ranks: evaluate its shard of :func:`evaluation_batch`, synchronise, rank 0 saves the result."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        shard = distributed.shard(torch.arange(7))
        result = EvalResult()
        result.add(*(part[shard] for part in evaluation_batch()))
        result.synchronise()
        if rank == 0:
            torch.save({"numbers": (result.images, result.top1_correct, result.top5_correct, result.macs_summary()),
                        "tokens": (result.token_sum, result.token_min, result.token_max), "hits": result.image_hits()},
                       f"{folder}/rank0.pt")
    finally:
        dist.destroy_process_group()


def test_synchronised_ranks_equal_one_process(tmp_path: Path) -> None:
    """Two ranks' partial evaluations, all-reduced, equal one process's over all images: counts, token sums, minima
    and maxima, MACs mean / min / max, and each image's hit back at its place in the evaluation order."""
    logits, labels, counts, macs = evaluation_batch()
    torch.multiprocessing.spawn(synchronise_on_rank, args=(str(tmp_path),), nprocs=2)
    synchronised = torch.load(tmp_path / "rank0.pt", weights_only=False)
    alone = EvalResult()
    alone.add(logits, labels, counts, macs)
    mean, low, high = synchronised["numbers"][3]
    assert synchronised["numbers"][:3] == (alone.images, alone.top1_correct, alone.top5_correct)
    assert alone.top1_correct == 4  # images 0, 3, 4 and 6
    assert mean == pytest.approx(alone.macs_summary()[0], rel=1e-12) and (low, high) == alone.macs_summary()[1:]
    for reduced, reference in zip(synchronised["tokens"], (alone.token_sum, alone.token_min, alone.token_max)):
        assert torch.equal(reduced.long(), reference)
    assert torch.equal(synchronised["hits"], alone.image_hits())


def _one_step_fits(images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One LTMP SGD step and a Prune-and-Merge calibration, each on ``images: (B, 3, 32, 32)`` of the tiny ViT: the
    thresholds after the step, the calibration's scores and merge matrices, and whether the plug-ins' parameters were
    left attached to the models."""
    ltmp_model, ltmp = peaked_vit(), methods.create("ltmp", **FAST_FIT)
    ltmp.apply(ltmp_model)
    ltmp.fit(ltmp_model, lambda: iter([(images, labels)]), {"budget_images": len(labels)}, progress=False)
    pm_model, pm = peaked_vit(), methods.create("pm", keep_rate=0.5, prune_rate=0.1, calib_batches=1)
    pm.apply(pm_model)
    pm.fit(pm_model, lambda: iter([(images, labels)]), {"budget_images": len(labels)}, progress=False)
    attached = any(name == "_plugin_trainables" for model in (ltmp_model, pm_model) for name, _ in model.named_children())
    return {"thresholds": _thresholds(ltmp), "scores": pm.scores, "M": torch.cat([m.detach() for m in pm.M], 0),
            "attached": torch.tensor(attached)}


def fit_on_rank(rank: int, folder: str) -> None:
    """One of two gloo ranks: fit on its half of the 16 training images (rank r takes images r, r + 2, ...); the
    collective helpers' answers to rank-dependent flags; everything saved per rank."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        images, labels = _training_batch()
        shard = distributed.shard(torch.arange(16))
        result = _one_step_fits(images[shard], labels[shard])
        result["flags"] = torch.tensor([all_ranks_true(rank == 0), all_ranks_true(True), distributed.broadcast_flag(rank == 0),
                                        distributed.broadcast_flag(rank == 1), distributed.rank() == rank])
        torch.save(result, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fits_under_two_ranks_average_the_gradients_and_sum_the_calibration(tmp_path: Path) -> None:
    """Two gloo ranks, each with half of the images:

    * LTMP's thresholds after one step are the same on both ranks and equal the mean of the two single-process steps
      on each half (DDP averages the gradients; SGD is linear in them, and no threshold reaches the clamp);
    * Prune-and-Merge's calibration scores are those of one process calibrating on both halves (scores summed over
      ranks), so both ranks build the same merge matrices;
    * the plug-ins' parameters are detached from the model once the fit ends;
    * a step is skipped only if every rank agrees (``all_ranks_true`` is an AND), rank 0's flag is broadcast, and each
      rank knows its rank."""
    torch.multiprocessing.spawn(fit_on_rank, args=(str(tmp_path),), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    images, labels = _training_batch()
    halves = [_one_step_fits(images[rank::2], labels[rank::2]) for rank in range(2)]
    start = _thresholds(methods.create("ltmp", **FAST_FIT))
    mean_step = (halves[0]["thresholds"] + halves[1]["thresholds"]) / 2
    assert not torch.equal(halves[0]["thresholds"], halves[1]["thresholds"])  # the halves pull differently
    assert bool(((mean_step > 0) & (mean_step < 1)).all()) and not torch.equal(mean_step, start)
    pm_both = methods.create("pm", keep_rate=0.5, prune_rate=0.1, calib_batches=2)
    model = peaked_vit()
    pm_both.apply(model)
    pm_both.calibrate(model, [(images[0::2], labels[0::2]), (images[1::2], labels[1::2])])
    for result in ranks:
        assert torch.allclose(result["thresholds"], mean_step, atol=1e-6, rtol=0)
        assert torch.allclose(result["scores"], pm_both.scores, atol=1e-6, rtol=1e-5)
        assert torch.equal(result["M"], torch.cat([m.detach() for m in pm_both.M], 0))
        assert not bool(result["attached"])
        assert result["flags"].tolist() == [False, True, True, False, True]
