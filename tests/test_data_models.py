"""Fashion-MNIST, ImageFolder, checkpoints and the shipped embedded model."""
from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from bench import data, models
from bench.errors import BenchError
from bench.train_base import augment
from tests.tiny_model import test_tiny_vit as make_tiny


@pytest.fixture(scope="module")
def fmnist() -> dict[str, data.TensorSplit]:
    return {split: data.load_fmnist(split) for split in ("train", "test")}


def test_fashion_mnist_sizes_classes_and_histograms(fmnist) -> None:
    assert len(fmnist["train"]) == 60000 and len(fmnist["test"]) == 10000
    assert fmnist["train"].images.shape == (60000, 28, 28) and fmnist["train"].images.dtype == torch.uint8
    assert len(fmnist["test"].classes) == 10
    assert fmnist["train"].labels.bincount().tolist() == [6000] * 10
    assert fmnist["test"].labels.bincount().tolist() == [1000] * 10


def test_pixel_range_and_normalisation(fmnist) -> None:
    images = fmnist["test"].images
    assert int(images.min()) == 0 and int(images.max()) == 255
    x = fmnist["train"].normalized(slice(0, 60000))
    assert x.shape == (60000, 1, 28, 28)
    assert float(x.mean()) == pytest.approx(0.0, abs=0.01) and float(x.std()) == pytest.approx(1.0, abs=0.01)
    # pixel p becomes (p / 255 - 0.2860) / 0.3530, Fashion-MNIST's mean and std, as the embedded model was trained
    split = data.TensorSplit(torch.tensor([[[0, 51, 255]]], dtype=torch.uint8), torch.zeros(1), data.FMNIST_CLASSES)
    assert split.normalized(slice(None)).flatten().tolist() == pytest.approx(
        [(p / 255 - 0.2860) / 0.3530 for p in (0, 51, 255)], rel=1e-6)


