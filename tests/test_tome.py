"""ToMe on hand-built tensors whose matching and merged values were worked out by hand."""
from __future__ import annotations

import pytest
import torch

import methods
from bench.errors import BenchError
from methods.blocks import ReductionContext
from methods.tome import r_schedule
from methods.tokens import bipartite_positions
from tests.conftest import hand_dims, tiny_vit

# CLS + 4 patches. Keys: patch1=(1,0), patch2=(1,0.1), patch3=(0,1), patch4=(0.2,1).
# Split after the CLS: A = positions 2, 4; B = positions 1, 3.
# cos(2,1) = 1/sqrt(1.01) = 0.995, cos(2,3) = 0.0995; cos(4,3) = 1/sqrt(1.04) = 0.981, cos(4,1) = 0.196.
KEYS = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.2, 1.0]]])
X = torch.tensor([[[7.0], [10.0], [20.0], [30.0], [40.0]]])


def context(r: int, keys: torch.Tensor = KEYS) -> tuple[methods.TokenReducer, ReductionContext]:
    """A one-block ToMe at ``r`` over CLS + patches whose head-mean keys are ``keys: (1, N, 2)``."""
    reducer = methods.create("tome", r=r)
    reducer.schedule = [r]
    ctx = ReductionContext(reducer, hand_dims(keys.shape[1] - 1, head_dim=2))
    ctx.stats["keys"] = keys
    return reducer, ctx


def test_split_is_the_reference_split_for_a_cls_model() -> None:
    a, b = bipartite_positions(5, 1)
    assert a.tolist() == [2, 4] and b.tolist() == [1, 3]


def test_r1_merges_the_most_similar_pair_with_equal_sizes() -> None:
    reducer, ctx = context(1)
    out = reducer.reduce(0, X, ctx)
    # patch2 (score 0.995) joins patch1: (10 + 20) / 2 = 15; patch4 stays. Order: [CLS, kept A, B].
    assert out[0, :, 0].tolist() == [7.0, 40.0, 15.0, 30.0]
    assert ctx.size[0].tolist() == [1.0, 1.0, 2.0, 1.0]


def test_kept_a_tokens_keep_their_original_order() -> None:
    """CLS + 6 patches: A = positions 2, 4, 6, B = 1, 3, 5 with keys (1, 0), (0, 1), (-1, 0). A's best cosines:
    position 2 (1, 0.5) -> 1 at 1/sqrt(1.25) = 0.894, position 4 (0.1, 1) -> 3 at 1/sqrt(1.01) = 0.995, position 6
    (-1, 0.2) -> 5 at 1/sqrt(1.04) = 0.981. r = 1 merges position 4 into 3; the kept A tokens come in position order
    (2, 6), not in score order (6, 2) as the descending sort leaves them."""
    keys = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [1.0, 0.5], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0], [-1.0, 0.2]]])
    reducer, ctx = context(1, keys)
    out = reducer.reduce(0, torch.tensor([[[7.0], [10.0], [20.0], [30.0], [40.0], [50.0], [60.0]]]), ctx)
    assert out[0, :, 0].tolist() == [7.0, 20.0, 60.0, 10.0, 35.0, 50.0]  # [CLS, kept A in order, B]


def test_r2_size_weighted_average() -> None:
    reducer, ctx = context(2)
    ctx.size = torch.tensor([[1.0, 2.0, 1.0, 1.0, 3.0]])
    out = reducer.reduce(0, X, ctx)
    # patch2 -> patch1: (2*10 + 1*20) / 3; patch4 -> patch3: (1*30 + 3*40) / 4
    assert torch.allclose(out[0, :, 0], torch.tensor([7.0, 40.0 / 3.0, 37.5]))
    assert ctx.size[0].tolist() == [1.0, 3.0, 4.0]


def test_r_is_capped_at_half_the_tokens_of_a_layer() -> None:
    reducer, ctx = context(3)  # only 2 A tokens exist
    out = reducer.reduce(0, X, ctx)
    assert out.shape[1] == 3


def test_r_schedules() -> None:
    assert r_schedule(8, 4) == [8, 8, 8, 8]
    assert r_schedule(8, 12, inflect=-1) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert r_schedule([4, 2], 4) == [4, 2, 0, 0]
    # fractional ends: first = int(7 * 0.5) = 3, last = 2 * 7 - 3 = 11 (the two ends still average r), middle int(7.0)
    assert r_schedule(7, 3, inflect=0.5) == [3, 7, 11]
    assert r_schedule(7, 3, inflect=-0.5) == [10, 7, 4]  # int(10.5) = 10, 14 - 10 = 4
    assert r_schedule(8, 1, inflect=-1) == [16]  # one block: the first layer's count


def test_impossible_r_is_rejected_with_one_line() -> None:
    with pytest.raises(BenchError, match=r"use r <= 32"):
        methods.create("tome", r=40).apply(tiny_vit())  # 64 patches


