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
  images x 3 heads x 197 tokens takes 14.6 ms in one call and 5.3 ms in cache-sized groups (fused SDPA:
  4.8 ms), so even an unpadded batch runs grouped.

Every image's result is the one it gets alone (batch-1 equivalence holds up to float rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch
import torch.nn.functional as F

#: Fixed cost of one more attention group, in multiply-adds: its few kernels and views. On the 2-core CPU this was
#: measured at ~150 us, the time of ~2e6 attention MACs (1e6 and 4e6 measured the same); a GPU launch costs far
#: more MACs' worth.
GROUP_OVERHEAD_MACS = {"cpu": 2e6, "cuda": 2e9}
#: Largest (images x heads x width^2) probability tensor of one group (2 MiB in fp32): what a CPU cache holds.
#: 2^19 measured 15 % faster than 2^20 for the whole embedded model in fp32 and ~4 % in bf16 (2^18: no better).
MAX_GROUP_PROBS = {"cpu": 2 ** 19, "cuda": 2 ** 40}


@dataclass(frozen=True)
class GroupLayout:
    """Where the images of a ragged batch sit for grouped attention (index arrays built in NumPy: for a batch of
    32 images they cost a fraction of the equivalent dozens of small torch operations, paid in every block).

    Images are re-ordered by count (smallest first) and padded to the batch's largest count ``width``, so that
    every group is a contiguous block of the padded layout: ``spans`` lists ``(start, end, group_width)`` ranges of
    the re-ordered images. ``source: (B * width,)`` is the packed row that fills each slot of that layout (the
    image's first row in its padding, which ``valid: (B, width)`` marks False).

    Group g's q, k and v are gathered from *compact* slots, where it is stored whole as ``(n_g, H, w_g)`` right
    after group g - 1 (``group_starts[g]`` is its first slot): ``qkv_index`` holds, from ``3 * H * group_starts[g]``,
    the rows of ``qkv: (T, 3, H, d)`` seen as (T * 3 * H, d) rows that fill its ``(3, n_g, H, w_g)`` block, so a
    group is one contiguous slice, one ``index_select`` of d-wide rows, already in the (n * H, w, d) shape the
    batched matmuls need (in fp32 on the CPU ~4x faster than gathering tokens and then permuting). Results go back
    through the same compact layout: ``token_slot: (T,)`` is each packed token's slot and ``token_head_rows: (T, H)``
    its head-h row in a buffer of rows holding group g as ``(n_g, H, w_g)`` from row ``H * group_starts[g]``. Both
    directions are gathers, several times faster on a CPU than the equivalent scatters.
    """

    spans: list[tuple[int, int, int]]
    width: int
    group_starts: list[int]
    source: torch.Tensor
    valid: torch.Tensor
    qkv_index: torch.Tensor
    token_slot: torch.Tensor
    token_head_rows: torch.Tensor

    @classmethod
    def build(cls, counts: list[int], order: list[int], spans: list[tuple[int, int, int]], heads: int,
              device: torch.device) -> "GroupLayout":
        """The layout of images with ``counts`` tokens (packed image by image), re-ordered as ``order``, grouped as
        ``spans``."""
        parts = 3  # q, k, v
        count = np.asarray(counts)
        first = np.concatenate(([0], np.cumsum(count)))  # packed row of each image's first token
        layout_order = np.asarray(order)
        sizes = [end - start for start, end, _ in spans]
        group_width = np.repeat([w for _, _, w in spans], sizes)  # (B,) per image in layout order
        group_starts = [0, *np.cumsum([n * w for n, (_, _, w) in zip(sizes, spans)]).tolist()]
        width = spans[-1][2]
        slot = np.arange(width)
        layout_first = first[layout_order][:, None]
        valid = slot < count[layout_order][:, None]  # (B, width)
        source = np.where(valid, layout_first + slot, layout_first)  # padding: the image's first row (alive)
        within = np.arange(parts * heads).reshape(parts, 1, heads, 1)  # part * H + head
        qkv_index = np.concatenate([(source[start:end, None, :w] * (parts * heads) + within).ravel()
                                    for start, end, w in spans])  # group g: (3, n_g, H, w_g)
        image_base, image_width = np.empty_like(count), np.empty_like(count)  # compact slots, by original image
        image_base[layout_order] = np.concatenate(([0], np.cumsum(group_width)[:-1]))
        image_width[layout_order] = group_width
        image = np.repeat(np.arange(len(count)), count)  # (T,) image of each packed token
        token_slot = image_base[image] + np.arange(first[-1]) - first[image]  # image's first slot + token's position
        token_head_rows = (token_slot + (heads - 1) * image_base[image])[:, None] \
            + image_width[image][:, None] * np.arange(heads)  # head h: heads * image_base + position + h * width
        as_tensor = lambda array: torch.from_numpy(array).to(device)
        return cls(spans, width, group_starts, as_tensor(source.ravel()), as_tensor(valid), as_tensor(qkv_index),
                   as_tensor(token_slot), as_tensor(token_head_rows))

    @property
    def images(self) -> int:
        return self.valid.shape[0]

    def padded(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed: (T, F) -> (B, width, F)`` in layout order; padded slots hold a copy of the image's first row
        (finite; mask them with :attr:`valid`)."""
        return packed.index_select(0, self.source).view(self.images, self.width, packed.shape[-1])

    def group_qkv_rows(self, group: int) -> torch.Tensor:
        """The ``qkv_index`` slice of group ``group`` (a view): its ``(3, n, H, w)`` rows, flat."""
        parts_heads = self.qkv_index.numel() // self.group_starts[-1]
        return self.qkv_index[parts_heads * self.group_starts[group]:parts_heads * self.group_starts[group + 1]]


def plan_groups(counts: list[int], pair_macs: float, overhead_macs: float,
                max_pairs: float = float("inf")) -> list[list[int]]:
    """Split images into groups minimising ``sum_g (|g| * max_g^2 * pair_macs + overhead_macs)``, every group of
    two or more images holding at most ``max_pairs`` padded (query, key) pairs (``|g| * max_g^2``).

    ``counts``: tokens per image. Optimal groups are contiguous in sorted order (swapping a small image into
    a group of larger ones never lowers that group's width), so an O(B^2) dynamic programme is exact.
    Returns lists of image indices, smallest counts first.
    """
    order = sorted(range(len(counts)), key=counts.__getitem__)  # stable
    sizes = [float(counts[image]) for image in order]
    best, cut = [0.0], [0]  # best[j]: cost of the first j sorted images; cut[j]: where their last group starts
    for end in range(1, len(sizes) + 1):  # plain Python: for a batch of 32 ~4x faster than NumPy on tiny arrays
        pairs = sizes[end - 1] ** 2
        fits = end if pairs * end <= max_pairs else max(1, int(max_pairs // pairs))  # images a group may hold
        unit, cost, start = pairs * pair_macs, float("inf"), end
        for first in range(end - min(end, fits), end):  # the last group is sorted images [first, end)
            candidate = best[first] + (end - first) * unit
            if candidate < cost:  # the earliest start among equal costs
                cost, start = candidate, first
        best.append(cost + overhead_macs)
        cut.append(start)
    groups, end = [], len(sizes)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


class Packing:
    """The alive tokens of a padded batch as one flat (T, C) sequence.

    ``alive: (B, N)`` bool. ``pack: (B, N, C) -> (T, C)`` keeps the alive tokens (image by image, in order);
    ``unpack: (T, C) -> (B, N, C)`` puts them back with zeros in the padding (so dead keys hold finite values).
    """

    def __init__(self, alive: torch.Tensor, counts: torch.Tensor | None = None,
                 count_list: list[int] | None = None) -> None:
        """``counts: (B,)`` and ``count_list`` (the same as Python ints), when the caller knows them, spare their
        reductions and a device sync."""
        self.alive = alive
        self.shape = tuple(alive.shape)
        self.counts = alive.sum(1) if counts is None else counts  # (B,)
        if count_list is not None:
            self.count_list = count_list
            self.dense = min(count_list) == self.shape[1]
        else:
            self.dense = bool(alive.all())  # no padding: pack and unpack are reshapes
        self.index = alive.reshape(-1).nonzero().squeeze(1)  # (T,) flat positions b * N + n
        self._unpacked: tuple[torch.Tensor, torch.Tensor] | None = None  # (last unpack's output, its input)

    @classmethod
    def of_counts(cls, counts: torch.Tensor, count_list: list[int]) -> "Packing":
        """The Packing whose image ``b`` holds its first ``counts[b]`` positions of ``max(counts)`` (what compaction
        leaves)."""
        alive = torch.arange(max(count_list), device=counts.device)[None] < counts[:, None]
        return cls(alive, counts, count_list)

    @cached_property
    def source(self) -> torch.Tensor:
        """(B * N,) packed row of each padded position; in the padding some alive row (which :meth:`unpack` zeroes)."""
        return (self.alive.reshape(-1).long().cumsum(0) - 1).clamp_min(0)

    @cached_property
    def count_list(self) -> list[int]:
        """``counts`` as Python ints (one device sync, shared by the plug-in and the attention groups)."""
        return self.counts.tolist()

    @classmethod
    def full(cls, x: torch.Tensor) -> "Packing":
        """The Packing of ``x: (B, N, ...)`` with every token alive (pack and unpack are reshapes)."""
        return cls(torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return x.reshape(-1, x.shape[-1])
        if self._unpacked is not None and self._unpacked[0] is x:  # x came from unpack: its packed form is known
            return self._unpacked[1]
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor, zero_padding: bool = True) -> torch.Tensor:
        """``packed: (T, F) -> (B, N, F)``; the padding holds zeros, or with ``zero_padding=False`` a copy of some
        alive row (finite, and positive where the rows are)."""
        if self.dense:
            return packed.view(*self.shape, packed.shape[-1])
        out = packed.index_select(0, self.source).view(*self.shape, packed.shape[-1])  # a gather: faster than a scatter
        if zero_padding:
            out.mul_(self.alive[..., None].to(out.dtype))  # zero the padding (6x faster than a broadcast masked_fill_)
            self._unpacked = (out, packed)
        return out

    def groups(self, pair_macs: float, overhead_macs: float, max_pairs: float = float("inf"),
               heads: int = 1) -> GroupLayout:
        """The attention groups (see :func:`plan_groups`) of ``heads`` heads; ``pair_macs``: MACs per (query, key)
        pair."""
        counts = self.count_list
        batch = len(counts)
        if min(counts) == max(counts):  # no padding: consecutive images, as evenly split as the cap allows
            width = counts[0]
            per_group = batch if width * width * batch <= max_pairs else max(1, int(max_pairs // (width * width)))
            bounds = np.linspace(0, batch, -(-batch // per_group) + 1).round().astype(int).tolist()
            spans = tuple((start, end, width) for start, end in zip(bounds[:-1], bounds[1:]))
            return _dense_layout(batch, spans, heads, self.index.device)  # the same in every block: built once
        spans, order = [], []
        for images in plan_groups(counts, pair_macs, overhead_macs, max_pairs):
            spans.append((len(order), len(order) + len(images), max(counts[i] for i in images)))
            order += images
        return GroupLayout.build(counts, order, spans, heads, self.index.device)


@lru_cache(maxsize=16)
def _dense_layout(batch: int, spans: tuple[tuple[int, int, int], ...], heads: int, device: torch.device) -> GroupLayout:
    """The :class:`GroupLayout` of ``batch`` images of one count (its tensors are only read, never written)."""
    return GroupLayout.build([spans[0][2]] * batch, list(range(batch)), list(spans), heads, device)


def attention_received(probs: torch.Tensor, query_alive: torch.Tensor) -> torch.Tensor:
    """Importance: attention each key receives, mean over heads and alive queries.

    ``probs: (B, H, N, N)``, ``query_alive: (B, N)`` bool -> ``(B, N)`` fp32, as one (B, 1, H * N) @ (B, H * N, N) matmul.
    """
    batch, heads, queries, keys = probs.shape
    weight = query_alive.float()
    weight = (weight / (weight.sum(1, keepdim=True) * heads)).detach().to(probs.dtype)
    weight = weight[:, None, :].expand(batch, heads, queries).reshape(batch, 1, heads * queries)
    return (weight @ probs.reshape(batch, heads * queries, keys)).float()[:, 0]


def _bmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out[:] = a @ b`` (batched, ``out`` contiguous): written by the matmul itself, or copied in where autograd
    has to see it (``out=`` does not record gradients)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        out.copy_(torch.bmm(a, b))
    else:
        torch.bmm(a, b, out=out)


def ragged_attention(qkv: torch.Tensor, packing: Packing, num_heads: int, scale: float,
                     log_size: torch.Tensor | None, need_importance: bool, dropout_p: float = 0.0,
                     device_type: str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention of every image over its own alive tokens.

    ``qkv: (T, 3, H, d)`` packed (q/k norms already applied); ``log_size: (T,)`` proportional-attention bias or
    None. Returns ``out: (T, H * d)`` and, if asked, ``importance: (B, N)`` (0 in the padding).
    Images are sorted by count and grouped (:class:`GroupLayout`); each group's q, k and v are one gather of
    d-wide rows, made just before its kernels use them (so they are still in cache); its result is written whole
    into a compact head-first buffer, which one gather of d-wide rows packs (:attr:`GroupLayout.token_head_rows`).
    """
    tokens, _, heads, head_dim = qkv.shape
    batch, width_all = packing.shape
    max_pairs = MAX_GROUP_PROBS[device_type] / heads if need_importance else float("inf")
    layout = packing.groups(2 * heads * head_dim, GROUP_OVERHEAD_MACS[device_type], max_pairs, heads)
    width, starts = layout.width, layout.group_starts
    qkv_rows = qkv.reshape(-1, head_dim)
    alive = layout.valid.float()
    key_bias = torch.zeros_like(alive) if log_size is None else layout.padded(log_size[:, None]).view(batch, width)
    key_bias = key_bias.masked_fill(alive == 0, float("-inf")).to(qkv.dtype).view(batch, 1, 1, width)  # padded keys
    out = qkv.new_empty(starts[-1] * heads, head_dim)  # compact: group g is (n_g, H, w_g, d) from row H * starts[g]
    if need_importance:
        key_bias = key_bias.expand(batch, heads, 1, width).reshape(batch * heads, 1, width)
        alive = alive.view(batch, 1, 1, width)
        query_weight = (alive / (alive.sum(-1, keepdim=True) * heads)).to(qkv.dtype).expand(batch, heads, 1, width)
        received = qkv.new_empty(starts[-1])  # compact: group g is (n_g, 1, w_g) from starts[g]
    for index, ((start, end, w), first) in enumerate(zip(layout.spans, starts)):
        n = end - start
        group = qkv_rows.index_select(0, layout.group_qkv_rows(index)).view(3, n, heads, w, head_dim)
        group_out = out[first * heads:(first + n * w) * heads].view(n * heads, w, head_dim)
        if need_importance:
            q, k, v = group.view(3, n * heads, w, head_dim).unbind(0)
            bias = key_bias[start * heads:end * heads, :, :w]
            probs = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale).softmax(-1)  # (n * H, w, w)
            weight = query_weight[start:end, :, :, :w].reshape(n, 1, heads * w)  # mean over heads and alive queries
            _bmm_into(received[first:first + n * w].view(n, 1, w), weight, probs.view(n, heads * w, w))
            probs = F.dropout(probs, dropout_p) if dropout_p else probs
            _bmm_into(group_out, probs, v)
        else:
            group_out.view(n, heads, w, head_dim).copy_(F.scaled_dot_product_attention(
                *group.unbind(0), attn_mask=key_bias[start:end, ..., :w], dropout_p=dropout_p, scale=scale))
    out = out.index_select(0, layout.token_head_rows.view(-1)).view(tokens, heads * head_dim)
    if not need_importance:
        return out, None
    importance = received.index_select(0, layout.token_slot).float()  # (T,) in packed order
    return out, torch.zeros(batch * width_all, device=qkv.device).index_copy_(0, packing.index, importance).view(batch, width_all)