def test_data_dir_resolution_order(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(data.FMNIST_ENV, str(tmp_path / "from-env"))
    with pytest.raises(BenchError, match="from-env"):
        data.resolve_fmnist_dir()
    with pytest.raises(BenchError, match="from-flag"):
        data.resolve_fmnist_dir(tmp_path / "from-flag")  # the flag wins over the environment
    monkeypatch.delenv(data.FMNIST_ENV)
    assert data.resolve_fmnist_dir() == data.FMNIST_DEBIAN_DIR


def test_uncompressed_idx_files_load_like_the_gzipped_ones(tmp_path: Path, monkeypatch, fmnist) -> None:
    """A --data-dir holding the four IDX files unpacked (no .gz) gives the same test split; they are copied into
    ``$TOKENBENCH_CACHE``."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in (name for pair in data.FMNIST_FILES.values() for name in pair):
        with gzip.open(data.FMNIST_DEBIAN_DIR / f"{name}.gz", "rb") as packed, open(raw / name, "wb") as unpacked:
            shutil.copyfileobj(packed, unpacked)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    test = data.load_fmnist("test", raw)
    assert torch.equal(test.images, fmnist["test"].images) and torch.equal(test.labels, fmnist["test"].labels)
    assert (tmp_path / "cache" / "fmnist" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()


def test_missing_data_folders_and_splits_are_named() -> None:
    with pytest.raises(BenchError, match=r"^Fashion-MNIST not found in /nonexistent/fmnist: install it"):
        data.resolve_fmnist_dir("/nonexistent/fmnist")
    with pytest.raises(BenchError, match="unknown Fashion-MNIST split 'val': use 'train' or 'test'"):
        data.load_fmnist("val")
    with pytest.raises(BenchError, match="data folder /nonexistent/images does not exist: pass --data PATH"):
        data.image_folder("/nonexistent/images", make_tiny())


def test_seeded_subsets_are_deterministic() -> None:
    a, b = data.seeded_subset_indices(10000, 100, seed=0), data.seeded_subset_indices(10000, 100, seed=0)
    assert torch.equal(a, b) and len(a.unique()) == 100
    assert torch.equal(a, a.sort().values)  # in the split's own order
    assert not torch.equal(a, data.seeded_subset_indices(10000, 100, seed=1))
    assert torch.equal(data.seeded_subset_indices(50, None), torch.arange(50))
    with pytest.raises(BenchError, match="--limit"):
        data.seeded_subset_indices(50, 0)


def test_image_folder_uses_the_models_preprocessing(tiny_imagefolder: Path) -> None:
    model = make_tiny()
    folder = data.image_folder(tiny_imagefolder, model)
    assert len(folder) == 18 and folder.classes == ["blue", "green", "red"]
    image, label = folder[0]
    assert image.shape == (3, 32, 32)  # resized from 40x40 by timm's eval transform
    assert float(image.max()) <= 1.0 + 1e-6 and float(image.min()) >= -1.0 - 1e-6  # mean/std 0.5


def test_the_embedded_model_reads_an_image_folder_as_its_own_split(tmp_path: Path, fmnist) -> None:
    """Fashion-MNIST test images saved as PNG files, one class folder each, give the embedded model the input its IDX
    split gives: grey (read as RGB, 3 channels crashed its 1-channel stem with a traceback), neither resized nor
    cropped (28x28, crop_pct 1), normalised with the split's mean and std. A model reading 4 channels is refused."""
    from PIL import Image

    test = fmnist["test"]
    index = torch.stack([(test.labels == label).nonzero()[0, 0] for label in range(10)])
    for label, image in enumerate(test.images[index]):
        (tmp_path / f"class{label}").mkdir()
        Image.fromarray(image.numpy()).save(tmp_path / f"class{label}" / "0.png")
    model = models.create(models.EMBEDDED_MODEL)
    folder = data.image_folder(tmp_path, model)
    images = torch.stack([folder[k][0] for k in range(10)])
    assert images.shape == (10, 1, 28, 28) and folder.targets == list(range(10))
    torch.testing.assert_close(images, test.normalized(index), rtol=0, atol=1e-6)
    four = make_tiny()
    four.pretrained_cfg = {**four.pretrained_cfg, "input_size": (4, 32, 32)}
    with pytest.raises(BenchError, match=r"the model reads 4-channel images, and an ImageFolder gives grey \(1\) or RGB"):
        data.image_folder(tmp_path, four)


def test_image_folder_labels_are_the_models_classes(tmp_path: Path, tiny_imagefolder: Path) -> None:
    """ImageNet-1k synset folders on a 1000-class model get their ImageNet indices; a class count the model does not
    have is a one-line error (its predictions would be scored against labels of other classes)."""
    from PIL import Image
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo().label_names()
    for index in (999, 7, 300):  # folder labels 0, 1, 2 (sorted names) must become 7, 300, 999
        (tmp_path / synsets[index]).mkdir()
        Image.new("RGB", (40, 40), (index % 256, 0, 0)).save(tmp_path / synsets[index] / "a.jpg")
    folder = data.image_folder(tmp_path, make_tiny(num_classes=1000))
    assert folder.classes == [synsets[7], synsets[300], synsets[999]]
    assert [folder[i][1] for i in range(3)] == folder.targets == [7, 300, 999]
    assert folder.imgs == folder.samples and folder.class_to_idx == {synsets[i]: i for i in (7, 300, 999)}
    with pytest.raises(BenchError, match="has 3 class folders but the model predicts 10 classes"):
        data.image_folder(tmp_path, make_tiny(num_classes=10))
    with pytest.raises(BenchError, match="has 3 class folders but the model predicts 1000 classes"):
        data.image_folder(tiny_imagefolder, make_tiny(num_classes=1000))  # red/green/blue are no synsets
    with pytest.raises(BenchError, match="has 3 class folders but the model predicts 2 classes"):
        data.image_folder(tiny_imagefolder, make_tiny(num_classes=2))  # more folders than classes: label 2 has none
    assert data.image_folder(tiny_imagefolder, make_tiny()).targets[:1] == [0]  # 3 folders, 3 classes: as sorted


def test_a_checkpoint_wins_over_pretrained_and_nothing_is_fetched(tmp_path: Path, monkeypatch) -> None:
    """``imagenet_deit_small`` asks for pretrained weights; with ``--checkpoint`` it must run offline from the file.
    The name carries its pretrained tag, as the hub lists it (``timm.list_models(pretrained=True)``)."""
    import timm

    torch.manual_seed(0)
    source = timm.create_model("deit_tiny_patch16_224").eval()
    torch.save({"model": source.state_dict()}, tmp_path / "deit_tiny.pth")
    fetched = []
    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: (
        fetched.append(pretrained), real_create(name, pretrained=False, **kw))[1])
    loaded = models.create("deit_tiny_patch16_224.fb_in1k", pretrained=True, checkpoint=tmp_path / "deit_tiny.pth")
    assert fetched == [False]
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded(x), source(x))


