"""Shared fixtures: tiny timm ViTs (random weights) and a CLI runner."""
from __future__ import annotations

import copy
import functools
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import bench.models  # noqa: F401  (registers the embedded model)
import methods  # noqa: F401  (registers plug-ins)
from methods.blocks import ModelDims

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(int(os.environ.get("TOKENBENCH_TEST_THREADS", min(2, os.cpu_count() or 1))))


def tiny_vit(**kwargs) -> VisionTransformer:
    """A 4-block ViT on 32x32 images, 8x8 = 64 patches (+ prefix tokens); random but seeded weights."""
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    args.update(kwargs)
    return VisionTransformer(**args).eval()


@pytest.fixture
def tiny() -> VisionTransformer:
    return tiny_vit()


TIMM_MODELS = {  # the model families every plug-in must handle (random weights)
    "deit_tiny_patch16_224": {},
    "deit_tiny_distilled_patch16_224": {},  # CLS + distillation token, two heads
    "vit_tiny_r_s16_p8_224": {},  # hybrid: a ResNet stem (HybridEmbed) makes the patch tokens
    "deit3_small_patch16_224": {},  # LayerScale
    "vit_small_patch14_reg4_dinov2": {"img_size": 98},  # CLS + 4 registers + LayerScale
    "vit_little_patch16_reg4_gap_256": {"img_size": 96},  # no CLS, 4 registers, average pooling
}


@functools.lru_cache(maxsize=None)
def _timm_vit_cached(name: str) -> VisionTransformer:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **TIMM_MODELS[name]).eval()


def timm_vit(name: str) -> VisionTransformer:
    """A fresh copy of one of :data:`TIMM_MODELS` with seeded random weights."""
    return copy.deepcopy(_timm_vit_cached(name))


def hand_dims(num_patches: int, depth: int = 1, head_dim: int = 1, num_prefix: int = 1) -> ModelDims:
    """The dims of a hand-built token set for a reducer's ``reduce``: one head of ``head_dim``, width 1, ``num_prefix``
    prefix tokens (CLS) + a row of ``num_patches`` patches, no Linear MACs."""
    return ModelDims(depth=depth, dim=1, num_heads=1, head_dim=head_dim, attn_dim=head_dim, attn_linear_macs=0,
                     mlp_macs=0, num_prefix=num_prefix, num_patches=num_patches, grid=(1, num_patches), in_chans=3,
                     img_size=(1, num_patches), head_macs=0)


def image_batch(model: VisionTransformer, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *ModelDims.of(model).image_shape, generator=torch.Generator().manual_seed(seed))


def load_script(name: str) -> types.ModuleType:
    """``benchmarks/<name>.py`` as a fresh module (the benchmarks are scripts, not part of a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``run_bench.py`` in a subprocess from a scratch folder (default paths such as reports/ land there,
    never in the repository); returns the completed process (text output). The repository goes first on
    PYTHONPATH, before any folder already there (packages installed beside the interpreter's, as on a GPU machine)."""
    import tempfile

    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as scratch:
        return subprocess.run([sys.executable, str(ROOT / "run_bench.py"), *args], capture_output=True, text=True,
                              cwd=cwd or scratch, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})})


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """An ImageFolder of 3 classes x 6 generated 40x40 JPEGs (class = dominant colour channel)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    generator = torch.Generator().manual_seed(0)
    for label, name in enumerate(["red", "green", "blue"]):
        (root / name).mkdir()
        for i in range(6):
            pixels = torch.randint(0, 80, (40, 40, 3), generator=generator, dtype=torch.uint8)
            pixels[..., label] += 150
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.jpg")
    return root
