"""Analytic GMACs against FlopCounterMode (counts fused attention; 2 FLOPs per MAC) and fvcore."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import timm
import torch

import methods
from bench.flops import counted_macs, dense_macs, embed_macs, image_macs
from methods.blocks import ModelDims
from methods.tokens import bipartite_positions, bipartite_similarity_macs
from tests.conftest import image_batch
from tests.test_conformance import prepared, reducing_knobs


def analytic_per_image(model, x) -> torch.Tensor:
    ctx = model._reduction_ctx
    with torch.no_grad():
        model(x)
    return image_macs(ctx.counts(), ctx.dims, ctx.reducer, embed_macs(model, ctx.dims))


@pytest.mark.parametrize("name, expected", [("deit_tiny_patch16_224", 1.2537), ("deit_small_patch16_224", 4.5989),
                                            ("deit_tiny_distilled_patch16_224", 1.2610)])  # + dist token and head
def test_dense_deit_gmacs_match_known_values(name: str, expected: float) -> None:
    model = timm.create_model(name, pretrained=False).eval()
    dims = ModelDims.of(model)
    analytic = dense_macs(dims, embed_macs(model, dims)) / 1e9
    counted = counted_macs(model, torch.zeros(1, 3, 224, 224)) / 1e9
    assert analytic == pytest.approx(expected, abs=1e-4)
    assert counted == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("plugin", sorted(methods.REGISTRY))
def test_analytic_matches_flop_counter_per_image(plugin: str) -> None:
    """Batch of one image at a time: input-dependent methods are exact per image too."""
    model, _ = prepared(plugin, **reducing_knobs(plugin))
    x = image_batch(model, batch=3)
    for i in range(3):
        analytic = float(analytic_per_image(model, x[i:i + 1])[0])
        counted = counted_macs(model, x[i:i + 1])
        assert analytic == pytest.approx(counted, rel=0.01), (plugin, i)


def test_fvcore_agrees_with_fused_attention_switched_off() -> None:
    """fvcore skips scaled_dot_product_attention: run it in a process with TIMM_FUSED_ATTN=0."""
    code = (
        "import timm, torch, warnings\n"
        "from fvcore.nn import FlopCountAnalysis\n"
        "from bench.flops import dense_macs, embed_macs\n"
        "from methods.blocks import ModelDims\n"
        "m = timm.create_model('deit_tiny_patch16_224').eval()\n"
        "a = FlopCountAnalysis(m, torch.zeros(1, 3, 224, 224)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)\n"
        "total = a.total(); unsupported = a.unsupported_ops()\n"
        "d = ModelDims.of(m); print(total, dense_macs(d, embed_macs(m, d)), 'scaled_dot_product' in str(dict(unsupported)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TIMM_FUSED_ATTN": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    fvcore_total, analytic, sdpa_unsupported = out.stdout.split()
    assert sdpa_unsupported == "False"
    # fvcore also counts LayerNorm and GELU-free elementwise ops: within 1 %
    assert float(fvcore_total) == pytest.approx(float(analytic), rel=0.01)


def test_fused_attention_on_the_cpu_is_counted_exactly() -> None:
    """timm's fused attention on a CPU runs SDPA's CPU kernel, which torch 2.14's FlopCounterMode has no formula for
    (bench.flops supplies torch's own SDPA count there): q @ k^T and p @ v of 2 images x 3 heads, 5 queries, 7 keys,
    head dim 4 are 2 * 3 * 5 * 7 * (4 + 4) = 1680 MACs."""
    query, key, value = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    attention = torch.nn.Module()
    attention.forward = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counted_macs(attention, query, key, value) == 2 * 3 * 5 * 7 * (4 + 4)


@pytest.mark.parametrize("r, expected", [
    (8, (32 * 32 + 28 * 28 + 24 * 24 + 20 * 20) * 16),  # layer sizes 65, 57, 49, 41 tokens: |A| x |B|, head_dim 16
    ([0, 3, 0, 0], 32 * 32 * 16),  # only the block that merges computes the similarity
])
def test_tome_similarity_is_counted(r: int | list[int], expected: int) -> None:
    model, reducer = prepared("tome", r=r)
    ctx = model._reduction_ctx
    with torch.no_grad():
        model(image_batch(model, batch=1))
    counts = ctx.counts()
    extra = sum(float(reducer.extra_macs(l, counts[:, l, 0], counts[:, l, 1], ctx.dims)[0]) for l in range(4))
    assert extra == expected


def test_similarity_macs_are_the_bipartite_split_sizes_times_head_dim() -> None:
    """|A| x |B| x d for every token count, odd ones included (5 patches after one prefix token: A 2, B 3), and 0
    where prefix tokens are all that is left."""
    for prefix in (0, 1, 2):
        tokens = torch.arange(prefix, prefix + 12)
        a_b = [len(a) * len(b) for a, b in (bipartite_positions(int(n), prefix) for n in tokens)]
        assert bipartite_similarity_macs(tokens, prefix, 8).tolist() == [8.0 * macs for macs in a_b]
    assert bipartite_similarity_macs(torch.tensor([6]), 1, 8).tolist() == [2 * 3 * 8]


def test_hybrid_stem_macs_derived_by_hand() -> None:
    """A HybridEmbed (conv backbone, then a 1x1 projection): the image's channels are the backbone's, not the
    projection's. 32x32x3 -> 3x3 conv, stride 4 -> 8x8x16 -> 1x1 conv -> 64 tokens of width 48."""
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=4, padding=1), torch.nn.BatchNorm2d(16))
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=1, embed_dim=48, depth=2, num_heads=3, num_classes=10,
        embed_layer=functools.partial(timm.layers.HybridEmbed, backbone=backbone)).eval()
    dims = ModelDims.of(model)
    assert dims.in_chans == 3 and dims.num_patches == 64
    assert embed_macs(model, dims) == 64 * (16 * 3 * 3 * 3) + 64 * (48 * 16)
    assert dense_macs(dims, embed_macs(model, dims)) == counted_macs(model, torch.zeros(1, 3, 32, 32))


