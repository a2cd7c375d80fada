"""Train the embedded Fashion-MNIST ViT (``python run_bench.py train-base``).

Recipe (written into the manifest): AdamW (lr 2e-3, weight decay 0.05, betas 0.9/0.999), one-cycle schedule
(10 % warm-up, cosine down), batch 128, label smoothing 0.1, bf16 autocast on CPU, gradient clipping at 1.0,
augmentation = random horizontal flip + random translation of up to 2 pixels (zero padding), seeded.

A later stage can continue from the shipped weights (``--init-from bench/assets/vit_fmnist_convstem.pt`` with
its own schedule); the manifest then lists the earlier stages.

Resumable: after every ``--save-every`` steps and every epoch the full training state (model, optimiser,
schedule, RNG, step) goes to ``<cache>/train_base/state.pt``; rerunning the same command continues from it.
At the end the weights are written to ``bench/assets`` with a JSON manifest (command, seed, epochs, wall
time, device, test top-1, sha256).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench import data as data_mod
from bench import models
from bench.errors import BenchError

DEFAULTS = dict(epochs=6, batch_size=128, lr=2e-3, weight_decay=0.05, warmup=0.1, label_smoothing=0.1,
                max_shift=2, seed=0, save_every=100)
#: what each recipe flag sets (``train-base --help``)
RECIPE_HELP = dict(epochs="passes over the 60,000 training images", batch_size="images per optimiser step",
                   lr="AdamW's peak learning rate (one-cycle schedule)", weight_decay="AdamW's weight decay",
                   warmup="fraction of the steps spent warming the learning rate up",
                   label_smoothing="cross-entropy label smoothing",
                   max_shift="largest random translation in pixels (augmentation)", seed="seed of every random draw",
                   save_every="steps between saves of the resumable training state")


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random horizontal flip and integer translation. ``x: (B, 1, H, W)`` float -> same shape."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if max_shift:
        padded = F.pad(x, (max_shift,) * 4, value=float(x.min()))
        dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, 1, h, w + 2 * max_shift)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, 1, h, w)
        x = x.gather(3, cols)
    return x


@torch.inference_mode()
def evaluate(model: torch.nn.Module, split: data_mod.TensorSplit, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        index = slice(start, start + batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(split.normalized(index))
        correct += int((logits.argmax(-1) == split.labels[index]).sum())
    return correct / len(split)


def check_arguments(args: argparse.Namespace) -> None:
    """Raise :class:`BenchError` naming the flag for a setting training cannot run with (before any data is read)."""
    rules = {"epochs": (args.epochs >= 1, "at least 1"), "batch_size": (args.batch_size >= 1, "at least 1"),
             "lr": (args.lr > 0, "positive"), "weight_decay": (args.weight_decay >= 0, "0 or more"),
             "warmup": (0 <= args.warmup < 1, "a fraction of the steps in [0, 1)"),
             "label_smoothing": (0 <= args.label_smoothing < 1, "in [0, 1)"),
             "max_shift": (args.max_shift >= 0, "0 or more pixels"), "save_every": (args.save_every >= 1, "at least 1")}
    for key, (ok, allowed) in rules.items():
        if not ok:
            raise BenchError(f"--{key.replace('_', '-')} {getattr(args, key)} is impossible: it must be {allowed}")


def train(args: argparse.Namespace) -> dict:
    check_arguments(args)
    torch.manual_seed(args.seed)
    state_path = data_mod.cache_dir() / "train_base" / "state.pt"
    state_path.parent.mkdir(parents=True, exist_ok=True)
    train_split = data_mod.load_fmnist("train", args.data_dir)
    test_split = data_mod.load_fmnist("test", args.data_dir)
    model = models.timm.create_model(models.EMBEDDED_MODEL)
    previous_stages: list[dict] = []
    if args.init_from:
        init = Path(args.init_from)
        models.load_checkpoint(model, init, flag="--init-from")
        if init.resolve() == models.EMBEDDED_CHECKPOINT.resolve() and models.EMBEDDED_MANIFEST.is_file():
            earlier = json.loads(models.EMBEDDED_MANIFEST.read_text())
            previous_stages = earlier.pop("stages", []) + [earlier]
        else:
            previous_stages = [{"init_from": str(init), "sha256": models.sha256_file(init)}]
    steps_per_epoch = len(train_split) // args.batch_size
    if steps_per_epoch == 0:
        raise BenchError(f"--batch-size {args.batch_size} exceeds the {len(train_split)} training images: pass a smaller one")
    total_steps = steps_per_epoch * args.epochs
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps,
                                                   pct_start=args.warmup, anneal_strategy="cos")
    generator = torch.Generator().manual_seed(args.seed)
    step, elapsed = 0, 0.0
    config = {k: getattr(args, k) for k in DEFAULTS} | ({"init_from": str(args.init_from)} if args.init_from else {})
    if state_path.is_file() and not args.restart:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["config"] != config:
            raise BenchError(f"{state_path} was made with other settings {state['config']}: pass --restart to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resuming from step {step}/{total_steps}")

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "generator": generator.get_state(), "step": step, "elapsed": elapsed, "config": config}, tmp)
        tmp.replace(state_path)

    progress = tqdm(total=total_steps, initial=step, desc="train-base", disable=args.quiet, mininterval=5)
    while step < total_steps:
        epoch = step // steps_per_epoch
        order = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        model.train()
        tic = time.perf_counter()
        for batch_index in range(step % steps_per_epoch, steps_per_epoch):
            index = order[batch_index * args.batch_size:(batch_index + 1) * args.batch_size]
            x = augment(train_split.normalized(index), generator, args.max_shift)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), train_split.labels[index], label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
            if step % args.save_every == 0:
                elapsed += time.perf_counter() - tic
                tic = time.perf_counter()
                save()
        elapsed += time.perf_counter() - tic
        accuracy = evaluate(model, test_split)
        save()
        progress.write(f"epoch {epoch + 1}/{args.epochs}: test top-1 {accuracy:.4f} ({elapsed / 60:.1f} min)")
        tqdm.write("", file=sys.stdout)
    progress.close()
    accuracy = evaluate(model, test_split)
    models.ASSETS.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), models.EMBEDDED_CHECKPOINT)
    manifest = {
        "model": models.EMBEDDED_MODEL,
        "command": "python run_bench.py train-base " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in config.items()),
        "recipe": __doc__.split("Recipe (written into the manifest): ")[1].split("\n\n")[0].replace("\n", " "),
        **config,
        "steps": total_steps,
        "wall_time_s": round(elapsed, 1),
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "test_top1": accuracy,
        "test_images": len(test_split),
        "params": sum(p.numel() for p in model.parameters()),
        "conv_stem": "yes: 3 conv layers (1->32->64->64, one stride 2) + 1x1 projection to width 96, 14x14 tokens",
        "sha256": models.sha256_file(models.EMBEDDED_CHECKPOINT),
    }
    if previous_stages:
        manifest["stages"] = previous_stages  # earlier runs this one continued from, oldest first
        manifest["total_wall_time_s"] = round(elapsed + sum(stage.get("wall_time_s", 0) for stage in previous_stages), 1)
    models.EMBEDDED_MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {models.EMBEDDED_CHECKPOINT} (test top-1 {accuracy:.4f})")
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value, help=RECIPE_HELP[key])
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--restart", action="store_true", help="ignore a saved training state")
    parser.add_argument("--init-from", default=None, help="start from these weights (a second stage); recorded in the manifest")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> None:
    """Train from ``argv`` flags; a :class:`BenchError` propagates (``run_bench.py train-base`` prints it in one line)."""
    parser = argparse.ArgumentParser(prog="run_bench.py train-base", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    train(parser.parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"error: {exc}")
