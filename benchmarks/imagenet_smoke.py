"""The ImageNet route end to end without ImageNet (a script, not a test: DeiT-S on 2 CPU cores, ~7 minutes).

    python benchmarks/imagenet_smoke.py                          # none, tome, ltmp, pm of imagenet_deit_small
    python benchmarks/imagenet_smoke.py --methods none,ltp --keep /tmp/smoke

It writes what a user with ImageNet would pass: a validation and a training ImageFolder of ImageNet-1k synset
folders (``n01443537``, ... a few of them, random 400x300 JPEGs) and a DeiT-S checkpoint file (random weights),
then runs the shipped ``imagenet_deit_small`` config on them through the CLI (its fits, workers, eval batch and
published-numbers table; latency at batch 1 and 8 in fp32, which a CPU can afford) and checks that every planned
cell reached the store and the tables. Top-1 is ~0 (random weights scored over 1,000 classes): the script checks
the route, not accuracy. Exit status 0 when everything is there, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cli, runner  # noqa: E402
from bench.store import Store  # noqa: E402

CONFIG = "imagenet_deit_small"
SYNSETS = (1, 207, 409, 950)  # ImageNet-1k class indices: goldfish, golden retriever, analog clock, orange


def write_tree(root: Path, split: str, per_class: int, seed: int) -> Path:
    """``root/split/<synset>/<synset>_<i>.JPEG``: ``per_class`` random 400x300 RGB JPEGs per synset of SYNSETS."""
    rng = np.random.default_rng(seed)
    info = ImageNetInfo()
    for index in SYNSETS:
        folder = root / split / info.index_to_label_name(index)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{folder.name}_{i}.JPEG", quality=90)
    return root / split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="none,tome,ltmp,pm", help="labels of the config to run")
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=8, help="one fit epoch is this many images per class")
    parser.add_argument("--keep", type=Path, help="write here and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        val = write_tree(root, "val", args.val_per_class, seed=0)
        train = write_tree(root, "train", args.train_per_class, seed=1)
        checkpoint = root / "deit_small_random.pth"
        torch.save(timm.create_model("deit_small_patch16_224", pretrained=False).state_dict(), checkpoint)
        store_path, reports = root / "results.sqlite", root / "reports"
        flags = ["--config", CONFIG, "--data", str(val), "--train-data", str(train), "--checkpoint", str(checkpoint),
                 "--methods", args.methods, "--batch-sizes", "1,8", "--precisions", "fp32",
                 "--store", str(store_path), "--reports", str(reports), "--quiet"]
        status = cli.main(["run", *flags])
        if status != 0:
            print(f"FAILED: run exited with {status}")
            return 1
        planned = len(runner.planned_cells(cli.build_config(cli.make_parser().parse_args(["run", *flags]))))
        store = Store(store_path)
        stored, timings = len(store.cells()), store.timings()["cell_key"].nunique()
        store.close()
        tables = (reports / "results.md").read_text()
        checks = {f"{planned} planned cells stored": stored == planned,
                  "every cell timed": timings == planned,
                  "published numbers beside the run": "against the published numbers" in tables}
        for name, ok in checks.items():
            print(f"{'ok' if ok else 'FAILED'}: {name}")
        return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
