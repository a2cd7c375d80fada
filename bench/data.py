"""Evaluation and training data: Fashion-MNIST (the embedded default) and ImageNet-style folders.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (the original gzip IDX files). Those
files are unpacked once into a cache folder in torchvision's own layout and then read with
``torchvision.datasets.FashionMNIST``, so nothing here parses IDX by hand.

The embedded model takes the whole split as one in-memory tensor (60k x 28 x 28 uint8 = 47 MB): batches are
sliced from it, which is far faster on two CPU cores than a per-image ``DataLoader``.
"""
from __future__ import annotations

import functools
import gzip
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from bench.errors import BenchError

FMNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_ENV = "TOKENBENCH_FMNIST_DIR"
CACHE_ENV = "TOKENBENCH_CACHE"
#: PIL image mode for a model reading that many channels
IMAGE_MODES = {1: "L", 3: "RGB"}
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MISSING_FMNIST = (
    "Fashion-MNIST not found in {where}: install it with `sudo apt-get install dataset-fashion-mnist` "
    "or pass --data-dir DIR holding the IDX files"
)


def cache_dir() -> Path:
    """Where prepared data lives: ``$TOKENBENCH_CACHE`` or ``~/.cache/tokenbench``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "tokenbench"))


def resolve_fmnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Find the folder with the IDX files: ``data_dir``, then ``$TOKENBENCH_FMNIST_DIR``, then Debian's path."""
    candidates = [Path(p) for p in (data_dir, os.environ.get(FMNIST_ENV)) if p] or [FMNIST_DEBIAN_DIR]
    where = candidates[0]
    if not where.is_dir():
        raise BenchError(MISSING_FMNIST.format(where=where))
    for image_file, label_file in FMNIST_FILES.values():
        for name in (image_file, label_file):
            if not ((where / name).is_file() or (where / f"{name}.gz").is_file()):
                raise BenchError(MISSING_FMNIST.format(where=f"{where} (no {name}[.gz])"))
    return where


def _prepare_torchvision_layout(source: Path) -> Path:
    """Unpack (or copy) the IDX files into ``<cache>/fmnist/FashionMNIST/raw`` once; return the root."""
    root = cache_dir() / "fmnist"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for pair in FMNIST_FILES.values():
        for name in pair:
            target = raw / name
            if target.is_file():
                continue
            tmp = target.with_suffix(".tmp")
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp)
            else:
                with gzip.open(source / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            tmp.replace(target)
    return root


@dataclass
class TensorSplit:
    """A whole split in memory. ``images``: (N, 28, 28) uint8; ``labels``: (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def normalized(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Images at ``index`` as float model input, (B, 1, 28, 28), normalised with the dataset's mean/std."""
        x = self.images[index].unsqueeze(1).float().div_(255.0)
        return x.sub_(FMNIST_MEAN).div_(FMNIST_STD)


def load_fmnist(split: str = "test", data_dir: str | os.PathLike | None = None) -> TensorSplit:
    """Load a Fashion-MNIST split ("train": 60,000 images, "test": 10,000) as tensors."""
    from torchvision.datasets import FashionMNIST

    if split not in FMNIST_FILES:
        raise BenchError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    root = _prepare_torchvision_layout(resolve_fmnist_dir(data_dir))
    try:
        ds = FashionMNIST(str(root), train=(split == "train"), download=False)
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise BenchError(f"Fashion-MNIST files in {root} are unreadable ({exc}); delete that folder and rerun") from exc
    return TensorSplit(ds.data.contiguous(), ds.targets.long(), FMNIST_CLASSES)


def seeded_subset_indices(n_total: int, limit: int | None, seed: int = 0) -> torch.Tensor:
    """A deterministic subset: the first ``limit`` of a seeded permutation, sorted. ``limit=None``: everything."""
    if limit is None or limit >= n_total:
        return torch.arange(n_total)
    if limit <= 0:
        raise BenchError(f"--limit {limit} leaves no images to evaluate: pass a positive --limit")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=generator)[:limit].sort().values


