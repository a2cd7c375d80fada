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


def test_evaluation_reads_a_model_left_in_training_mode_in_eval_mode() -> None:
    """The top-1 after each epoch comes from the model in eval mode: its conv stem's batch norms use and keep their
    running statistics (in training mode each test batch would overwrite them)."""
    torch.manual_seed(0)
    model = models.timm.create_model(models.EMBEDDED_MODEL).train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    test = fake_split(48, 1)
    assert 0 <= train_base.evaluate(model, test, batch_size=16) <= 1
    assert not model.training
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize(("flag", "impossible", "edge"), [
    ("epochs", 0, 1), ("batch_size", 0, 1), ("lr", 0.0, 1e-9), ("weight_decay", -0.01, 0.0), ("warmup", 1.0, 0.99),
    ("warmup", -0.1, 0.0), ("label_smoothing", 1.0, 0.99), ("max_shift", -1, 0), ("save_every", 0, 1)])
def test_each_recipe_flag_is_refused_just_past_its_edge(flag: str, impossible: float, edge: float) -> None:
    """Every recipe flag takes its last possible value and refuses the next one, naming the flag before any data is
    read."""
    train_base.check_arguments(argparse.Namespace(**{**train_base.DEFAULTS, flag: edge}))
    with pytest.raises(BenchError, match=rf"^--{flag.replace('_', '-')} {impossible} is impossible: it must be "):
        train_base.check_arguments(argparse.Namespace(**{**train_base.DEFAULTS, flag: impossible}))


def test_the_recipe_flags_reach_the_optimiser_schedule_loss_and_augmentation(workspace: Path, monkeypatch) -> None:
    """``--weight-decay 0.02 --warmup 0.25 --label-smoothing 0.2 --max-shift 1`` over 8 steps: AdamW decays the
    matrices by 0.02 and the biases, norms, position embedding and CLS token by 0, the one-cycle warm-up ends after
    step 2 (0.25 x 8, its phase ending at step index 1), each loss smooths by 0.2, each batch moves by up to 1 pixel,
    and each step clips the gradient's norm at 1.0; the manifest quotes the recipe."""
    seen: dict[str, set] = {"max_shift": set(), "label_smoothing": set(), "max_norm": set()}
    real_cross_entropy, real_clip = train_base.F.cross_entropy, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(train_base, "augment", lambda x, generator, max_shift: seen["max_shift"].add(max_shift) or x)
    monkeypatch.setattr(train_base.F, "cross_entropy", lambda *args, label_smoothing: (
        seen["label_smoothing"].add(label_smoothing), real_cross_entropy(*args, label_smoothing=label_smoothing))[1])
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda parameters, max_norm: (
        seen["max_norm"].add(max_norm), real_clip(parameters, max_norm))[1])
    manifest = train("--restart", "--weight-decay", "0.02", "--warmup", "0.25", "--label-smoothing", "0.2",
                     "--max-shift", "1")
    assert seen == {"max_shift": {1}, "label_smoothing": {0.2}, "max_norm": {1.0}}
    state = torch.load(workspace / "cache" / "train_base" / "state.pt", weights_only=False)
    decayed, not_decayed = state["optimizer"]["param_groups"]
    model = models.timm.create_model(models.EMBEDDED_MODEL)
    exempt = [name for name, p in model.named_parameters() if p.ndim <= 1 or name in ("pos_embed", "cls_token")]
    assert (decayed["weight_decay"], not_decayed["weight_decay"]) == (0.02, 0.0)
    assert (len(not_decayed["params"]), len(decayed["params"])) == (len(exempt), len(list(model.parameters())) - len(exempt))
    assert state["schedule"]["_schedule_phases"][0]["end_step"] == 0.25 * 8 - 1
    assert manifest["recipe"].startswith("AdamW (lr 2e-3, weight decay 0.05") and manifest["recipe"].endswith("seeded.")