class _ReadsImportanceAtLayer1:
    """The two methods of a reducer that :func:`image_macs` calls: it reads attention received in block 1 only and
    does ``extra`` MACs of its own in every block."""

    def __init__(self, extra: float) -> None:
        self.extra = extra

    def needs_at(self, layer: int) -> frozenset[str]:
        return frozenset({"importance"}) if layer == 1 else frozenset()

    def extra_macs(self, layer: int, n_attn: torch.Tensor, n_mlp: torch.Tensor, dims: ModelDims) -> torch.Tensor:
        return torch.full(n_attn.shape, self.extra, dtype=torch.float64)


def test_image_macs_by_hand() -> None:
    """Two blocks of 3 heads x 4 (qkv + proj 100 MACs a token, MLP 200), patch embedding 1,000, head 50. Counts
    (attention, MLP) of (10, 8) then (8, 5): blocks 10*100 + 2*10^2*12 + 8*200 = 5,000 and 8*100 + 2*8^2*12 + 5*200
    = 3,336; attention received in block 1, 3 heads x 8^2 = 192; the reducer's own 7 a block. Unreduced (10 tokens
    throughout) the image costs 1,000 + 50 + 2 * 5,400 = 11,850, as :func:`dense_macs` says."""
    dims = ModelDims(depth=2, dim=12, num_heads=3, head_dim=4, attn_dim=12, attn_linear_macs=100, mlp_macs=200,
                     num_prefix=1, num_patches=9, grid=(3, 3), in_chans=1, img_size=(3, 3), head_macs=50)
    counts = torch.tensor([[[10, 8], [8, 5]], [[10, 10], [10, 10]]])  # (B=2, depth, 2)
    assert image_macs(counts, dims, _ReadsImportanceAtLayer1(7.0), embed=1000).tolist() == [
        1000 + 50 + 5000 + 3336 + 192 + 2 * 7, 11850 + 3 * 10 ** 2 + 2 * 7]
    assert dense_macs(dims, embed=1000) == 11850