class UnreadableImage(BenchError):
    """An image file that cannot be decoded. Raised in a ``DataLoader`` worker, it reaches the main process
    re-raised by torch with the worker's traceback as its message; :meth:`one_line` gives the original message."""

    def one_line(self) -> str:
        last = str(self).strip().splitlines()[-1]
        return last.split(f"{type(self).__name__}: ", 1)[-1]


def read_image(path: str, mode: str = "RGB") -> Any:
    """``path`` as a PIL image in ``mode`` (``"RGB"`` as torchvision's loader gives, ``"L"`` for a model of grey
    images such as the embedded one), or :class:`UnreadableImage` naming the file and the fix."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert(mode)
    except OSError as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        reason = str(exc).split(" <")[0]  # without PIL's "<_io.BufferedReader name=...>", the path again
        raise UnreadableImage(f"image {path} cannot be read ({reason}): replace it (a partial copy?) or move it out of "
                              "the folder; finished cells are kept in the store") from None


def folder_problem(exc: Exception, named: int = 5) -> str:
    """torchvision's reason for refusing a folder, in one line; its list of class folders without images is cut to
    the first ``named`` (a train folder missing most of ImageNet's 1,000 classes listed them all)."""
    text = str(exc).splitlines()[0]
    empty = re.match(r"Found no valid file for the classes (.*?)\. Supported extensions are: (.*)", text)
    if not empty:
        return text
    classes = empty.group(1).split(", ")
    shown = ", ".join(classes[:named]) + (", ..." if len(classes) > named else "")
    return f"{len(classes)} class folder(s) hold no image with the extensions {empty.group(2)}: {shown}"


def image_folder(path: str | os.PathLike, model: torch.nn.Module) -> Dataset:
    """An ImageNet-style folder (``class/xxx.jpg``) with the model's own timm eval preprocessing, its labels the
    model's class indices (:func:`align_labels`). Images are read as grey or RGB, as many channels as the model's
    input (``pretrained_cfg["input_size"]``): the embedded model reads grey ones."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    root = Path(path)
    if not root.is_dir():
        raise BenchError(f"data folder {root} does not exist: pass --data PATH to an ImageFolder (class/image.jpg)")
    preprocessing = resolve_data_config({}, model=model)
    channels = preprocessing["input_size"][0]
    if channels not in IMAGE_MODES:
        raise BenchError(f"the model reads {channels}-channel images, and an ImageFolder gives grey (1) or RGB (3) "
                         "ones: pass a model of 1 or 3 input channels")
    transform = create_transform(**preprocessing, is_training=False)
    loader = functools.partial(read_image, mode=IMAGE_MODES[channels])
    try:
        folder = ImageFolder(str(root), transform=transform, loader=loader)
    except (FileNotFoundError, RuntimeError) as exc:
        raise BenchError(f"{root} is not an ImageFolder ({folder_problem(exc)}): expected class/image.jpg") from exc
    align_labels(folder, int(model.num_classes))
    return folder


def align_labels(folder: Any, num_classes: int) -> None:
    """Make ``folder``'s labels (a torchvision ``ImageFolder``) the model's class indices, or raise naming the mismatch.

    As many class folders as the model has classes: the sorted folder names are its classes in order (torchvision's
    convention, and ImageNet's for its synset folders). Fewer folders, all ImageNet-1k synsets (``n01440764``, ...),
    on a 1000-class model: each is relabelled with its ImageNet-1k index (a subset such as Imagenette). Anything else
    would score the model's predictions against labels that mean other classes."""
    from timm.data import ImageNetInfo

    classes = list(folder.classes)
    if len(classes) == num_classes:
        return
    synset_index = {name: i for i, name in enumerate(ImageNetInfo().label_names())} if num_classes == 1000 else {}
    if not synset_index or not all(name in synset_index for name in classes):
        raise BenchError(f"{folder.root} has {len(classes)} class folders but the model predicts {num_classes} classes: "
                         "pass an ImageFolder with one folder per model class (or ImageNet-1k synset folders for a "
                         "1000-class model)")
    model_index = [synset_index[name] for name in classes]
    folder.samples = [(file, model_index[label]) for file, label in folder.samples]
    folder.imgs = folder.samples
    folder.targets = [label for _, label in folder.samples]
    folder.class_to_idx = {name: synset_index[name] for name in classes}
