"""Top-K pruning by CLS attention, EViT-style (Liang et al., "Not All Patches are What You Need", ICLR 2022).

The worked example of docs/adding_a_method.md: a whole method in one file, using only the shared layer.

At the pruning layers (EViT's 4th, 7th and 10th of 12 blocks, i.e. ``depth // 4 * {1, 2, 3}`` here),
between attention and MLP: keep the ``ceil(keep_rate * n)`` non-prefix tokens that the prefix tokens (CLS)
attend to most (mean over heads); with ``fuse`` the pruned tokens are fused into one extra token, their
average weighted by that attention (EViT's "inattentive token fusion"). Models without a prefix token use
the attention each token receives from all queries.
"""
from __future__ import annotations

import math

import torch

from methods.base import Knob, TokenReducer, register_reducer
from methods.blocks import ReductionContext
from methods.tokens import keep_tokens


def pruning_layers(depth: int) -> tuple[int, ...]:
    step = max(depth // 4, 1)
    return tuple(sorted({min(step * i, depth - 1) for i in (1, 2, 3)}))


@register_reducer("topk")
class TopK(TokenReducer):
    knobs = (
        Knob("keep_rate", float, default=0.7, low=0.05, high=1.0, sweep=(0.9, 0.7, 0.5),
             help="fraction of non-prefix tokens kept at each pruning layer"),
        Knob("fuse", bool, default=True, help="fuse the pruned tokens into one (EViT)"),
    )
    off = {"keep_rate": 1.0}
    needs = frozenset({"cls_attn"})

    def reduce(self, layer: int, x: torch.Tensor, ctx: ReductionContext) -> torch.Tensor:
        if layer not in pruning_layers(ctx.dims.depth) or self.keep_rate >= 1.0:
            return x
        batch, tokens, _ = x.shape
        rest = tokens - ctx.num_prefix
        keep = math.ceil(self.keep_rate * rest)
        if keep >= rest:
            return x
        score = ctx.stats["cls_attn"][:, ctx.num_prefix:]
        ranked = torch.sort(score, dim=-1, descending=True, stable=True).indices + ctx.num_prefix
        prefix = torch.arange(ctx.num_prefix, device=x.device).expand(batch, -1)
        kept = torch.cat([prefix, ranked[:, :keep].sort(-1).values], 1)
        if not self.fuse:
            return keep_tokens(x, ctx, kept)
        pruned = ranked[:, keep:]
        weight = score.gather(1, pruned - ctx.num_prefix)
        weight = (weight / weight.sum(1, keepdim=True))[..., None].to(x.dtype)
        fused = (x.gather(1, pruned[..., None].expand(-1, -1, x.shape[2])) * weight).sum(1, keepdim=True)
        fused_size = ctx.sizes(x).gather(1, pruned).sum(1, keepdim=True)
        fused_source = None if ctx.source is None else ctx.source.gather(
            1, pruned[..., None].expand(-1, -1, ctx.source.shape[2])).sum(1, keepdim=True)
        size = ctx.sizes(x)
        out = keep_tokens(x, ctx, kept)
        ctx.size = torch.cat([size.gather(1, kept), fused_size], 1)
        if fused_source is not None:
            ctx.source = torch.cat([ctx.source, fused_source], 1)
        return torch.cat([out, fused], 1)
