"""torchrun with two gloo processes on the embedded data equals a single-process run."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.store import Store
from tests.conftest import ROOT

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
