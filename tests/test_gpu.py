"""What only a CUDA GPU can check (``benchmarks/gpu_check.sh`` runs this file on a lent GPU machine).

A CPU cannot catch a tensor left on the wrong device: the tests here run paths of the suite on ``cuda`` with the
reducer's own state where the suite puts it (built or loaded on the CPU, moved with the model, or not), and check
the results against the same path on the CPU. Their ``cuda`` cases are skipped without a GPU (as in CI); the whole
``run`` and the speed script also run on the CPU everywhere, so that what a GPU session will run cannot rot unseen.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import methods
from bench import config as bench_config
from bench.store import Store
from tests.conftest import image_batch, load_script, run_cli, tiny_vit
from tests.test_conformance import PLUGINS, prepared, reducing_knobs
from tests.test_ltmp import with_thresholds
from tests.test_speed_benchmark import fixed_timings
from tests.tiny_model import test_tiny_vit as make_tiny

NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ON_EVERY_DEVICE = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_GPU)])


@pytest.fixture(autouse=True)
def exact_matmuls() -> Iterator[None]:
    """TF32 off, so CUDA's float32 results agree with the CPU's to float rounding."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def reducing_model(name: str) -> tuple[torch.nn.Module, methods.TokenReducer, torch.Tensor]:
    """The tiny ViT patched by ``name`` at a setting that reduces tokens (input-dependent thresholds for the learned
    methods), prepared on the CPU, and its input batch."""
    if name in ("ltmp", "ltp", "ltm"):
        return with_thresholds(name, seed=0)
    model, reducer = prepared(name, **reducing_knobs(name))
    return model, reducer, image_batch(model, batch=4)


@NEEDS_GPU
@pytest.mark.parametrize("name", PLUGINS)
def test_a_model_moved_to_the_gpu_gives_the_cpus_tokens_and_logits(name: str) -> None:
    """The reducer's state stays where the CPU built it (Prune-and-Merge's matrices, the thresholds): inference on
    the GPU keeps the same tokens per image and gives the same logits (atol 1e-4), in a batch and image by image."""
    model, _, x = reducing_model(name)
    with torch.inference_mode():
        expected = model(x)
        counts = model._reduction_ctx.counts().clone()
        gpu = copy.deepcopy(model).cuda()
        logits = gpu(x.cuda())
        assert torch.equal(gpu._reduction_ctx.counts().cpu(), counts)
        alone = torch.cat([gpu(x[i:i + 1].cuda()) for i in range(len(x))])
    assert torch.allclose(logits.cpu(), expected, atol=1e-4)
    assert torch.allclose(alone.cpu(), expected, atol=1e-4)


@NEEDS_GPU
def test_prune_and_merge_calibrated_on_the_gpu_keeps_its_matrices_there() -> None:
    """Calibration builds M and R on the CPU and puts them on the model's device, so no forward pass copies them."""
    model = tiny_vit().cuda()
    reducer = methods.create("pm", keep_rate=0.5)
    reducer.apply(model)
    reducer.prepare_for_test(model)
    assert {p.device.type for p in [*reducer.M, *reducer.R]} == {"cuda"}


@NEEDS_GPU
@pytest.mark.parametrize("name", ["ltmp", "ltp", "ltm"])
def test_a_threshold_fit_on_the_gpu_moves_the_thresholds_as_on_the_cpu(name: str) -> None:
    """Four SGD steps of the learned-threshold fit from the same start: the thresholds move to the model's device and
    end equal to the CPU's fit (atol 1e-5), and not where they started."""
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 3, 32, 32, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    budget = {"budget_images": 32, "batch_size": 8, "precision": "fp32"}
    ends = {}
    for device in ("cpu", "cuda"):
        model, reducer, _ = with_thresholds(name, seed=0)
        start = {k: v.detach().clone() for k, v in reducer.learned_state().items()}
        model.to(device)
        reducer.fit(model, lambda: ((images[i:i + 8], labels[i:i + 8]) for i in range(0, 32, 8)), budget, progress=False)
        assert {reducer.theta_merge.device.type, reducer.theta_prune.device.type} == {device}
        ends[device] = reducer.learned_state()
    for key, value in ends["cpu"].items():
        assert torch.allclose(ends["cuda"][key].cpu(), value, atol=1e-5), key
    assert any(not torch.equal(ends["cpu"][k], start[k]) for k in start)


