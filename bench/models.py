"""Models: any timm ViT by name, local checkpoints, and the embedded Fashion-MNIST ViT.

The embedded model is a plain timm ``VisionTransformer`` (so every plug-in sees exactly the blocks it would
see on DeiT) whose patch embedding is a small convolutional stem: 28x28x1 -> 14x14 tokens of width 96,
i.e. 196 patch tokens + CLS = 197 tokens, DeiT's token count at 224/16. It is registered with timm
(``timm.create_model("vit_fmnist_convstem")``) as soon as this module is imported.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from bench.errors import BenchError

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL = "vit_fmnist_convstem"
EMBEDDED_CHECKPOINT = ASSETS / "vit_fmnist_convstem.pt"
EMBEDDED_MANIFEST = ASSETS / "vit_fmnist_convstem.json"
RETRAIN_HINT = "retrain it with `python run_bench.py train-base` (or restore it with `git checkout bench/assets`)"
#: Python objects that training scripts save beside the weights, which a weights-only load may build: timm's and
#: DeiT's train.py keep their command-line flags (``args``, an argparse Namespace) in every checkpoint
CHECKPOINT_OBJECTS = [argparse.Namespace]


class ConvStemEmbed(PatchEmbed):
    """Patch embedding with a small convolutional stem (hybrid-ViT style) instead of one strided conv.

    ``x: (B, C, H, W) -> (B, H/2 * W/2, D)`` for ``patch_size=2``: two 3x3 convs (the second strided)
    then a 1x1 projection, so each token sees a 7x7 pixel neighbourhood. Costs ~4 % of the model's MACs.
    """

    def __init__(self, img_size: int = 28, patch_size: int = 2, in_chans: int = 1, embed_dim: int = 96,
                 stem_width: int = 64, **kwargs: Any) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        if patch_size != 2:
            raise ValueError("ConvStemEmbed downsamples by exactly 2: use patch_size=2")
        half = stem_width // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, stem_width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem_width), nn.GELU(),
            nn.Conv2d(stem_width, stem_width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(stem_width), nn.GELU(),
            nn.Conv2d(stem_width, embed_dim, 1),
        )


@register_model
def vit_fmnist_convstem(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The embedded default: ViT for 28x28 grey images, conv stem, 197 tokens, width 96, depth 6, 3 heads."""
    if pretrained:
        raise BenchError(f"{EMBEDDED_MODEL} has no hub weights: its checkpoint ships in bench/assets")
    args = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3,
                mlp_ratio=4.0, embed_layer=ConvStemEmbed, class_token=True, global_pool="token")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory passes these
        kwargs.pop(key, None)
    args.update(kwargs)
    model = VisionTransformer(**args)
    model.pretrained_cfg = {"input_size": (1, 28, 28), "mean": (0.2860,), "std": (0.3530,),
                            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                            "num_classes": 10}
    return model


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """A plain state dict, or one under ``state_dict``/``model``/``state_dict_ema`` (timm-style checkpoints)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BenchError("checkpoint holds no state dict: save `model.state_dict()` (or a dict with 'state_dict')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_checkpoint(path: Path, flag: str = "--checkpoint") -> Any:
    """The object saved in a checkpoint file: ``.safetensors`` (timm's Hugging Face hub format, e.g. a cached
    ``model.safetensors``) or anything ``torch.save`` wrote (``.pth``/``.pt``/``.bin``/``.pth.tar``, loaded
    weights-only: tensors, containers, numbers and :data:`CHECKPOINT_OBJECTS`; no other object is built).
    An original JAX ViT ``.npz`` needs the model to convert it: :func:`load_npz` (``--checkpoint`` only)."""
    if path.suffix.lower() in (".npz", ".npy"):
        takes = "a torch or safetensors file" + (", or a JAX ViT .npz" if flag == "--checkpoint" else "")
        raise BenchError(f"checkpoint {path} is a NumPy file, which {flag} does not read: pass {takes}")
    try:
        if path.suffix.lower() == ".safetensors":
            return safetensors.torch.load_file(path, device="cpu")
        with torch.serialization.safe_globals(CHECKPOINT_OBJECTS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a corrupt file
        if other := re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc)):
            raise BenchError(f"checkpoint {path} holds a {other[1]} object, which loading would have to run code to "
                             "build: save `model.state_dict()` alone to a new file and pass that") from exc
        kind = "safetensors" if path.suffix.lower() == ".safetensors" else "torch"
        raise BenchError(f"checkpoint {path} is corrupt or not a {kind} file ({type(exc).__name__}): re-save or "
                         "re-download it") from exc


def checkpoint_file(path: str | os.PathLike, flag: str = "--checkpoint") -> Path:
    """``path`` if it is a file; else a one-line error naming ``flag``, the option that gave it."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"checkpoint {path} not found: pass {flag} PATH to an existing file")
    return path


