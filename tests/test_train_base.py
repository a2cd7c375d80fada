"""``train-base``, the embedded model's training, on a few generated Fashion-MNIST-sized images: an interrupted run
resumes to the very weights of an uninterrupted one, each epoch reads every image once in a new order, and the
manifest describes the checkpoint it sits beside and the stages it continued from."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from bench import data, models, train_base
from bench.errors import BenchError

FLAGS = ["--epochs", "2", "--batch-size", "16", "--save-every", "1", "--quiet"]  # 64 images: 4 steps per epoch


def fake_split(images: int, seed: int) -> data.TensorSplit:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (images, 28, 28), generator=generator, dtype=torch.uint8)
    return data.TensorSplit(pixels, torch.randint(0, 10, (images,), generator=generator), data.FMNIST_CLASSES)


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch) -> Path:
    """64 training and 24 test images instead of Fashion-MNIST's; the checkpoint, its manifest and the resumable
    state written under ``tmp_path``, never into bench/assets."""
    splits = {"train": fake_split(64, 0), "test": fake_split(24, 1)}
    monkeypatch.setattr(train_base.data_mod, "load_fmnist", lambda split, data_dir=None: splits[split])
    monkeypatch.setattr(models, "ASSETS", tmp_path / "assets")
    monkeypatch.setattr(models, "EMBEDDED_CHECKPOINT", tmp_path / "assets" / "vit.pt")
    monkeypatch.setattr(models, "EMBEDDED_MANIFEST", tmp_path / "assets" / "vit.json")
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path


def train(*flags: str) -> dict:
    parser = argparse.ArgumentParser()
    train_base.add_arguments(parser)
    return train_base.train(parser.parse_args([*FLAGS, *flags]))


def test_an_interrupted_training_resumes_to_the_same_weights(workspace: Path, monkeypatch, capsys) -> None:
    """Stopped during step 6 of 8 (the state saved after every step), the rerun of the same command starts at step 5
    and ends with weights bit-equal to those of a run that was never stopped: model, AdamW, one-cycle schedule, the
    augmentation's generator and the epoch's image order all come back."""
    train("--restart")
    uninterrupted = torch.load(models.EMBEDDED_CHECKPOINT, weights_only=True)

    class Stop(Exception):
        pass

    calls = []
    real_augment = train_base.augment

    def augment_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise Stop
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(train_base, "augment", augment_then_stop)
    with pytest.raises(Stop):
        train("--restart")
    monkeypatch.setattr(train_base, "augment", real_augment)
    capsys.readouterr()
    train()
    assert "resuming from step 5/8" in capsys.readouterr().out
    resumed = torch.load(models.EMBEDDED_CHECKPOINT, weights_only=True)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)


def test_the_manifest_describes_its_checkpoint(workspace: Path) -> None:
    """The manifest holds the checkpoint's sha256, the command that reproduces it, the step count (2 epochs x
    64 // 16) and the test top-1 of the written weights; a rerun with other settings refuses the saved state."""
    manifest = train("--restart")
    assert manifest == json.loads(models.EMBEDDED_MANIFEST.read_text())
    assert manifest["sha256"] == models.sha256_file(models.EMBEDDED_CHECKPOINT)
    assert manifest["steps"] == 8 and manifest["test_images"] == 24 and manifest["epochs"] == 2
    assert manifest["command"] == ("python run_bench.py train-base --epochs 2 --batch-size 16 --lr 0.002 "
                                   "--weight-decay 0.05 --warmup 0.1 --label-smoothing 0.1 --max-shift 2 --seed 0 "
                                   "--save-every 1")
    model = models.timm.create_model(models.EMBEDDED_MODEL)
    model.load_state_dict(torch.load(models.EMBEDDED_CHECKPOINT, weights_only=True))
    assert manifest["test_top1"] == train_base.evaluate(model, train_base.data_mod.load_fmnist("test"))
    assert manifest["params"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(BenchError, match="was made with other settings .*: pass --restart to start over"):
        train("--lr", "0.001")


def test_a_second_stage_lists_the_first(workspace: Path) -> None:
    """Continuing from the shipped weights (``--init-from`` the embedded checkpoint) lists the earlier manifest under
    ``stages`` and adds its wall time to the total; a third stage lists both earlier ones, oldest first; from any other
    file the stage is that file and its sha256."""
    first = train("--restart")
    second = train("--restart", "--epochs", "1", "--init-from", str(models.EMBEDDED_CHECKPOINT))
    assert second["stages"] == [first] and second["init_from"] == str(models.EMBEDDED_CHECKPOINT)
    assert second["total_wall_time_s"] == pytest.approx(second["wall_time_s"] + first["wall_time_s"], abs=0.06)
    third = train("--restart", "--epochs", "1", "--init-from", str(models.EMBEDDED_CHECKPOINT))
    assert third["stages"] == [first, {key: value for key, value in second.items() if key != "stages"}]  # oldest first
    assert third["total_wall_time_s"] == pytest.approx(
        third["wall_time_s"] + second["wall_time_s"] + first["wall_time_s"], abs=0.06)
    other = workspace / "other.pt"
    other.write_bytes(models.EMBEDDED_CHECKPOINT.read_bytes())
    fourth = train("--restart", "--epochs", "1", "--init-from", str(other))
    assert fourth["stages"] == [{"init_from": str(other), "sha256": models.sha256_file(other)}]


def test_each_epoch_reads_every_training_image_once_in_a_new_order(workspace: Path, monkeypatch) -> None:
    """Both epochs of 4 batches of 16 hold each of the 64 training images once, in two different orders."""
    batches = []
    monkeypatch.setattr(train_base, "augment", lambda x, generator, max_shift: batches.append(x.sum((1, 2, 3))) or x)
    train("--restart")
    first, second = torch.cat(batches).view(2, 64)  # each image's pixel sum, in the order training read it
    every_image = train_base.data_mod.load_fmnist("train").normalized(torch.arange(64)).sum((1, 2, 3))
    for epoch in (first, second):
        assert torch.allclose(epoch.sort().values, every_image.sort().values, rtol=1e-5)
    assert not torch.allclose(first, second, rtol=1e-5)
