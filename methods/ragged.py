"""Batches whose images keep different numbers of tokens, run without paying for the padding.

An input-dependent reducer (LTMP, LTP, LTM) leaves image ``b`` of a batch with ``count[b]`` tokens; the
batch is stored padded to its largest count with an ``alive: (B, N)`` bool mask. Padding is wasted work, and
the spread is wide (on Fashion-MNIST one image keeps 24 tokens, another 121, in the same block), so

* token-wise layers (norms, qkv, proj, MLP) run on the alive tokens only, flattened to ``(T, C)``
  (:class:`Packing`): their cost is exactly the images' own;
* attention, the only token-pair part, runs in groups of images with similar counts, each group padded to
  its own largest count (:meth:`Packing.groups`). The groups are the optimal contiguous partition of the
  sorted counts under the cost ``sum_g |g| * width_g^2 * pair_macs + groups * overhead_macs``, where
  ``overhead_macs`` prices the fixed cost of launching one more group (:data:`GROUP_OVERHEAD_MACS`).

Every image's result is the one it gets alone (batch-1 equivalence holds up to float rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Fixed cost of one more attention group, in multiply-adds: ~12 small kernels. On the 2-core CPU this was
#: measured at ~150 us, the time of ~2e6 attention MACs; a GPU launch costs far more MACs' worth.
GROUP_OVERHEAD_MACS = {"cpu": 2e6, "cuda": 2e9}


@dataclass(frozen=True)
class AttentionGroup:
    """Images that share one padded attention call: ``rows`` (T_g,) packed positions of their tokens,
    ``slots`` (T_g,) the same tokens' positions in the flattened (images, width) group tensor."""

    images: int
    width: int
    rows: torch.Tensor
    slots: torch.Tensor


def plan_groups(counts: list[int], pair_macs: float, overhead_macs: float) -> list[list[int]]:
    """Split images into groups minimising ``sum_g (|g| * max_g^2 * pair_macs + overhead_macs)``.

    ``counts``: tokens per image. Optimal groups are contiguous in sorted order (swapping a small image into
    a group of larger ones never lowers that group's width), so an O(B^2) dynamic programme is exact.
    Returns lists of image indices, smallest counts first.
    """
    order = np.argsort(np.asarray(counts), kind="stable")
    sizes = np.asarray(counts, dtype=np.float64)[order]
    best = np.zeros(len(sizes) + 1)  # best[j]: cost of the first j sorted images
    cut = np.zeros(len(sizes) + 1, dtype=np.int64)
    for end in range(1, len(sizes) + 1):
        starts = np.arange(end)  # the last group is sorted images [start, end)
        cost = best[:end] + (end - starts) * sizes[end - 1] ** 2 * pair_macs + overhead_macs
        cut[end] = int(np.argmin(cost))
        best[end] = cost[cut[end]]
    groups, end = [], len(sizes)
    while end > 0:
        groups.append(order[cut[end]:end].tolist())
        end = cut[end]
    return groups[::-1]


