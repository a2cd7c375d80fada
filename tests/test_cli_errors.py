"""Every bad input ends in one line on stderr naming the fix, exit code 2, no traceback, store intact; a bad run
setting fails before any cell is measured (no store file is created)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bench import models
from bench.errors import BenchError
from bench.store import Store
from tests.conftest import ROOT, load_script, run_cli
from tests.tiny_model import test_tiny_parallel_vit as make_tiny_parallel
from tests.tiny_model import test_tiny_vit as make_tiny

PLUGIN_ENV = {"TOKENBENCH_PLUGINS": "tests.tiny_model", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_imagefolder) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    good = root / "good.pt"
    torch.save(make_tiny().state_dict(), good)
    other = root / "other.pt"
    torch.save(make_tiny(depth=3).state_dict(), other)
    parallel = root / "parallel.pt"
    torch.save(make_tiny_parallel().state_dict(), parallel)
    corrupt = root / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:1000])
    foreign = root / "foreign.sqlite"
    foreign.write_bytes(b"SQLite format 3\x00" + b"\x01" * 500)
    (root / "junk").mkdir()
    (root / "junk" / "readme.txt").write_text("no images here")
    (root / "a_file").write_text("x")
    for name in ("cat", "dog"):
        shutil.copytree(tiny_imagefolder / "red", root / "two_classes" / name)
    config = root / "unknown_key.yaml"
    config.write_text("model: test_tiny_vit\nbatchsize: 3\n")
    bad_method = root / "bad_method.yaml"
    bad_method.write_text("methods:\n  - method: nope\n")
    bad_dataset = root / "bad_dataset.yaml"
    bad_dataset.write_text("dataset: cifar\n")
    return {"root": root, "good": good, "other": other, "parallel": parallel, "corrupt": corrupt, "foreign": foreign,
            "junk": root / "junk", "file": root / "a_file", "folder": tiny_imagefolder, "config": config,
            "bad_method": bad_method, "bad_dataset": bad_dataset, "two_classes": root / "two_classes"}


def tiny_args(files: dict[str, Path], *extra: str) -> list[str]:
    return ["run", "--model", "test_tiny_vit", "--data", str(files["folder"]), "--train-data", str(files["folder"]),
            "--checkpoint", str(files["good"]), "--store", str(files["root"] / "store.sqlite"),
            "--reports", str(files["root"] / "reports"), "--quiet", *extra]


CASES = {
    "unknown method": (lambda f: ["run", "--config", str(f["bad_method"])], "unknown method 'nope'"),
    "unknown --methods": (lambda f: tiny_args(f, "--methods", "nope"), "or load your plug-in with --plugins MODULE"),
    "unknown model": (lambda f: ["run", "--model", "no_such_vit", "--data", str(f["folder"])], "unknown model"),
    "unknown dataset": (lambda f: ["run", "--config", str(f["bad_dataset"]), "--checkpoint", str(f["good"])], "unknown dataset"),
    "non-ViT model": (lambda f: ["run", "--model", "resnet18", "--data", str(f["folder"])], "not a timm VisionTransformer"),
    "impossible knob": (lambda f: ["run", "--config", str(f["root"] / "bad_knob.yaml")], "outside"),
    "missing fmnist": (lambda f: ["run", "--data-dir", str(f["root"] / "nowhere")], "apt-get install dataset-fashion-mnist"),
    "fmnist dir of the wrong format": (lambda f: ["run", "--data-dir", str(f["junk"])], "--data-dir"),
    "imagefolder with other classes than the model": (lambda f: tiny_args(f, "--data", str(f["two_classes"])),
                                                       "has 2 class folders but the model predicts 3 classes"),
    "imagefolder of the wrong format": (lambda f: ["run", "--model", "test_tiny_vit", "--data", str(f["junk"])], "ImageFolder"),
    "missing imagefolder": (lambda f: ["run", "--model", "test_tiny_vit", "--data", str(f["root"] / "nope")], "does not exist"),
    "missing checkpoint": (lambda f: tiny_args(f, "--checkpoint", str(f["root"] / "nope.pt")), "not found: pass --checkpoint PATH"),
    "corrupt checkpoint": (lambda f: tiny_args(f, "--checkpoint", str(f["corrupt"])), "corrupt"),
    "checkpoint of another architecture": (lambda f: tiny_args(f, "--checkpoint", str(f["other"])), "unexpected ['blocks.2"),
    "cuda without a GPU": (lambda f: tiny_args(f, "--device", "cuda"), "no CUDA GPU"),
    "store not writable": (lambda f: tiny_args(f, "--store", str(f["file"] / "s.sqlite")), "writable"),
    "store not ours": (lambda f: tiny_args(f, "--store", str(f["foreign"])), "left untouched"),
    "empty after --limit": (lambda f: tiny_args(f, "--limit", "0"), "--limit"),
    "unknown config key": (lambda f: ["run", "--config", str(f["config"])], "unknown config key 'batchsize'"),
    "pretrained offline": (lambda f: ["run", "--model", "deit_tiny_patch16_224", "--pretrained", "--data", str(f["folder"])], "--checkpoint"),
    "reports not writable": (lambda f: tiny_args(f, "--reports", str(f["file"] / "r")), "writable"),
    "zero latency batch": (lambda f: tiny_args(f, "--batch-sizes", "1,0"), "latency batch size must be a positive"),
    "batch sizes not numbers": (lambda f: tiny_args(f, "--batch-sizes", "1,big"), "e.g. --batch-sizes 1,32"),
    "fp16 latency on the CPU": (lambda f: tiny_args(f, "--precisions", "fp32,fp16"),
                                "latency.precisions (--precisions) asks for fp16, and fp16 autocast is for CUDA"),
    "fp16 evaluation on the CPU": (lambda f: tiny_args(f, "--eval-precision", "fp16"),
                                   "eval_precision (--eval-precision) asks for fp16"),
    "training methods without --train-data": (lambda f: ["run", "--model", "test_tiny_vit", "--data", str(f["folder"]),
                                                         "--checkpoint", str(f["good"])], "ltmp, ltp, pm learn from training images"),
    "negative threads": (lambda f: tiny_args(f, "--threads", "-2"), "threads must be a positive"),
    "seed not a number": (lambda f: tiny_args(f, "--seed", "0,x"), "e.g. --seed 0 or --seed 0,1,2"),
    "negative seed": (lambda f: tiny_args(f, "--seed=1,-1"), "seeds are whole numbers from 0"),
    "zero threads": (lambda f: tiny_args(f, "--threads", "0"), "threads must be a positive whole number (got 0)"),
    "--methods naming nothing": (lambda f: tiny_args(f, "--methods", ","), "--methods ',' names no method"),
    "--train-data on Fashion-MNIST": (lambda f: ["run", "--train-data", str(f["folder"]), "--methods", "ltp"],
                                      "whose methods fit on its own training split"),
    "--data-dir on an ImageFolder": (lambda f: tiny_args(f, "--data-dir", str(f["root"])),
                                     "names Fashion-MNIST's files, but this run evaluates an ImageFolder"),
    "plug-in failing while importing": (lambda f: ["list", "--plugins", str(f["root"] / "raises.py")],
                                        "raises.py:2: RuntimeError: my plug-in is broken: fix the plug-in"),
    "data in a Fashion-MNIST config": (lambda f: ["run", "--config", str(f["root"] / "data_on_fmnist.yaml")],
                                       "set `dataset: imagefolder` in the config"),
    "fit budget of no epochs": (lambda f: tiny_args(f, "--config", str(f["root"] / "bad_budget.yaml")),
                                "fit.budget_epochs must be a number of passes over the training set > 0"),
    "entry's fit budget of negative images": (lambda f: tiny_args(f, "--config", str(f["root"] / "bad_entry_budget.yaml")),
                                              "methods[ltp].fit.budget_images must be a whole number of images >= 0"),
    "entry's fit in fp16 on the CPU": (lambda f: tiny_args(f, "--config", str(f["root"] / "fp16_entry_fit.yaml")),
                                       "methods[ltp].fit.precision asks for fp16"),
    "entry's fit batch of zero": (lambda f: tiny_args(f, "--config", str(f["root"] / "zero_entry_batch.yaml")),
                                  "methods[ltmp].fit.batch_size must be a positive whole number"),
    "one label on two methods": (lambda f: tiny_args(f, "--config", str(f["root"] / "shared_label.yaml")),
                                 "config label 'x' names entries of two methods (tome and topk)"),
    "label holding a comma": (lambda f: tiny_args(f, "--config", str(f["root"] / "comma_label.yaml")),
                              "config methods[a,b].label holds ','"),
    "knob impossible on this model": (lambda f: tiny_args(f, "--config", str(f["root"] / "too_many_merges.yaml")),
                                      "knob tome.r=40 merges more than half of the 64 patch tokens"),
    "ViT that token reducers cannot patch": (lambda f: tiny_args(f, "--model", "test_tiny_parallel_vit", "--checkpoint",
                                                                 str(f["parallel"])),
                                             "block 0 (ParallelScalingBlock) is not a timm pre-norm Block"),
    "train-base with no epochs": (lambda f: ["train-base", "--epochs", "0"], "--epochs 0 is impossible"),
    "train-base from a missing checkpoint": (lambda f: ["train-base", "--init-from", str(f["root"] / "nope.pt")],
                                             "not found: pass --init-from PATH"),
    "train-base from another architecture": (lambda f: ["train-base", "--init-from", str(f["other"])],
                                             "pass --init-from a checkpoint of this model"),
    "train-base batch over the data": (lambda f: ["train-base", "--batch-size", "100000"], "exceeds the 60000 training"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case: str, files: dict[str, Path]) -> None:
    (files["root"] / "bad_knob.yaml").write_text("model: test_tiny_vit\nmethods:\n  - method: tome\n    sweep: {r: [-3]}\n")
    (files["root"] / "bad_budget.yaml").write_text("dataset: imagefolder\nfit: {budget_epochs: 0}\nmethods:\n  - method: ltp\n")
    (files["root"] / "bad_entry_budget.yaml").write_text("dataset: imagefolder\nmethods:\n  - method: ltp\n"
                                                         "    fit: {budget_images: -5}\n")
    (files["root"] / "fp16_entry_fit.yaml").write_text("dataset: imagefolder\nmethods:\n  - method: none\n"
                                                       "  - method: ltp\n    fit: {precision: fp16}\n")
    (files["root"] / "raises.py").write_text("import torch\nraise RuntimeError('my plug-in is broken')\n")
    (files["root"] / "data_on_fmnist.yaml").write_text(f"data: {files['folder']}\nmethods:\n  - method: none\n")
    (files["root"] / "zero_entry_batch.yaml").write_text("dataset: imagefolder\nmethods:\n  - method: ltmp\n"
                                                         "    fit: {batch_size: 0}\n")
    (files["root"] / "shared_label.yaml").write_text("dataset: imagefolder\nmethods:\n  - method: tome\n    label: x\n"
                                                     "  - method: topk\n    label: x\n")
    (files["root"] / "too_many_merges.yaml").write_text("dataset: imagefolder\nmethods:\n  - method: none\n"
                                                        "  - method: tome\n    sweep: {r: [40]}\n")
    (files["root"] / "comma_label.yaml").write_text("dataset: imagefolder\nmethods:\n  - method: tome\n    label: a,b\n")
    make_args, expected = CASES[case]
    foreign_before = files["foreign"].read_bytes()
    (files["root"] / "store.sqlite").unlink(missing_ok=True)  # each case starts without it (another may have failed)
    result = run_cli(*make_args(files), env=PLUGIN_ENV)
    assert result.returncode == 2, (case, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr[-2000:])
    assert expected in lines[0], (case, lines[0])
    assert "Traceback" not in result.stderr
    assert files["foreign"].read_bytes() == foreign_before
    assert not (files["root"] / "store.sqlite").exists(), (case, "failed only after measuring")


def test_store_with_results_survives_a_failing_run(files: dict[str, Path], tmp_path: Path) -> None:
    store_path = tmp_path / "kept.sqlite"
    ok = run_cli(*tiny_args(files, "--store", str(store_path), "--reports", str(tmp_path / "r"), "--methods", "none",
                            "--precisions", "fp32", "--batch-sizes", "2", "--limit", "4"), env={**PLUGIN_ENV})
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = store_path.read_bytes()
    bad = run_cli(*tiny_args(files, "--store", str(store_path), "--checkpoint", str(files["corrupt"])), env=PLUGIN_ENV)
    assert bad.returncode == 2
    assert store_path.read_bytes() == before and len(Store(store_path).cells()) == 1


def test_corrupt_or_missing_embedded_checkpoint_names_the_retrain_command(tmp_path: Path, monkeypatch) -> None:
    if not models.EMBEDDED_CHECKPOINT.is_file():
        pytest.fail("the embedded checkpoint is not committed: run `python run_bench.py train-base`")
    broken = tmp_path / "broken.pt"
    shutil.copyfile(models.EMBEDDED_CHECKPOINT, broken)
    with open(broken, "r+b") as handle:
        handle.seek(2000)
        handle.write(b"\x00\x01\x02\x03")
    monkeypatch.setattr(models, "EMBEDDED_CHECKPOINT", broken)
    with pytest.raises(BenchError, match="run_bench.py train-base"):
        models.verify_embedded_checkpoint()
    monkeypatch.setattr(models, "EMBEDDED_CHECKPOINT", tmp_path / "missing.pt")
    with pytest.raises(BenchError, match="run_bench.py train-base"):
        models.create(models.EMBEDDED_MODEL)


SPEED_CASES = {
    "cuda without a GPU": (["all", "--device", "cuda", "--precision", "fp16", "--batch", "256"], "no CUDA GPU"),
    "fp16 on the CPU": (["ltmp", "--precision", "fp16"], "--precision asks for fp16"),
    "unknown device": (["ltmp", "--device", "tpu"], "unknown device 'tpu'"),
    "empty batch": (["tome", "--batch", "0"], "--batch must be positive"),
    "no threads": (["pm", "--threads", "-1"], "--threads must be positive"),
    "no timing window": (["ltmp", "--min-time", "0"], "--min-time must be positive"),
}


@pytest.mark.parametrize("case", sorted(SPEED_CASES))
def test_speed_benchmark_bad_option_is_one_line_and_exit_2(case: str, capsys, monkeypatch) -> None:
    """``benchmarks/speed.py`` checks its options before it builds a model or times anything."""
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    speed = load_script("speed")
    for bench in ("bench_tome", "bench_ltmp", "bench_pm"):
        monkeypatch.setattr(speed, bench, lambda args: pytest.fail("built a benchmark despite a bad option"))
    argv, expected = SPEED_CASES[case]
    assert speed.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_speed_benchmark_without_fashion_mnist_is_one_line_and_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    """``speed.py ltmp`` times the embedded model on real test images: without them it names the fix, no traceback."""
    speed = load_script("speed")
    monkeypatch.setenv("TOKENBENCH_FMNIST_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(speed, "REPORT", tmp_path / "speed.jsonl")
    assert speed.main(["ltmp"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "dataset-fashion-mnist" in lines[0], lines
    assert not (tmp_path / "speed.jsonl").exists()


def test_a_closed_output_pipe_ends_quietly() -> None:
    """`run_bench.py list | head -1`: the reader closes the pipe before the listing is written; the command must
    stop without a traceback (it printed a BrokenPipeError traceback). Its 4 kB fit the pipe's buffer: with stdout
    buffered, as in a shell, the write fails only when the listing is flushed."""
    import os
    import subprocess
    import sys

    buffered = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # as in a shell
    with subprocess.Popen([sys.executable, str(ROOT / "run_bench.py"), "list"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**buffered, "PYTHONPATH": str(ROOT)}) as proc:
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=120) == 141
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