def read_state(path: str | os.PathLike, flag: str = "--checkpoint") -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file, with a one-line error (naming ``flag``, the option that gave the path)
    if the file is missing or holds none."""
    return extract_state_dict(read_checkpoint(checkpoint_file(path, flag), flag))


def npz_layout(path: str | os.PathLike) -> tuple[int | None, int | None]:
    """How many classes the classifier of an original JAX/Flax ViT ``.npz`` checkpoint predicts
    (``head/bias: (classes,)``) and how many encoder blocks it holds (``Transformer/encoderblock_{i}/...``, or one
    stacked ``Transformer/encoderblock/...: (depth, ...)`` in big_vision's files); None for what it lacks."""
    path = checkpoint_file(path)
    try:
        with np.load(path) as arrays:
            heads = [arrays[key].shape[-1] for key in arrays.files if key.endswith("head/bias")]
            blocks = {match[1] for key in arrays.files if (match := re.search(r"Transformer/encoderblock_(\d+)/", key))}
            stacked = [arrays[key].shape[0] for key in arrays.files
                       if key.endswith("Transformer/encoderblock/LayerNorm_0/scale")]
    except Exception as exc:  # zipfile and numpy raise many types for a corrupt file
        raise BenchError(f"checkpoint {path} is corrupt or not a NumPy .npz file ({type(exc).__name__}): re-save or "
                         "re-download it") from exc
    depth = len(blocks) if blocks else int(stacked[0]) if len(stacked) == 1 else None
    return (int(heads[0]) if len(heads) == 1 else None), depth


def load_npz(model: VisionTransformer, path: str | os.PathLike, depth: int | None) -> None:
    """Load an original JAX/Flax ViT ``.npz`` checkpoint (Google's vit and augreg releases, big_vision) with timm's
    own converter (``VisionTransformer.load_pretrained``), strictly: timm's converter skips what the file lacks (a
    head of another size, a norm it has no name for), so the model is first filled with NaN and a weight still NaN
    afterwards is refused as missing; a file with another number of blocks (``depth``, from :func:`npz_layout`) is
    refused too, since the converter would ignore blocks beyond the model's. Any mismatch is a one-line error."""
    if depth is not None and depth != len(model.blocks):
        raise BenchError(f"checkpoint {path} holds {depth} blocks but the model has {len(model.blocks)}: "
                         "pass the matching --model")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
        try:
            model.load_pretrained(str(path))
        except Exception as exc:  # a missing key, a shape that does not fit, a layer the converter does not know
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise BenchError(f"checkpoint {path} does not fit this architecture (timm's JAX converter: "
                             f"{type(exc).__name__} {detail}): pass the matching --model") from exc
    missing = [key for key, tensor in model.state_dict().items() if tensor.is_floating_point() and tensor.isnan().any()]
    if missing:
        raise BenchError(f"checkpoint {path} does not fit this architecture (missing {missing[:3]}): "
                         "pass the matching --model")


def head_classes(state: dict[str, torch.Tensor]) -> int | None:
    """How many classes a ViT state dict's classifier predicts (``head.weight: (classes, D)``); None without one."""
    weight = state.get("head.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def load_checkpoint(model: nn.Module, path: str | os.PathLike, state: dict[str, torch.Tensor] | None = None,
                    flag: str = "--checkpoint") -> None:
    """Load weights strictly (``state``, when already read from ``path``); any mismatch is a one-line error
    naming the first offending keys (and ``flag``, the option that gave the path, where it does not name one)."""
    state = read_state(path, flag) if state is None else state
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if shape:
            parts.append(f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shape[:2]]}")
        fix = "pass the matching --model" if flag == "--checkpoint" else f"pass {flag} a checkpoint of this model"
        raise BenchError(f"checkpoint {path} does not fit this architecture ({'; '.join(parts)}): {fix}")
    model.load_state_dict(state)


