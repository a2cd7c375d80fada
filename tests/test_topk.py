"""Top-K pruning by CLS attention (EViT-style), on a hand-built token set whose result was worked out by hand."""
from __future__ import annotations

import pytest
import torch

import methods
from methods.blocks import ReductionContext
from methods.topk import pruning_layers
from tests.conftest import hand_dims


def test_pruning_layers_are_evits_4th_7th_and_10th_of_12() -> None:
    assert pruning_layers(12) == (3, 6, 9)
    assert pruning_layers(4) == (1, 2, 3)
    assert pruning_layers(3) == (1, 2)  # step 1: blocks 1, 2 and 3 capped at the last, 2
    assert pruning_layers(2) == (1,)
    assert pruning_layers(1) == (0,)


@pytest.mark.parametrize("fuse", [True, False])
def test_keeps_the_ceil_of_keep_rate_most_attended_tokens_and_fuses_the_rest_by_attention(fuse: bool) -> None:
    """CLS + 5 patches, keep_rate 0.5: ceil(2.5) = 3 kept. CLS attention 0.1, 0.4, 0.05, 0.3, 0.15 keeps patches 2, 4
    and 5 (in position order); patches 1 and 3 fuse into (0.1 * 10 + 0.05 * 30) / 0.15 = 16.67, of size 2."""
    reducer = methods.create("topk", keep_rate=0.5, fuse=fuse)
    ctx = ReductionContext(reducer, hand_dims(5, depth=4))
    ctx.stats["cls_attn"] = torch.tensor([[0.0, 0.1, 0.4, 0.05, 0.3, 0.15]])
    x = torch.tensor([[[7.0], [10.0], [20.0], [30.0], [40.0], [50.0]]])
    assert torch.equal(reducer.reduce(0, x, ctx), x)  # block 0 is not a pruning layer
    out = reducer.reduce(1, x, ctx)[0, :, 0]
    if fuse:
        assert torch.allclose(out, torch.tensor([7.0, 20.0, 40.0, 50.0, 2.5 / 0.15]))
        assert ctx.size[0].tolist() == [1.0, 1.0, 1.0, 1.0, 2.0]
    else:
        assert out.tolist() == [7.0, 20.0, 40.0, 50.0]


def test_kept_tokens_keep_their_position_order() -> None:
    """CLS attention rising with position (0.1, 0.15, 0.05, 0.3, 0.4) ranks patches 5, 4, 2; they are kept as 2, 4, 5."""
    reducer = methods.create("topk", keep_rate=0.5, fuse=False)
    ctx = ReductionContext(reducer, hand_dims(5, depth=4))
    ctx.stats["cls_attn"] = torch.tensor([[0.0, 0.1, 0.15, 0.05, 0.3, 0.4]])
    x = torch.tensor([[[7.0], [10.0], [20.0], [30.0], [40.0], [50.0]]])
    assert reducer.reduce(1, x, ctx)[0, :, 0].tolist() == [7.0, 20.0, 40.0, 50.0]


def test_a_keep_rate_that_keeps_every_token_adds_no_fused_token() -> None:
    """keep_rate 0.9 of 5 patches keeps ceil(4.5) = 5: nothing is pruned, so nothing is fused (no empty fused token)."""
    reducer = methods.create("topk", keep_rate=0.9, fuse=True)
    ctx = ReductionContext(reducer, hand_dims(5, depth=4))
    ctx.stats["cls_attn"] = torch.tensor([[0.0, 0.1, 0.4, 0.05, 0.3, 0.15]])
    x = torch.tensor([[[7.0], [10.0], [20.0], [30.0], [40.0], [50.0]]])
    assert torch.equal(reducer.reduce(1, x, ctx), x)


@pytest.mark.parametrize("num_prefix", [0, 2])
def test_cls_attention_is_the_mean_over_heads_and_prefix_queries(num_prefix: int) -> None:
    """2 heads, 4 tokens. With 2 prefix tokens (CLS + a register), their rows: head 0 attends from token 0 to key 0
    and from token 1 to key 1, head 1 to keys 2 and 3: the mean over heads and both prefix rows is 0.25 each. Without
    a prefix token every query counts: the mean over heads and all four rows."""
    attn = torch.zeros(1, 2, 4, 4)
    attn[0, 0, [0, 1], [0, 1]] = 1.0
    attn[0, 1, [0, 1], [2, 3]] = 1.0
    attn[0, :, 2:, 0] = 1.0  # queries 2 and 3 (patches) attend to key 0
    ctx = ReductionContext(methods.create("topk"), hand_dims(4 - num_prefix, num_prefix=num_prefix))
    ctx.record_attention(attn)
    expected = [0.25, 0.25, 0.25, 0.25] if num_prefix else [5 / 8, 1 / 8, 1 / 8, 1 / 8]  # key 0: 1 + 2 from each head
    assert ctx.stats["cls_attn"][0].tolist() == expected
