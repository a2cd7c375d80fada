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
    """Images that share one padded attention call: ``images`` x ``width`` cells (image slot, token position),
    the cells ``start`` to ``start + images * width`` of a :class:`GroupLayout`."""

    images: int
    width: int
    start: int

    @property
    def cells(self) -> int:
        return self.images * self.width


@dataclass(frozen=True)
class GroupLayout:
    """Where every packed token sits in the attention groups, so that one ``index_copy`` lays out the q, k, v of
    all groups, bmm-ready and padded, and one ``index_select`` brings the outputs back.

    Per packed token (T,): ``start``, ``images``, ``width`` of its group, its image's ``slot`` in the group and
    its ``rank`` in the image; ``cell = start + slot * width + rank``.
    """

    groups: list[AttentionGroup]
    cells: int
    start: torch.Tensor
    images: torch.Tensor
    width: torch.Tensor
    slot: torch.Tensor
    rank: torch.Tensor

    @property
    def cell(self) -> torch.Tensor:
        return self.start + self.slot * self.width + self.rank

    def rows(self, parts: int, heads: int) -> torch.Tensor:
        """(T, parts, heads) rows of a ``(parts * heads * cells, d)`` buffer that holds, group by group, a
        contiguous ``(parts, images * heads, width, d)`` block: part ``c`` (q/k/v), head ``h`` of each token."""
        part = torch.arange(parts, device=self.start.device)[None, :, None]
        head = torch.arange(heads, device=self.start.device)[None, None, :]
        per_token = lambda t: t[:, None, None]  # noqa: E731
        return (parts * heads * per_token(self.start)
                + ((part * per_token(self.images) + per_token(self.slot)) * heads + head) * per_token(self.width)
                + per_token(self.rank))


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

    def groups(self, pair_macs: float, overhead_macs: float, max_pairs: float = float("inf")) -> GroupLayout:
        """The attention groups (see :func:`plan_groups`); ``pair_macs``: MACs per (query, key) pair."""
        counts = self.counts.tolist()
        batch = len(counts)
        if min(counts) == max(counts):  # no padding: consecutive images, as evenly split as the cap allows
            width = counts[0]
            per_group = batch if width * width * batch <= max_pairs else max(1, int(max_pairs // (width * width)))
            bounds = np.linspace(0, batch, -(-batch // per_group) + 1).round().astype(int).tolist()
            plan = [list(range(first, end)) for first, end in zip(bounds[:-1], bounds[1:])]
        else:
            plan = plan_groups(counts, pair_macs, overhead_macs, max_pairs)
        groups, per_image, cells = [], [(0, 0, 0, 0)] * batch, 0  # per image: group start, images, width, slot
        for images in plan:
            group = AttentionGroup(len(images), max(counts[i] for i in images), cells)
            groups.append(group)
            for slot, image in enumerate(images):
                per_image[image] = (group.start, group.images, group.width, slot)
            cells += group.cells
        start, images, width, slot = torch.tensor(per_image, device=self.index.device)[self.image].unbind(1)
        return GroupLayout(groups, cells, start, images, width, slot, self.rank)


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
    max_pairs = MAX_GROUP_PROBS[device_type] / heads if need_importance else float("inf")
    layout = packing.groups(2 * heads * head_dim, GROUP_OVERHEAD_MACS[device_type], max_pairs)
    grouped = qkv.new_zeros(3 * heads * layout.cells, head_dim)  # zeros: padded queries/keys stay finite
    grouped.index_copy_(0, layout.rows(3, heads).reshape(-1), qkv.reshape(-1, head_dim))
    cell = layout.cell
    key_bias = qkv.new_full((layout.cells,), float("-inf"))  # -inf: padded keys
    key_bias[cell] = 0.0 if log_size is None else log_size.to(qkv.dtype)
    outputs, received = [], []
    for group in layout.groups:
        n, w = group.images, group.width
        q, k, v = grouped[3 * heads * group.start:3 * heads * (group.start + group.cells)].view(3, n * heads, w,
                                                                                               head_dim).unbind(0)
        bias = key_bias[group.start:group.start + group.cells].view(n, 1, w)
        if need_importance:
            bias_rows = bias.expand(n, heads, w).reshape(n * heads, 1, w)
            probs = torch.baddbmm(bias_rows, q, k.transpose(1, 2), alpha=scale).softmax(-1)
            received.append(attention_received(probs.view(n, heads, w, w), bias.view(n, w) > float("-inf")).reshape(-1))
            probs = F.dropout(probs, dropout_p) if dropout_p else probs
            result = torch.bmm(probs, v)
        else:
            result = F.scaled_dot_product_attention(q.view(n, heads, w, head_dim), k.view(n, heads, w, head_dim),
                                                    v.view(n, heads, w, head_dim), attn_mask=bias.view(n, 1, 1, w),
                                                    dropout_p=dropout_p, scale=scale)
        outputs.append(result.reshape(n * heads * w, head_dim))
    out = torch.cat(outputs).index_select(0, layout.rows(1, heads).reshape(-1)).view(tokens, heads * head_dim)
    if not need_importance:
        return out, None
    batch, width_all = packing.shape
    importance = torch.zeros(batch * width_all, device=qkv.device)
    importance[packing.index] = torch.cat(received).float()[cell]
    return out, importance.view(batch, width_all)