def test_pretrained_loads_offline_from_the_hub_cache(tmp_path: Path, monkeypatch) -> None:
    """``--pretrained`` with no network uses timm's weights where the Hugging Face cache holds them (the layout
    ``hf_hub_download`` writes: ``models--timm--NAME/refs/main`` naming a snapshot with ``model.safetensors``)."""
    import huggingface_hub.constants
    import safetensors.torch
    import timm

    repo = tmp_path / "models--timm--deit_tiny_patch16_224.fb_in1k"
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    torch.manual_seed(0)
    cached = timm.create_model("deit_tiny_patch16_224").state_dict()
    safetensors.torch.save_file(cached, repo / "snapshots" / "0123abc" / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = models.create("deit_tiny_patch16_224", pretrained=True).state_dict()
    assert all(torch.equal(loaded[key], cached[key]) for key in cached)


def test_an_unreachable_hub_goes_straight_to_its_cache(tmp_path: Path, monkeypatch) -> None:
    """Without HF_HUB_OFFLINE, a node without internet must not spend ~45 s per file on the hub's retries: the
    fetch runs cache-only (it did try the network first) and, with nothing cached, names the fix."""
    import socket

    import huggingface_hub.constants
    import timm

    def refuse(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    offline_at_fetch = []
    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: (
        offline_at_fetch.append(huggingface_hub.constants.HF_HUB_OFFLINE), real_create(name, **kw))[1])
    with pytest.raises(BenchError, match="the hub is unreachable and its cache holds none.*--checkpoint PATH"):
        models.create("deit_tiny_patch16_224", pretrained=True)
    assert offline_at_fetch == [True]
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored


def test_a_fetch_that_fails_on_a_reachable_hub_and_a_model_that_cannot_be_built_name_the_fix(monkeypatch) -> None:
    """A reachable hub that fails the download is not called unreachable; a timm factory that refuses its arguments is
    one line naming the model; a factory's own one-line error passes through as it is; a model that is not a ViT is
    refused by name."""
    import timm

    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    real_create = timm.create_model

    def failing_fetch(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("HTTP 503")
        return real_create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", failing_fetch)
    with pytest.raises(BenchError) as failed:
        models.create("deit_tiny_patch16_224", pretrained=True)
    assert str(failed.value) == ("could not fetch pretrained weights for 'deit_tiny_patch16_224' (OSError): pass "
                                 "--checkpoint PATH to a local file instead")
    with pytest.raises(BenchError, match=r"^could not build 'test_tiny_vit': .*unexpected keyword argument 'bogus'$"):
        models.create("test_tiny_vit", bogus=1)
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: (_ for _ in ()).throw(BenchError("own: fix it")))
    with pytest.raises(BenchError, match=r"^own: fix it$"):
        models.create("test_tiny_vit")
    monkeypatch.setattr(timm, "create_model", real_create)
    with pytest.raises(BenchError, match=r"^model 'resnet18' is a ResNet, not a timm VisionTransformer: pick a ViT"):
        models.create("resnet18")


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_an_unreadable_image_is_one_line_naming_the_file(tmp_path: Path, tiny_imagefolder: Path, workers: int,
                                                          damage: str) -> None:
    """A file PIL cannot decode, in the main process or in a DataLoader worker (whose error torch re-raises with the
    worker's traceback as its message), ends the batches with one line naming the file and the fix."""
    import shutil

    from bench import runner

    root = tmp_path / "folder"
    shutil.copytree(tiny_imagefolder, root)
    broken = root / "green" / "3.jpg"
    content = broken.read_bytes()
    broken.write_bytes(b"\xff\xd8\xff garbage" if damage == "not an image" else content[:len(content) // 2])
    folder = data.image_folder(root, make_tiny(num_classes=3))
    batches = runner._loader_batches(folder, torch.arange(len(folder)), 4, workers, "cpu")
    reasons = ["cannot identify image file"] if damage == "not an image" else ["image file is truncated", "Truncated File Read"]
    with pytest.raises(BenchError) as raised:
        for _ in batches():
            pass
    message = str(raised.value)
    assert any(message.startswith(f"image {broken} cannot be read ({reason})") for reason in reasons), message
    assert "\n" not in message
    assert message.endswith("move it out of the folder; finished cells are kept in the store")


def test_hub_reachable_asks_the_endpoints_host(monkeypatch) -> None:
    """The check connects to $HF_ENDPOINT's host and port: a listening local socket is reachable, a closed port is
    not, and an endpoint without a host name is unreachable without any connection (getaddrinfo would try
    localhost)."""
    import socket

    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert models.hub_reachable(timeout_s=2.0)
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{port}")  # closed now
    assert not models.hub_reachable(timeout_s=2.0)
    tried = []
    monkeypatch.setattr(socket, "create_connection", lambda address, *args: tried.append(address))
    for malformed in ("huggingface.co", "https://", "https:///path"):
        monkeypatch.setattr(hub, "ENDPOINT", malformed)
        assert not models.hub_reachable()
    assert tried == []
    monkeypatch.setattr(hub, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert not models.hub_reachable() and tried == []


def test_augment_flips_and_shifts() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(64, 1, 4, 4).contiguous()
    out = augment(x, torch.Generator().manual_seed(0), max_shift=1)
    assert out.shape == x.shape
    assert any(torch.equal(o[0, 1:3, 1:3], x[0, 0, 1:3, 1:3].flip(-1)) for o in out)  # some flipped, unshifted
    assert any(torch.equal(o[0], x[0, 0]) for o in out)  # some untouched


def test_augment_draws_every_shift_and_fills_with_the_background() -> None:
    """Each augmented 5x5 image is the image, flipped or not, moved by (dy, dx) in [-2, 2] each: pixel (i, j) is
    pixel (i + dy, j + dx) of the source, or the batch's darkest value (1 here, the background) off its edge. 400
    draws give both flips and all 25 moves."""
    size, shift = 5, 2
    source = torch.arange(1.0, 1.0 + size * size).view(1, 1, size, size).expand(400, 1, size, size).contiguous()
    out = augment(source, torch.Generator().manual_seed(0), max_shift=shift)

    def moved(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        return torch.tensor([[float(image[i + dy, j + dx]) if 0 <= i + dy < size and 0 <= j + dx < size else 1.0
                              for j in range(size)] for i in range(size)])

    candidates = {(flip, dy, dx): moved(source[0, 0].flip(-1) if flip else source[0, 0], dy, dx)
                  for flip in (False, True) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)}
    drawn = [next(key for key, image in candidates.items() if torch.equal(o[0], image)) for o in out]
    assert set(drawn) == set(candidates)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path: Path, wrapper: str | None) -> None:
    torch.manual_seed(0)
    model = make_tiny().eval()
    state = model.state_dict() if wrapper is None else {wrapper: model.state_dict(), "epoch": 3}
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = models.create("test_tiny_vit", checkpoint=tmp_path / "ckpt.pt")
    assert not any(module.training for module in loaded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_safetensors_checkpoint_gives_identical_logits(tmp_path: Path) -> None:
    """timm's hub weights are ``model.safetensors`` files: a local copy loads like a ``.pth`` state dict."""
    import safetensors.torch

    torch.manual_seed(0)
    model = make_tiny().eval()
    safetensors.torch.save_file(model.state_dict(), tmp_path / "model.safetensors")
    loaded = models.create("test_tiny_vit", checkpoint=tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_training_checkpoints_give_their_state_dict() -> None:
    """timm's and DeiT's training scripts save the weights under ``state_dict``, ``model`` or ``state_dict_ema``,
    DistributedDataParallel prefixes every name with ``module.``; the plain weights win over the EMA ones, and a
    file whose values are not all tensors holds no state dict."""
    state = {"w": torch.ones(2), "b": torch.zeros(1)}
    ddp = {f"module.{key}": value for key, value in state.items()}
    for saved in (state, ddp, {"state_dict": state}, {"model": ddp}, {"state_dict_ema": state, "epoch": 3},
                  {"state_dict": state, "state_dict_ema": {"w": torch.full((2,), 9.0), "b": torch.zeros(1)}},
                  {"model": "deit_small_patch16_224", "state_dict_ema": state}):  # "model" naming the architecture
        extracted = models.extract_state_dict(saved)
        assert extracted.keys() == state.keys() and all(torch.equal(extracted[k], state[k]) for k in state)
    for saved in ({"w": torch.ones(2), "epoch": 3}, [torch.ones(2)], {"state_dict": [torch.ones(2)]}):
        with pytest.raises(BenchError, match=r"checkpoint holds no state dict: save `model.state_dict\(\)`"):
            models.extract_state_dict(saved)
    assert list(models.extract_state_dict({"module.stem.module.w": torch.ones(1)})) == ["stem.module.w"]  # DDP's only


class Recipe:
    """An object of the test's own, saved in a checkpoint beside the weights."""


def test_a_timm_training_checkpoint_loads_and_a_foreign_object_is_refused(tmp_path: Path) -> None:
    """timm's train.py saves ``model_best.pth.tar`` with the weights beside the optimiser's state, the epoch, the
    metric and its flags as an argparse Namespace: it loads weights-only with identical logits. A checkpoint holding
    an object of any other class is refused by name (building it would run its code), not called corrupt."""
    import argparse

    torch.manual_seed(0)
    model = make_tiny().eval()
    checkpoint = {"epoch": 3, "arch": "test_tiny_vit", "state_dict": model.state_dict(), "version": 2,
                  "optimizer": torch.optim.AdamW(model.parameters()).state_dict(), "metric": 81.2,
                  "args": argparse.Namespace(model="test_tiny_vit", lr=1e-3, sched="cosine")}
    torch.save(checkpoint, tmp_path / "model_best.pth.tar")
    loaded = models.create("test_tiny_vit", checkpoint=tmp_path / "model_best.pth.tar")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    torch.save({**checkpoint, "recipe": Recipe()}, tmp_path / "own.pth")
    with pytest.raises(BenchError, match=r"own.pth holds a tests.test_data_models.Recipe object, which loading would "
                                         r"have to run code to build: save `model.state_dict\(\)` alone"):
        models.create("test_tiny_vit", checkpoint=tmp_path / "own.pth")


def jax_vit_arrays(model: VisionTransformer) -> dict[str, np.ndarray]:
    """``model``'s weights laid out as in Google's original JAX ViT ``.npz`` checkpoints (Flax names; dense kernels
    ``(in, out)``, the patch kernel ``(kh, kw, in, out)``, query/key/value kernels ``(D, heads, head_dim)``, the
    attention output kernel ``(heads, head_dim, D)``). Written from that layout, not by timm."""
    heads, width = model.blocks[0].attn.num_heads, model.embed_dim
    arrays = {"embedding/kernel": model.patch_embed.proj.weight.permute(2, 3, 1, 0),
              "embedding/bias": model.patch_embed.proj.bias, "cls": model.cls_token,
              "Transformer/posembed_input/pos_embedding": model.pos_embed,
              "Transformer/encoder_norm/scale": model.norm.weight, "Transformer/encoder_norm/bias": model.norm.bias,
              "head/kernel": model.head.weight.T, "head/bias": model.head.bias}
    for i, block in enumerate(model.blocks):
        prefix = f"Transformer/encoderblock_{i}/"
        attention = f"{prefix}MultiHeadDotProductAttention_1/"
        for norm, layer in (("LayerNorm_0", block.norm1), ("LayerNorm_2", block.norm2)):
            arrays.update({f"{prefix}{norm}/scale": layer.weight, f"{prefix}{norm}/bias": layer.bias})
        qkv = zip(("query", "key", "value"), block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3))
        for name, weight, bias in qkv:
            arrays.update({f"{attention}{name}/kernel": weight.T.reshape(width, heads, -1),
                           f"{attention}{name}/bias": bias.reshape(heads, -1)})
        arrays.update({f"{attention}out/kernel": block.attn.proj.weight.T.reshape(heads, -1, width),
                       f"{attention}out/bias": block.attn.proj.bias})
        for dense, layer in (("Dense_0", block.mlp.fc1), ("Dense_1", block.mlp.fc2)):
            arrays.update({f"{prefix}MlpBlock_3/{dense}/kernel": layer.weight.T,
                           f"{prefix}MlpBlock_3/{dense}/bias": layer.bias})
    return {key: value.detach().numpy() for key, value in arrays.items()}


def big_vision_layout(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`jax_vit_arrays` as big_vision writes it: under ``params/``, the position embedding at the top level,
    the blocks' weights stacked along a leading depth axis under ``Transformer/encoderblock/``, and its own
    sub-module numbers (``LayerNorm_1``, ``MultiHeadDotProductAttention_0``, ``MlpBlock_0``)."""
    renames = {"LayerNorm_2": "LayerNorm_1", "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
               "MlpBlock_3": "MlpBlock_0"}
    out, stacks = {}, {}
    for key, value in arrays.items():
        if match := re.fullmatch(r"Transformer/encoderblock_(\d+)/(\w+)/(.+)", key):
            stacked_key = f"Transformer/encoderblock/{renames.get(match[2], match[2])}/{match[3]}"
            stacks.setdefault(stacked_key, []).append(value)
        else:
            out[key.replace("Transformer/posembed_input/", "")] = value
    out.update({key: np.stack(values) for key, values in stacks.items()})
    return {f"params/{key}": value for key, value in out.items()}


@pytest.mark.parametrize("layout", ["original", "big_vision"])
def test_a_jax_npz_checkpoint_gives_identical_logits_and_its_classes(tmp_path: Path, layout: str) -> None:
    """Google's original ViT weights are ``.npz`` files: timm's converter loads them, and the head's size (5 here,
    3 in the timm name's default) comes from the file."""
    torch.manual_seed(0)
    model = make_tiny(num_classes=5).eval()
    arrays = jax_vit_arrays(model)
    np.savez(tmp_path / "vit.npz", **(arrays if layout == "original" else big_vision_layout(arrays)))
    loaded = models.create("test_tiny_vit", checkpoint=tmp_path / "vit.npz")
    assert loaded.num_classes == 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize(("change", "expected"), [
    ("no head", r"does not fit this architecture \(missing \['head.weight', 'head.bias'\]\)"),
    ("no block 1 norm", r"timm's JAX converter: KeyError .*encoderblock_1/LayerNorm_0/scale"),
    ("one block more", "holds 3 blocks but the model has 2"),
    ("one block more, big_vision", "holds 3 blocks but the model has 2"),
    ("wider", r"timm's JAX converter: RuntimeError"),
])
def test_a_jax_npz_checkpoint_that_does_not_fit_is_refused(tmp_path: Path, change: str, expected: str) -> None:
    """timm's converter skips weights the file lacks and blocks the model lacks; the suite refuses both."""
    arrays = jax_vit_arrays(make_tiny(embed_dim=96 if change == "wider" else 48,
                                      depth=3 if change.startswith("one block more") else 2))
    drop = {"no head": ("head/kernel", "head/bias"), "no block 1 norm": ("Transformer/encoderblock_1/LayerNorm_0/scale",)}
    for key in drop.get(change, ()):
        del arrays[key]
    arrays = big_vision_layout(arrays) if change.endswith("big_vision") else arrays
    np.savez(tmp_path / "vit.npz", **arrays)
    with pytest.raises(BenchError, match=f"checkpoint .*vit.npz .*{expected}.*: pass the matching --model"):
        models.create("test_tiny_vit", checkpoint=tmp_path / "vit.npz")


def test_a_checkpoint_fine_tuned_to_other_classes_sets_the_head(tmp_path: Path, tiny_imagefolder: Path) -> None:
    """A ViT fine-tuned to 5 classes loads under the timm name whose default head has 3, with identical logits,
    and then expects an ImageFolder of 5 class folders (it did refuse the head's shape)."""
    torch.manual_seed(0)
    model = make_tiny(num_classes=5).eval()
    torch.save(model.state_dict(), tmp_path / "five.pt")
    loaded = models.create("test_tiny_vit", checkpoint=tmp_path / "five.pt")
    assert loaded.num_classes == 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(BenchError, match="has 3 class folders but the model predicts 5 classes"):
        data.image_folder(tiny_imagefolder, loaded)
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, tmp_path / "headless.pt")
    with pytest.raises(BenchError, match=r"missing \['head.weight', 'head.bias'\]"):
        models.create("test_tiny_vit", checkpoint=tmp_path / "headless.pt")


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("model.safetensors", b"not safetensors", "is corrupt or not a safetensors file"),
    ("vit.npz", b"PK", "is corrupt or not a NumPy .npz file"),
    ("vit.npy", b"\x93NUMPY", "is a NumPy file, which --checkpoint does not read: pass a torch or safetensors file, "
                              "or a JAX ViT .npz"),
])
def test_unreadable_checkpoint_formats_name_the_fix(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BenchError, match=expected):
        models.create("test_tiny_vit", checkpoint=tmp_path / name)


def test_checkpoint_suffixes_are_read_in_any_case_and_a_folder_is_no_checkpoint(tmp_path: Path) -> None:
    """``MODEL.SAFETENSORS`` and ``VIT.NPZ`` load as their lower-case names do; ``--init-from`` (train-base), which
    takes no JAX file, does not offer one; a folder is not a checkpoint file."""
    import safetensors.torch

    torch.manual_seed(0)
    model = make_tiny().eval()
    safetensors.torch.save_file(model.state_dict(), tmp_path / "MODEL.SAFETENSORS")
    with open(tmp_path / "VIT.NPZ", "wb") as handle:  # np.savez would append ".npz" to the name
        np.savez(handle, **jax_vit_arrays(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name in ("MODEL.SAFETENSORS", "VIT.NPZ"):
            assert torch.equal(models.create("test_tiny_vit", checkpoint=tmp_path / name)(x), model(x)), name
    with pytest.raises(BenchError, match=r"W.NPY is a NumPy file, which --init-from does not read: pass a torch or "
                                         r"safetensors file$"):
        models.read_checkpoint(tmp_path / "W.NPY", "--init-from")
    with pytest.raises(BenchError, match=r"not found: pass --checkpoint PATH to an existing file$"):
        models.create("test_tiny_vit", checkpoint=tmp_path)


def test_a_checkpoint_that_does_not_fit_names_its_first_offending_keys(tmp_path: Path) -> None:
    """A narrower MLP (ratio 2: 96 hidden units, the model's 4: 192) is a shape mismatch naming its first two weights;
    a file of the head alone is missing its first three names, not all 30."""
    torch.save(make_tiny(mlp_ratio=2.0).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(BenchError) as narrow:
        models.create("test_tiny_vit", checkpoint=tmp_path / "narrow.pt")
    assert "(shape mismatch [('blocks.0.mlp.fc1.weight', (96, 48), (192, 48)), ('blocks.0.mlp.fc1.bias', (96,), " \
           "(192,))]): pass the matching --model" in str(narrow.value)
    torch.save({k: v for k, v in make_tiny().state_dict().items() if k.startswith("head.")}, tmp_path / "head.pt")
    with pytest.raises(BenchError) as headless:
        models.create("test_tiny_vit", checkpoint=tmp_path / "head.pt")
    assert "(missing ['cls_token', 'pos_embed', 'patch_embed.proj.weight']): pass" in str(headless.value)


def test_the_embedded_model_without_its_manifest_names_the_retrain_command(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "EMBEDDED_MANIFEST", tmp_path / "gone.json")
    with pytest.raises(BenchError, match=r"gone.json missing: retrain it with `python run_bench.py train-base`"):
        models.create(models.EMBEDDED_MODEL)


def test_the_conv_stem_refuses_a_patch_size_it_does_not_make() -> None:
    """The stem halves the image once: a patch size of 4 would leave the position embedding for 7x7 tokens."""
    with pytest.raises(ValueError, match="ConvStemEmbed downsamples by exactly 2: use patch_size=2"):
        models.ConvStemEmbed(patch_size=4)


def test_shipped_checkpoint_hash_and_accuracy(fmnist) -> None:
    manifest = json.loads(models.EMBEDDED_MANIFEST.read_text())
    assert models.verify_embedded_checkpoint() == manifest["sha256"]
    assert models.EMBEDDED_CHECKPOINT.stat().st_size <= 20 * 2 ** 20
    model = models.create(models.EMBEDDED_MODEL)
    assert len(model.blocks) >= 6 and model.patch_embed.num_patches + model.num_prefix_tokens == 197
    index = data.seeded_subset_indices(10000, 1000, seed=0)
    with torch.inference_mode():
        logits = torch.cat([model(fmnist["test"].normalized(index[i:i + 250])) for i in range(0, 1000, 250)])
    accuracy = float((logits.argmax(-1) == fmnist["test"].labels[index]).float().mean())
    assert accuracy >= 0.85
    assert manifest["test_top1"] >= 0.89 and manifest["test_images"] == 10000


def test_class_folders_without_images_are_counted_and_a_few_named(tmp_path: Path, tiny_imagefolder: Path) -> None:
    """A train folder holding images for a few of its classes listed every empty class folder (980 of ImageNet's
    1,000 in one line); now it counts them and names the first five."""
    shutil.copytree(tiny_imagefolder / "red", tmp_path / "c00")
    for index in range(1, 9):
        (tmp_path / f"c{index:02d}").mkdir()
    with pytest.raises(BenchError) as caught:
        data.image_folder(tmp_path, make_tiny(num_classes=9))
    message = str(caught.value)
    assert "8 class folder(s) hold no image with the extensions .jpg, .jpeg," in message
    assert message.endswith(": c01, c02, c03, c04, c05, ...): expected class/image.jpg")
    five = RuntimeError("Found no valid file for the classes c1, c2, c3, c4, c5. Supported extensions are: .jpg")
    assert data.folder_problem(five) == "5 class folder(s) hold no image with the extensions .jpg: c1, c2, c3, c4, c5"


def test_pretrained_on_the_embedded_model_means_its_shipped_weights() -> None:
    """``--pretrained`` with the embedded model fetches nothing (it has no hub weights): its shipped checkpoint loads,
    as without the flag."""
    shipped, pretrained = models.create(models.EMBEDDED_MODEL), models.create(models.EMBEDDED_MODEL, pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(shipped.state_dict().values(), pretrained.state_dict().values()))