def every_method_config(folder: Path, images: Path, device: str) -> Path:
    """Every shipped method on the tiny ViT, on ``device``: fits in bf16, evaluation and latency in fp32 and the
    device's half precision (fp16 on cuda, bf16 on the CPU)."""
    half = "fp16" if device == "cuda" else "bf16"
    config = folder / "every_method.yaml"
    config.write_text(f"""
model: test_tiny_vit
dataset: imagefolder
data: {images}
train_data: {images}
device: {device}
eval_precision: {half}
eval_batch_size: 8
latency: {{precisions: [fp32, {half}], batch_sizes: [1, 8], warmup_iters: 2, warmup_s: 0.0, min_iters: 3, min_time_s: 0.0}}
fit: {{budget_images: 36, batch_size: 6, precision: bf16}}
methods:
  - method: none
  - method: tome
    sweep: {{r: [8]}}
  - method: topk
    sweep: {{keep_rate: [0.5]}}
  - method: ltmp
    sweep: {{r_target: [0.6]}}
  - method: ltp
    sweep: {{r_target: [0.6]}}
  - method: ltm
    sweep: {{r_target: [0.6]}}
  - method: pm
    knobs: {{regime: calibrated, calib_batches: 2}}
    sweep: {{keep_rate: [0.5]}}
  - method: pm
    label: pm-ft
    knobs: {{regime: finetuned, calib_batches: 2}}
    sweep: {{keep_rate: [0.5]}}
""")
    return config


@ON_EVERY_DEVICE
def test_a_whole_run_measures_and_draws_every_method(device: str, tmp_path: Path, tiny_imagefolder: Path) -> None:
    """``run`` on ``device`` (fits, half-precision evaluation and latency, tables, the token maps that reload every
    learned state) stores every cell with its device, and ``plot`` redraws them from the store."""
    store, reports = tmp_path / "s.sqlite", tmp_path / "r"
    checkpoint = tmp_path / "tiny.pt"
    torch.save(make_tiny().state_dict(), checkpoint)
    env = {"TOKENBENCH_PLUGINS": "tests.tiny_model", "HF_HUB_OFFLINE": "1"}
    ran = run_cli("run", "--config", str(every_method_config(tmp_path, tiny_imagefolder, device)), "--checkpoint", str(checkpoint),
                  "--store", str(store), "--reports", str(reports), "--quiet", env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    cells = Store(store).cells()
    assert len(cells) == 8 and cells["device"].str.startswith(device).all()
    assert len(pd.read_csv(reports / "results.csv")) == 8
    assert list(reports.glob("token_maps_*.png"))
    plotted = run_cli("plot", "--store", str(store), "--reports", str(tmp_path / "p"), env=env)
    assert plotted.returncode == 0, plotted.stderr[-3000:]


@ON_EVERY_DEVICE
def test_the_speed_script_measures_every_row(device: str, tmp_path: Path, monkeypatch) -> None:
    """``benchmarks/speed.py all --device DEVICE`` (batch 4, short timings) writes every row, with the GPU's name on
    cuda, and a positive speedup: 4 ToMe rows, 4 LTMP cases and the machinery row, 1 Prune-and-Merge row. On the CPU
    the timings are fixed (their arithmetic is tested in test_speed_benchmark) and the fits short: what is checked there
    is that every model and input of every row is built, fitted and counted on the device."""
    speed = load_script("speed")
    monkeypatch.setattr(speed, "REPORT", tmp_path / "speed.jsonl")
    if device == "cpu":  # fixed timings, and the threshold fits on 128 images instead of the default config's 1,536
        fixed_timings(monkeypatch, speed, [3.0] * 5, [2.0] * 5)
        default = bench_config.load("fmnist_default")
        default["fit"]["budget_images"] = 128
        monkeypatch.setattr(speed, "bench_config", SimpleNamespace(load=lambda name: default))
    precision = "fp16" if device == "cuda" else "fp32"
    assert speed.main(["all", "--device", device, "--precision", precision, "--batch", "4", "--min-time", "0.2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "speed.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(row["device"] == device and row["batch"] == 4 and row["speedup"] > 0 for row in rows)
    assert all(bool(row["env"]["gpu"]) == (device == "cuda") for row in rows)
