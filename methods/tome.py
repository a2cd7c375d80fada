"""ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023). Off-the-shelf.

In every block, between attention (+ residual) and the MLP:

1. split the non-prefix tokens alternately into sets A and B;
2. similarity = cosine of the keys averaged over heads; each A token finds its most similar B token;
3. the ``r`` A tokens with the highest best-similarity merge into their matches (size-weighted average;
   ``r`` is capped at half the non-prefix tokens, so at most half the tokens go per layer);
4. proportional attention (attention logits + log size) in the following blocks.

``r`` is a constant, a per-layer list (padded with zeros), or with ``inflect`` a linear schedule: the
first layer merges ``r * (1 - inflect)``, the last ``r * (1 + inflect)``; ``inflect = -1`` is the paper's
decreasing schedule (2r down to 0).

Differences from the reference code (the paper is followed; tests pin each):
* prefix tokens are kept out of both sets (the reference puts CLS into A with -inf score and lets
  distillation / register tokens be merged *into*); for CLS-only models the split is identical;
* kept A tokens are always re-sorted to their original order (the reference sorts only with a CLS token),
  so the next layer's alternation does not depend on the score order;
* the similarity ignores dead (padded) tokens when run after a reducer that pads (no shipped plug-in pads
  before ToMe; a subclass that does must keep ``r`` within each image's alive A tokens, or padding merges).
"""
from __future__ import annotations

import torch

from bench.errors import BenchError
from methods.base import Knob, TokenReducer, register_reducer
from methods.blocks import ModelDims, ReductionContext
from methods.tokens import bipartite_positions, bipartite_similarity_macs, key_similarity, merge_bipartite


def r_schedule(r: int | list[int], depth: int, inflect: float = 0.0) -> list[int]:
    """Tokens to merge per layer. A list is used as given (zero-padded); an int follows the linear schedule."""
    if isinstance(r, list):
        return (list(r) + [0] * depth)[:depth]
    first = int(r * (1.0 - inflect))
    last = 2 * r - first
    if depth == 1:
        return [first]
    return [int(first + (last - first) * layer / (depth - 1)) for layer in range(depth)]


@register_reducer("tome")
class ToMe(TokenReducer):
    knobs = (
        Knob("r", int, default=8, low=0, sweep=(8, 13, 16), help="tokens merged per layer (int or per-layer list)"),
        Knob("inflect", float, default=0.0, low=-1.0, high=1.0, help="linear r schedule; -1 = decreasing"),
        Knob("prop_attn", bool, default=True, help="proportional attention (log size bias)"),
        Knob("trace_source", bool, default=False, help="track which patches each token holds (for plots)"),
    )
    off = {"r": 0}
    needs = frozenset({"keys"})

    def __init__(self, **values) -> None:
        super().__init__(**values)
        self.proportional_attention = self.values["prop_attn"]
        self.trace_source = self.values["trace_source"]
        self.schedule: list[int] = []

    def check_model(self, model) -> None:
        dims = ModelDims.of(model)
        self.schedule = r_schedule(self.values["r"], dims.depth, self.values["inflect"])
        limit = dims.num_patches // 2
        if max(self.schedule) > limit:
            raise BenchError(f"knob tome.r={max(self.schedule)} merges more than half of the {dims.num_patches} patch "
                             f"tokens in one layer: use r <= {limit}")

    def needs_at(self, layer: int) -> frozenset[str]:
        """Keys only in the blocks that merge: one whose ``r`` is 0 computes no head-mean keys (r=0 everywhere then
        runs what the unpatched model runs, plus the token counts)."""
        return self.needs if layer >= len(self.schedule) or self.schedule[layer] > 0 else frozenset()

    def reduce(self, layer: int, x: torch.Tensor, ctx: ReductionContext) -> torch.Tensor:
        a_pos, b_pos = bipartite_positions(x.shape[1], ctx.num_prefix, x.device)
        r = min(self.schedule[layer], len(a_pos))
        if r <= 0:
            return x
        scores = key_similarity(ctx.stats["keys"], a_pos, b_pos)
        if ctx.alive is not None:
            dead = ~(ctx.alive > 0)
            scores = scores.masked_fill(dead[:, a_pos, None] | dead[:, None, b_pos], float("-inf"))
        best, best_b = scores.max(-1)
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
        merged_a = order[:, :r]
        kept_a = order[:, r:].sort(-1).values
        alive = ctx.alive
        out = merge_bipartite(x, ctx, a_pos, b_pos, merged_a, best_b.gather(1, merged_a), kept_a)
        if alive is not None:
            prefix = alive[:, : ctx.num_prefix]
            ctx.alive = torch.cat([prefix, alive[:, a_pos].gather(1, kept_a), alive[:, b_pos]], 1)
        return out

    def extra_macs(self, layer: int, n_attn: torch.Tensor, n_mlp: torch.Tensor, dims: ModelDims) -> torch.Tensor:
        """The similarity matmul |A| x |B| x head_dim (only in layers that merge)."""
        return bipartite_similarity_macs(n_attn, dims.num_prefix, dims.head_dim) * float(self.schedule[layer] > 0)