def check_vit(model: nn.Module, name: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise BenchError(f"model {name!r} is a {type(model).__name__}, not a timm VisionTransformer: pick a ViT/DeiT model")
    return model


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``$HF_ENDPOINT``) accepts a TCP connection within ``timeout_s``: False with
    ``HF_HUB_OFFLINE`` set, for an endpoint without a host name, and on a compute node without internet."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlparse(hub.ENDPOINT)
    if not url.hostname:  # a malformed endpoint: getaddrinfo would try localhost
        return False
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout_s).close()
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def hub_cache_only() -> Iterator[None]:
    """Hugging Face hub in offline mode for the block (weights come from its cache or not at all). Without it,
    an unreachable hub costs ~45 s of retries per file before the cache is consulted."""
    import huggingface_hub.constants as hub

    before, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def create(name: str = EMBEDDED_MODEL, pretrained: bool = False, checkpoint: str | os.PathLike | None = None,
           **kwargs: Any) -> VisionTransformer:
    """Build a timm ViT in eval mode. A ``checkpoint`` file wins over ``pretrained`` (nothing is fetched: a config
    that asks for pretrained weights runs offline from a local file). The embedded model loads (and hash-checks) its
    shipped checkpoint by default. A checkpoint fine-tuned to another number of classes (ImageNet-100, CIFAR-100)
    sets the model's ``num_classes`` from its classifier head, as ``timm.create_model(name, num_classes=...)``."""
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise BenchError(f"unknown model {name!r}: see `python run_bench.py list` or timm.list_models('*vit*')")
    fetch = pretrained and checkpoint is None and name != EMBEDDED_MODEL
    npz = checkpoint is not None and Path(checkpoint).suffix.lower() == ".npz"
    state = read_state(checkpoint) if checkpoint is not None and not npz else None
    classes, depth = npz_layout(checkpoint) if npz else (head_classes(state) if state is not None else None, None)
    if classes is not None and "num_classes" not in kwargs:
        kwargs = {**kwargs, "num_classes": classes}
    online = fetch and hub_reachable()
    try:
        with contextlib.nullcontext() if online or not fetch else hub_cache_only():
            model = timm.create_model(name, pretrained=fetch, **kwargs)
    except BenchError:
        raise
    except Exception as exc:
        if fetch:
            where = "" if online else "the hub is unreachable and its cache holds none; "
            raise BenchError(f"could not fetch pretrained weights for {name!r} ({where}{type(exc).__name__}): "
                             "pass --checkpoint PATH to a local file instead") from exc
        raise BenchError(f"could not build {name!r}: {str(exc).splitlines()[0]}") from exc
    model = check_vit(model, name)
    if npz:
        load_npz(model, checkpoint, depth)
    elif checkpoint is not None:
        load_checkpoint(model, checkpoint, state)
    elif name == EMBEDDED_MODEL:
        verify_embedded_checkpoint()
        load_checkpoint(model, EMBEDDED_CHECKPOINT)
    return model.eval()


def embedded_manifest() -> dict[str, Any]:
    if not EMBEDDED_MANIFEST.is_file():
        raise BenchError(f"manifest {EMBEDDED_MANIFEST} missing: {RETRAIN_HINT}")
    return json.loads(EMBEDDED_MANIFEST.read_text())


def verify_embedded_checkpoint() -> str:
    """Check the shipped checkpoint against its manifest's sha256; return the hash."""
    if not EMBEDDED_CHECKPOINT.is_file():
        raise BenchError(f"embedded checkpoint {EMBEDDED_CHECKPOINT} missing: {RETRAIN_HINT}")
    expected = embedded_manifest()["sha256"]
    actual = sha256_file(EMBEDDED_CHECKPOINT)
    if actual != expected:
        raise BenchError(f"embedded checkpoint {EMBEDDED_CHECKPOINT} is corrupt (sha256 {actual[:12]} != {expected[:12]}): {RETRAIN_HINT}")
    return actual
