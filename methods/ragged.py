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
  Where attention probabilities are materialised (importance), a group also holds at most
  :data:`MAX_GROUP_PROBS` of them, so they stay in cache: on the 2-core CPU, explicit attention of 32
  images x 3 heads x 197 tokens takes 14.6 ms in one call and 5.3 ms in groups of 4-8 images (fused SDPA:
  4.8 ms), so even an unpadded batch runs grouped.

Every image's result is the one it gets alone (batch-1 equivalence holds up to float rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

#: Fixed cost of one more attention group, in multiply-adds: ~12 small kernels. On the 2-core CPU this was
#: measured at ~150 us, the time of ~2e6 attention MACs; a GPU launch costs far more MACs' worth.
GROUP_OVERHEAD_MACS = {"cpu": 2e6, "cuda": 2e9}
#: Largest (images x heads x width^2) probability tensor of one group (4 MiB in fp32): what a CPU cache holds.
MAX_GROUP_PROBS = {"cpu": 2 ** 20, "cuda": 2 ** 40}


@dataclass(frozen=True)
class AttentionGroup:
    """Images that share one padded attention call, ``images`` x ``width`` tokens.

    ``rows``: their tokens' packed positions, a slice when the group is unpadded (consecutive images that all
    hold ``width`` tokens) else a (T_g,) tensor; ``slots``: (T_g,) the same tokens' positions in the flattened
    (images, width) group tensor, None when unpadded; ``targets``: (T_g,) their flat positions b * N + n in
    the padded batch.
    """

    images: int
    width: int
    rows: slice | torch.Tensor
    targets: torch.Tensor
    slots: torch.Tensor | None = None

    def take(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``packed: (T, F) -> (images * width, F)``, ``fill`` in the padding."""
        if self.slots is None:
            return packed[self.rows]
        out = packed.new_full((self.images * self.width, packed.shape[1]), fill)
        return out.index_copy_(0, self.slots, packed.index_select(0, self.rows))

    def put(self, packed: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values: (images * width, F)`` back to the group's rows of ``packed: (T, F)``."""
        if self.slots is None:
            packed[self.rows] = values
        else:
            packed.index_copy_(0, self.rows, values.index_select(0, self.slots))


def plan_groups(counts: list[int], pair_macs: float, overhead_macs: float,
                max_pairs: float = float("inf")) -> list[list[int]]:
    """Split images into groups minimising ``sum_g (|g| * max_g^2 * pair_macs + overhead_macs)``, every group of
    two or more images holding at most ``max_pairs`` padded (query, key) pairs (``|g| * max_g^2``).

    ``counts``: tokens per image. Optimal groups are contiguous in sorted order (swapping a small image into
    a group of larger ones never lowers that group's width), so an O(B^2) dynamic programme is exact.
    Returns lists of image indices, smallest counts first.
    """
    order = np.argsort(np.asarray(counts), kind="stable")
    sizes = np.asarray(counts, dtype=np.float64)[order]
    best = np.zeros(len(sizes) + 1)  # best[j]: cost of the first j sorted images
    cut = np.zeros(len(sizes) + 1, dtype=np.int64)
    for end in range(1, len(sizes) + 1):
        pairs = sizes[end - 1] ** 2
        fits = end if pairs * end <= max_pairs else max(1, int(max_pairs // pairs))  # images a group may hold
        first = end - min(end, fits)  # earliest start of the last group
        starts = np.arange(first, end)  # the last group is sorted images [start, end)
        cost = best[first:end] + (end - starts) * pairs * pair_macs + overhead_macs
        cut[end] = first + int(np.argmin(cost))
        best[end] = cost[cut[end] - first]
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
        self.alive = alive
        self.shape = tuple(alive.shape)
        self.dense = bool(alive.all())  # no padding: pack and unpack are reshapes
        self.index = alive.reshape(-1).nonzero().squeeze(1)  # (T,) flat positions b * N + n
        self.counts = alive.sum(1)  # (B,)

    @cached_property
    def image(self) -> torch.Tensor:
        """(T,) image of each packed token (attention grouping only, so computed on demand)."""
        return self.index // self.shape[1]

    @cached_property
    def rank(self) -> torch.Tensor:
        """(T,) order of each packed token within its image."""
        return (self.alive.long().cumsum(1) - 1).reshape(-1).index_select(0, self.index)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return x.reshape(-1, x.shape[-1])
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return packed.view(*self.shape, packed.shape[-1])
        out = packed.new_zeros(self.shape[0] * self.shape[1], packed.shape[-1])
        return out.index_copy_(0, self.index, packed).view(*self.shape, packed.shape[-1])

    def groups(self, pair_macs: float, overhead_macs: float, max_pairs: float = float("inf")) -> list[AttentionGroup]:
        """The attention groups (see :func:`plan_groups`); ``pair_macs``: MACs per (query, key) pair."""
        counts = self.counts.tolist()
        batch = len(counts)
        if min(counts) == max(counts):  # no padding: consecutive images, as evenly split as the cap allows
            width = counts[0]
            per_group = batch if width * width * batch <= max_pairs else max(1, int(max_pairs // (width * width)))
            bounds = np.linspace(0, batch, -(-batch // per_group) + 1).round().astype(int).tolist()
            return [AttentionGroup(end - start, width, slice(start * width, end * width),
                                   self.index[start * width:end * width]) for start, end in zip(bounds[:-1], bounds[1:])]
        plan = plan_groups(counts, pair_macs, overhead_macs, max_pairs)
        position, local, width_of = [0] * batch, [0] * batch, [0] * batch  # per image: order, slot, group width
        order_index = 0
        for images in plan:
            width = max(counts[i] for i in images)
            for slot, image in enumerate(images):
                position[image], local[image], width_of[image] = order_index, slot, width
                order_index += 1
        device = self.index.device
        position_t, local_t, width_t = (torch.tensor(v, device=device)[self.image] for v in (position, local, width_of))
        order = torch.argsort(position_t * self.shape[1] + self.rank)  # packed tokens, group by group, image by image
        slots = (local_t * width_t + self.rank)[order]
        targets = self.index[order]
        groups, start = [], 0
        for images in plan:
            end = start + sum(counts[i] for i in images)
            groups.append(AttentionGroup(len(images), width_of[images[0]], order[start:end], targets[start:end],
                                         slots[start:end]))
            start = end
        return groups


def attention_received(probs: torch.Tensor, query_alive: torch.Tensor) -> torch.Tensor:
    """Importance: attention each key receives, mean over heads and alive queries.

    ``probs: (B, H, N, N)``, ``query_alive: (B, N)`` bool -> ``(B, N)`` fp32, as one (B, 1, H * N) @ (B, H * N, N) matmul.
    """
    batch, heads, queries, keys = probs.shape
    weight = query_alive.float()
    weight = (weight / (weight.sum(1, keepdim=True) * heads)).detach().to(probs.dtype)
    weight = weight[:, None, :].expand(batch, heads, queries).reshape(batch, 1, heads * queries)
    return (weight @ probs.reshape(batch, heads * queries, keys)).float()[:, 0]


def ragged_attention(qkv: torch.Tensor, packing: Packing, num_heads: int, scale: float,
                     log_size: torch.Tensor | None, need_importance: bool, dropout_p: float = 0.0,
                     device_type: str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention of every image over its own alive tokens.

    ``qkv: (T, 3, H, d)`` packed (q/k norms already applied); ``log_size: (T,)`` proportional-attention bias or
    None. Returns ``out: (T, H * d)`` and, if asked, ``importance: (B, N)`` (0 in the padding).
    """
    tokens, _, heads, head_dim = qkv.shape
    flat = qkv.reshape(tokens, -1)
    key_bias = (qkv.new_zeros(tokens) if log_size is None else log_size.to(qkv.dtype))[:, None]  # (T, 1)
    out = qkv.new_empty(tokens, heads * head_dim)
    batch, width_all = packing.shape
    importance = torch.zeros(batch * width_all, device=qkv.device) if need_importance else None
    max_pairs = MAX_GROUP_PROBS[device_type] / heads if need_importance else float("inf")
    for group in packing.groups(2 * heads * head_dim, GROUP_OVERHEAD_MACS[device_type], max_pairs):
        n, w = group.images, group.width
        q, k, v = group.take(flat).view(n, w, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (n, H, w, d)
        bias = group.take(key_bias, float("-inf")).view(n, 1, 1, w)  # -inf: padded keys
        if need_importance:
            bias_rows = bias.expand(n, heads, 1, w).reshape(n * heads, 1, w)
            probs = torch.baddbmm(bias_rows, q.reshape(n * heads, w, head_dim),
                                  k.reshape(n * heads, w, head_dim).transpose(1, 2), alpha=scale).softmax(-1)
            received = attention_received(probs.view(n, heads, w, w), bias.view(n, w) > float("-inf"))
            received = received.reshape(-1)
            importance[group.targets] = received if group.slots is None else received.index_select(0, group.slots)
            probs = F.dropout(probs, dropout_p) if dropout_p else probs
            result = torch.bmm(probs, v.reshape(n * heads, w, head_dim)).view(n, heads, w, head_dim)
        else:
            result = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
        group.put(out, result.transpose(1, 2).reshape(n * w, -1))
    return out, None if importance is None else importance.view(batch, width_all)
