"""The runner's bookkeeping: a cell's row holds what its fit and its evaluation measured, field by field; the commit
it records says whether the tree held uncommitted changes; the seed orders the training images; fit budgets in epochs
become images; impossible settings and limits are refused or noted before anything is measured."""
from __future__ import annotations

import hashlib
import io
import re
import subprocess
from pathlib import Path

import pytest
import torch

import methods
from bench import config as config_mod
from bench import data, runner
from bench.accuracy import evaluate
from bench.errors import BenchError
from bench.flops import embed_macs
import tests.tiny_model  # noqa: F401  (registers test_tiny_vit)
from tests.conftest import image_batch, tiny_vit
from tests.test_ltmp import stub_fit_clock
from tests.test_store import tiny_config

LTMP_KNOBS = {"r_target": 0.7, "init_merge": 0.7, "init_prune": 0.01}  # on tiny_vit: 41-54 tokens after the last block


def workload(images: torch.Tensor, labels: torch.Tensor) -> runner.Workload:
    config = {"fit": {"budget_images": 0, "batch_size": 4, "precision": "fp32"}, "model": "m", "seed": 0,
              "eval_precision": "fp32", "latency": {"precisions": []}}
    return runner.Workload(config, tiny_vit(), "sha", "d", len(images), lambda: iter([(images[:5], labels[:5]),
                                                                                      (images[5:], labels[5:])]),
                           lambda: iter([(images, labels)]), "cpu", train_images=len(images))


def test_a_cells_row_holds_what_its_evaluation_measured() -> None:
    """An LTMP cell whose images keep different token counts: the row's top-5, per-image GMACs range, token counts
    per block (attention and MLP, mean, min and max) and r_FLOPs equal an evaluation of the same patched model run
    here. Each label is the model's second guess, so top-1 (0) and top-5 (1) differ."""
    images = image_batch(tiny_vit(), 8, seed=1)
    patched = methods.create("ltmp", **LTMP_KNOBS).apply(tiny_vit())
    with torch.no_grad():
        labels = patched(images).topk(2).indices[:, 1]
    work = workload(images, labels)
    row = runner.measure_cell(work, {"method": "ltmp"}, LTMP_KNOBS, None, False)
    dims = patched._reduction_ctx.dims
    result = evaluate(patched, work.eval_batches(), embed_macs(patched, dims), progress=False)
    macs_mean, macs_min, macs_max = result.macs_summary()
    tokens = result.tokens_mean()
    assert macs_min < macs_mean < macs_max and (result.token_min < result.token_max).any()  # the fields differ
    assert (row["top1"], row["top5"], row["eval_images"]) == (result.top1, result.top5, 8) == (0.0, 1.0, 8)
    assert (row["gmacs"], row["gmacs_min"], row["gmacs_max"]) == (macs_mean / 1e9, macs_min / 1e9, macs_max / 1e9)
    assert row["tokens_attn"] == tokens[:, 0].tolist() and row["tokens_mlp"] == tokens[:, 1].tolist()
    assert row["tokens_attn"] != row["tokens_mlp"]
    assert row["tokens_attn_min"] == result.token_min[:, 0].tolist()
    assert row["tokens_attn_max"] == result.token_max[:, 0].tolist()
    assert row["r_flops"] == runner.evaluation_r_flops(tokens, dims)


def test_a_cell_is_evaluated_in_evaluation_mode_whatever_its_fit_left(monkeypatch) -> None:
    """A fit that leaves the model in training mode (a plug-in's may) changes nothing in the evaluation: with dropout
    0.5 in every block, the row's token counts are those of the patched model in evaluation mode."""
    fit = methods.REGISTRY["ltmp"].fit

    def fit_then_train(self, model, *args, **kwargs):
        report = fit(self, model, *args, **kwargs)
        model.train()
        return report

    monkeypatch.setattr(methods.REGISTRY["ltmp"], "fit", fit_then_train)
    images = image_batch(tiny_vit(), 8, seed=1)
    work = workload(images, torch.zeros(8, dtype=torch.long))
    work.model = tiny_vit(proj_drop_rate=0.5)
    row = runner.measure_cell(work, {"method": "ltmp"}, LTMP_KNOBS, None, False)
    patched = methods.create("ltmp", **LTMP_KNOBS).apply(tiny_vit(proj_drop_rate=0.5))
    result = evaluate(patched, work.eval_batches(), embed_macs(patched, patched._reduction_ctx.dims), progress=False)
    assert row["tokens_attn"] == result.tokens_mean()[:, 0].tolist()