class Packing:
    """The alive tokens of a padded batch as one flat (T, C) sequence.

    ``alive: (B, N)`` bool. ``pack: (B, N, C) -> (T, C)`` keeps the alive tokens (image by image, in order);
    ``unpack: (T, C) -> (B, N, C)`` puts them back with zeros in the padding (so dead keys hold finite values).
    """

    def __init__(self, alive: torch.Tensor) -> None:
        self.shape = tuple(alive.shape)
        self.index = alive.reshape(-1).nonzero().squeeze(1)  # (T,) flat positions b * N + n
        self.counts = alive.sum(1)  # (B,)
        self.image = self.index // self.shape[1]  # (T,) image of each packed token
        self.rank = (alive.long().cumsum(1) - 1).reshape(-1).index_select(0, self.index)  # (T,) order within its image

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        out = packed.new_zeros(self.shape[0] * self.shape[1], packed.shape[-1])
        return out.index_copy_(0, self.index, packed).view(*self.shape, packed.shape[-1])

    def groups(self, pair_macs: float, overhead_macs: float) -> list[AttentionGroup]:
        """The attention groups (see :func:`plan_groups`); ``pair_macs``: MACs per (query, key) pair."""
        counts = self.counts.tolist()
        group_of = torch.empty(len(counts), dtype=torch.long)
        slot_of = torch.empty(len(counts), dtype=torch.long)
        for g, images in enumerate(plan_groups(counts, pair_macs, overhead_macs)):
            group_of[images] = g
            slot_of[images] = torch.arange(len(images))
        widths = [0] * (int(group_of.max()) + 1)
        for image, g in enumerate(group_of.tolist()):
            widths[g] = max(widths[g], counts[image])
        group_of, slot_of = group_of.to(self.index.device), slot_of.to(self.index.device)
        token_group = group_of[self.image]
        out = []
        for g, width in enumerate(widths):
            rows = (token_group == g).nonzero().squeeze(1)
            slots = slot_of[self.image[rows]] * width + self.rank[rows]
            out.append(AttentionGroup(int((group_of == g).sum()), width, rows, slots))
        return out


def attention_received(probs: torch.Tensor, query_alive: torch.Tensor) -> torch.Tensor:
    """Importance: attention each key receives, mean over heads and alive queries.

    ``probs: (B, H, N, N)``, ``query_alive: (B, N)`` bool -> ``(B, N)`` fp32, as one (B, 1, N) @ (B, H, N, N) matmul.
    """
    weight = query_alive.float()
    weight = (weight / (weight.sum(1, keepdim=True) * probs.shape[1])).detach().to(probs.dtype)
    return (weight[:, None, None, :] @ probs).float().sum(1)[:, 0]


def ragged_attention(qkv: torch.Tensor, packing: Packing, num_heads: int, scale: float,
                     log_size: torch.Tensor | None, need_importance: bool, dropout_p: float = 0.0,
                     overhead_macs: float = GROUP_OVERHEAD_MACS["cpu"]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention of every image over its own alive tokens.

    ``qkv: (T, 3, H, d)`` packed (q/k norms already applied); ``log_size: (T,)`` proportional-attention bias or
    None. Returns ``out: (T, H * d)`` and, if asked, ``importance: (B, N)`` (0 in the padding).
    """
    tokens, _, heads, head_dim = qkv.shape
    flat = qkv.reshape(tokens, -1)
    out = qkv.new_empty(tokens, heads * head_dim)
    batch, width_all = packing.shape
    importance = torch.zeros(batch * width_all, device=qkv.device) if need_importance else None
    for group in packing.groups(2 * heads * head_dim, overhead_macs):
        n, w = group.images, group.width
        block = flat.new_zeros(n * w, flat.shape[1]).index_copy_(0, group.slots, flat.index_select(0, group.rows))
        q, k, v = block.view(n, w, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        valid = torch.zeros(n * w, dtype=torch.bool, device=qkv.device).index_fill_(0, group.slots, True)
        bias = torch.zeros(n * w, device=qkv.device)
        if log_size is not None:
            bias.index_copy_(0, group.slots, log_size.index_select(0, group.rows).float())
        bias = bias.masked_fill(~valid, float("-inf")).view(n, 1, 1, w).to(q.dtype)
        if need_importance:
            probs = ((q * scale) @ k.transpose(-2, -1) + bias).softmax(-1)
            received = attention_received(probs, valid.view(n, w)).reshape(-1)
            importance.index_copy_(0, packing.index.index_select(0, group.rows), received.index_select(0, group.slots))
            result = F.dropout(probs, dropout_p) @ v if dropout_p else probs @ v
        else:
            result = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
        out.index_copy_(0, group.rows, result.transpose(1, 2).reshape(n * w, -1).index_select(0, group.slots))
    return out, None if importance is None else importance.view(batch, width_all)