def test_r_limit_is_half_the_patches_rounded_down() -> None:
    """5 x 5 = 25 patches: 12 A tokens may all merge (r = 12 is accepted), 13 would be more than half."""
    methods.create("tome", r=12).apply(tiny_vit(img_size=20))
    with pytest.raises(BenchError, match=r"tome.r=13 merges more than half of the 25 patch tokens.*use r <= 12"):
        methods.create("tome", r=13).apply(tiny_vit(img_size=20))


@pytest.mark.parametrize("alive, out, alive_after", [
    # patch 4 dead: patch2 -> patch1 (0.995) as without padding; the dead A token stays, still dead
    ([1, 1, 1, 1, 0], [7.0, 40.0, 15.0, 30.0], [1, 0, 1, 1]),
    # patch 2 dead: its 0.995 to patch1 does not count; patch4 -> patch3 (0.981): (30 + 40) / 2
    ([1, 1, 0, 1, 1], [7.0, 20.0, 10.0, 35.0], [1, 0, 1, 1]),
    # patch 1 dead: nothing merges into it; patch4 -> patch3 (0.981) beats patch2 -> patch3 (0.0995)
    ([1, 0, 1, 1, 1], [7.0, 20.0, 10.0, 35.0], [1, 1, 0, 1]),
])
def test_dead_tokens_neither_merge_nor_receive_and_stay_dead(alive: list[int], out: list[float],
                                                              alive_after: list[int]) -> None:
    """After a reducer that pads, a dead (padding) token takes no part in the matching (the cosines of the
    module's comment at the top), and ``ctx.alive`` follows the tokens: [CLS, kept A, B]."""
    reducer, ctx = context(1)
    ctx.alive = torch.tensor([alive], dtype=torch.bool)
    merged = reducer.reduce(0, X, ctx)
    assert merged[0, :, 0].tolist() == out
    assert ctx.alive[0].int().tolist() == alive_after


@pytest.mark.parametrize("prop_attn", [True, False])
def test_prop_attn_knob_switches_the_log_size_bias(prop_attn: bool) -> None:
    """With ``prop_attn=False`` a token's size does not change the attention (ToMe's ablation); with it, it does."""
    model = tiny_vit(depth=1)
    methods.create("tome", r=0, prop_attn=prop_attn).apply(model)
    attn, ctx = model.blocks[0].attn, model._reduction_ctx
    x = torch.randn(1, 5, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ctx.reset()
        unsized = attn(x)
        ctx.size = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0]])
        sized = attn(x)
    assert torch.equal(sized, unsized) is not prop_attn


def test_proportional_attention_equals_duplicated_tokens() -> None:
    """A token of size 2 must receive exactly the attention of two identical copies of it."""
    model = tiny_vit(depth=1)
    methods.create("tome", r=0).apply(model)
    attn, ctx = model.blocks[0].attn, model._reduction_ctx
    x = torch.randn(1, 5, 48)
    duplicated = torch.cat([x, x[:, 4:5]], 1)
    with torch.no_grad():
        ctx.reset()
        plain = attn(duplicated)
        ctx.size = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0]])
        merged = attn(x)
    assert torch.allclose(merged, plain[:, :5], atol=1e-5)


def test_source_map_partitions_the_patches() -> None:
    model = tiny_vit()
    reducer = methods.create("tome", r=12, trace_source=True)
    reducer.apply(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    ctx = model._reduction_ctx
    assert torch.equal(ctx.source.sum(1), torch.ones(2, 65))  # every patch in exactly one token
    assert torch.equal(ctx.source.sum(2), ctx.size)  # a token's size = the patches it holds


def test_blocks_that_merge_nothing_compute_no_keys(monkeypatch) -> None:
    """With ``r = [0, 3, 0, 0]`` only block 1 averages its keys over the heads (``head_mean`` runs once a forward
    pass), and the logits are bit-equal to those of the same reducer made to compute keys in every block."""
    import methods.blocks

    calls = []
    real_head_mean = methods.blocks.head_mean
    monkeypatch.setattr(methods.blocks, "head_mean", lambda k: calls.append(1) or real_head_mean(k))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lean = methods.create("tome", r=[0, 3, 0, 0]).apply(tiny_vit())
    keys_everywhere = methods.create("tome", r=[0, 3, 0, 0])
    keys_everywhere.needs_at = lambda layer: keys_everywhere.needs
    every = keys_everywhere.apply(tiny_vit())
    with torch.inference_mode():
        lean_logits = lean(x)
        assert len(calls) == 1
        every_logits = every(x)
        assert len(calls) == 1 + 4
    assert torch.equal(lean_logits, every_logits)
    assert lean._reduction_ctx.counts()[0].tolist() == [[65, 65], [65, 62], [62, 62], [62, 62]]  # block 1 merges 3