def test_a_cells_row_records_its_fit(monkeypatch) -> None:
    """A fitting method's row records the fit's settings, device, steps (skipped ones too: 0 of 2), wall time and the
    thresholds it learned; a method that does not fit records no fit, no device and no images."""
    stub_fit_clock(monkeypatch, 10.0, 13.5)
    images = image_batch(tiny_vit(), 8, seed=1)
    work = workload(images, torch.zeros(8, dtype=torch.long))
    work.config["fit"]["budget_images"] = 16  # two passes over the 8 training images, one step each
    row = runner.measure_cell(work, {"method": "ltmp"}, LTMP_KNOBS, None, False)
    assert row["fit"] == work.config["fit"] and row["ft_device"] == "cpu"
    assert (row["ft_images"], row["ft_epochs"]) == (16, 2.0)
    assert row["ft_extra"]["steps"] == 2 and row["ft_extra"]["skipped_steps"] == 0
    assert row["ft_extra"]["r_target"] == 0.7 and row["ft_wall_s"] == 3.5
    learned = torch.load(io.BytesIO(row["learned_state"]), weights_only=True)
    assert learned.keys() == {"theta_merge", "theta_prune"}
    assert not torch.equal(learned["theta_merge"], torch.full((4,), 0.7))  # moved from its init
    tome = runner.measure_cell(work, {"method": "tome"}, {"r": 4}, None, False)
    assert (tome["fit"], tome["ft_device"], tome["ft_images"], tome["ft_epochs"]) == (None, None, 0, 0.0)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_the_recorded_commit_says_whether_the_tree_was_changed(tmp_path: Path, monkeypatch) -> None:
    """The commit of the checkout; ``-dirty`` once a tracked file differs from it (an untracked file does not count,
    reports/ holds untracked results); ``unknown`` outside a git checkout."""
    monkeypatch.setattr(runner, "PROJECT_ROOT", tmp_path)
    assert runner.git_commit() == "unknown"
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-qm", "a")
    head = git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "untracked.txt").write_text("results")
    assert runner.git_commit() == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert runner.git_commit() == f"{head}-dirty"


def test_the_seed_orders_the_training_images(tmp_path: Path, tiny_imagefolder: Path) -> None:
    """A fit reads the training images in an order drawn from the seed: the same seed gives the same order every
    time, another seed another order, and every order holds each of the 18 images once."""
    def training_order(seed: int) -> list[float]:
        config = config_mod.load(str(tiny_config(tmp_path, tiny_imagefolder, [2])))
        config.update(seed=seed, train_data=str(tiny_imagefolder), workers=0)
        config["fit"]["batch_size"] = 4
        config["methods"].append({"method": "ltp"})
        work = runner.prepare(config)
        return [float(image.sum()) for x, _ in work.train_batches() for image in x]

    first = training_order(0)
    assert len(first) == len(set(first)) == 18
    assert training_order(0) == first and training_order(1) != first and sorted(training_order(1)) == sorted(first)


def test_the_seed_orders_the_fashion_mnist_training_split() -> None:
    """Fashion-MNIST's fits read the training split in a seeded order too, not in file order: the first batch
    differs from the file's first images and between seeds, and is the same for the same seed."""
    def first_batch(seed: int) -> torch.Tensor:
        config = config_mod.load(None)
        config.update(seed=seed, limit=4, methods=[{"method": "ltp"}])
        config["fit"]["batch_size"] = 8
        x, _ = next(iter(runner.prepare(config).train_batches()))
        return x

    in_file_order = data.load_fmnist("train").normalized(torch.arange(8))
    first = first_batch(0)
    assert not torch.equal(first, in_file_order) and not torch.equal(first_batch(1), first)
    assert torch.equal(first_batch(0), first)


def test_prepare_reads_fashion_mnist_as_the_config_says(monkeypatch) -> None:
    """The evaluation images are the seeded subset of the test split (seed 3, 10 images) in batches of
    ``eval_batch_size`` (4, 4, 2); the fits read batches of ``fit.batch_size`` (3); ``threads`` sets torch's."""
    threads = []
    monkeypatch.setattr(runner.torch, "set_num_threads", threads.append)
    config = config_mod.load(None)
    config.update(seed=3, limit=10, threads=1, eval_batch_size=4, methods=[{"method": "ltp"}])
    config["fit"]["batch_size"] = 3
    work = runner.prepare(config)
    assert threads == [1]
    batches = list(work.eval_batches())
    assert [len(y) for _, y in batches] == [4, 4, 2]
    test = data.load_fmnist("test")
    subset = data.seeded_subset_indices(len(test), 10, 3)
    assert not torch.equal(subset, data.seeded_subset_indices(len(test), 10, 0))
    assert torch.equal(torch.cat([x for x, _ in batches]), test.normalized(subset))
    assert torch.equal(torch.cat([y for _, y in batches]), test.labels[subset])
    assert len(next(iter(work.train_batches()))[1]) == 3


def test_a_checkpoint_is_recorded_by_its_file_hash(tmp_path: Path, tiny_imagefolder: Path) -> None:
    """The cells of a run from ``--checkpoint`` name their weights by the SHA-256 of the file."""
    checkpoint = tmp_path / "weights.pt"
    torch.save(runner.models.create("test_tiny_vit").state_dict(), checkpoint)
    config = config_mod.load(str(tiny_config(tmp_path, tiny_imagefolder, [2])))
    config.update(checkpoint=str(checkpoint), workers=0)
    assert runner.prepare(config).checkpoint_sha == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_a_budget_in_epochs_is_rounded_up_to_whole_images() -> None:
    """Half a pass over 7 training images is 4 images (3.5 rounded up, so the fit sees at least what was asked);
    an entry's own budget overrides the config's, and the epochs become images in the fit settings."""
    config = {"fit": {"budget_images": 100, "budget_epochs": 0.5, "batch_size": 2}}
    work = runner.Workload(config, torch.nn.Identity(), "sha", "d", 1, None, None, "cpu", train_images=7)
    assert runner.fit_budget(work, {"method": "ltp"}) == {"budget_images": 4, "batch_size": 2}
    assert runner.fit_budget(work, {"method": "ltp", "fit": {"budget_epochs": 3}}) == {"budget_images": 21,
                                                                                        "batch_size": 2}
    assert runner.fit_budget(work, {"method": "ltp", "fit": {"budget_epochs": None}})["budget_images"] == 100


def test_the_ends_of_each_settings_range_pass() -> None:
    """A fit budget of 0 images (a learned method at its initial parameters), no warm-up and no timing window (0 s),
    batches and iteration counts of 1."""
    config = config_mod.load(None)
    config["fit"]["budget_images"] = 0
    config["latency"].update(warmup_s=0, min_time_s=0.0, batch_sizes=[1], min_iters=1)
    config["eval_batch_size"] = 1
    runner.check_settings(config, "cpu")


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("eval_batch_size", True, "eval_batch_size must be a positive whole number (got True)"),
    ("latency.batch_sizes", [1, True], "latency batch size must be a positive whole number (got True)"),
    ("latency.min_iters", 2.5, "latency.min_iters must be a positive whole number (got 2.5)"),
    ("latency.warmup_s", -1, "latency.warmup_s must be a number of seconds >= 0 (got -1)"),
    ("latency.min_time_s", "1", "latency.min_time_s must be a number of seconds >= 0 (got '1')"),
    ("fit.budget_images", True, "fit.budget_images must be a whole number of images >= 0 (got True)"),
    ("fit.budget_epochs", True, "fit.budget_epochs must be a number of passes over the training set > 0"),
    ("fit.budget_epochs", 0, "fit.budget_epochs must be a number of passes over the training set > 0"),
])
def test_impossible_counts_are_refused_before_the_run(setting: str, value, message: str) -> None:
    """Counts must be whole numbers (YAML's ``true`` is a bool, which Python counts as the int 1: refused too),
    times numbers of seconds, budgets in range; each with its one-line error, before any cell is measured."""
    config = config_mod.load(None)
    runner.check_settings(config, "cpu")  # the default config passes
    section, _, key = setting.rpartition(".")
    (config[section] if section else config)[key] = value
    with pytest.raises(BenchError, match=re.escape(message)):
        runner.check_settings(config, "cpu")


def test_a_limit_above_the_images_is_noted_and_one_below_is_not(tiny_imagefolder: Path, capsys, monkeypatch) -> None:
    """``--limit`` above the folder's 18 images evaluates all 18 with a note; a limit of 18 or fewer draws that many,
    silently. A run whose images cannot give every rank one is refused (here a rank's shard made empty)."""
    config = {**config_mod.load(None), "model": "test_tiny_vit", "dataset": "imagefolder",
              "data": str(tiny_imagefolder), "data_dir": None, "methods": [{"method": "none"}], "workers": 0}
    for limit, images, noted in ((50, 18, True), (18, 18, False), (5, 5, False)):
        assert runner.prepare({**config, "limit": limit}).eval_images == images
        assert ("note: --limit" in capsys.readouterr().err) == noted
    monkeypatch.setattr(runner.distributed, "shard", lambda indices: indices[:0])
    with pytest.raises(BenchError, match="5 images cannot be shared by more ranks: use fewer processes or a larger "
                                         "--limit"):
        runner.prepare({**config, "limit": 5})
