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

import itertools
from dataclasses import dataclass
from functools import cached_property

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
    """Where the images of a ragged batch sit for grouped attention.

    Images are re-ordered by count (``order: (B,)``, smallest first) and padded to the batch's largest count
    ``width``, so that every group is a contiguous block of the padded layout: ``spans`` lists
    ``(start, end, group_width)`` ranges of the re-ordered images, and a group is the slice
    ``[start:end, ..., :group_width]`` of any per-slot tensor. ``source: (B * width,)`` is the packed row that
    fills each slot of the layout (row 0 in the padding, which ``valid: (B, width)`` marks False); both are None
    when the layout *is* the packed order (every image full, no re-ordering).

    Results go the other way through a *compact* buffer, where group g is stored whole as ``(n_g, ..., w_g)``
    right after group g - 1 (so a batched matmul writes it with ``out=``, contiguous, no transposing copy):
    ``image_base[b]`` is image b's first slot there and ``image_width[b]`` its group's width;
    :meth:`compact_rows` turns them into each packed token's rows. Both directions are gathers
    (``index_select``), several times faster on a CPU than the equivalent scatters.
    """

    order: torch.Tensor
    spans: list[tuple[int, int, int]]
    width: int
    counts: torch.Tensor
    first_row: list[int]
    image_base: list[int]
    image_width: list[int]
    source: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    @property
    def images(self) -> int:
        return len(self.order)

    def padded(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed: (T, F) -> (B, width, F)`` in layout order; padded slots hold a copy of some alive row (finite;
        mask them with :attr:`valid`)."""
        rows = packed if self.source is None else packed.index_select(0, self.source)
        return rows.view(self.images, self.width, packed.shape[-1])

    def head_rows(self, qkv_shape: torch.Size) -> torch.Tensor:
        """Row ``(t * 3 + part) * H + head`` of ``qkv: (T, 3, H, d)`` seen as (T * 3 * H, d) rows for every slot of the
        head-first layout ``(3, B, H, width)``. A group's q, k and v are then one gather of d-wide rows,
        ``index_select(rows[:, start:end, :, :w])``, already in the (n * H, w, d) shape the batched matmuls need (in
        fp32 on the CPU ~4x faster than gathering tokens and then permuting). Padded slots point at an alive token."""
        tokens, parts, heads, _ = qkv_shape
        device = self.order.device
        source = torch.arange(tokens, device=device) if self.source is None else self.source  # (B * width,)
        within = torch.arange(parts * heads, device=device).view(parts, 1, heads, 1)  # part * H + head
        return source.view(1, self.images, 1, self.width) * (parts * heads) + within

    @cached_property
    def group_starts(self) -> list[int]:
        """First slot of each group (``spans`` order) in the compact buffer; the last entry is its size."""
        return list(itertools.accumulate(((end - start) * w for start, end, w in self.spans), initial=0))

    def compact_rows(self, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each packed token's results sit in compact buffers: ``slot: (T,)`` its slot (group g's slots start
        at ``group_starts[g]``) and ``head_rows: (T, heads)`` its head-h row in a buffer of rows that holds group g as
        ``(n_g, heads, w_g)`` rows from row ``heads * group_starts[g]``.

        Token t is image b's token ``t - first_row[b]`` (packed order is image by image), so its slot is
        ``image_base[b] + t - first_row[b]`` and its head-h row ``heads * image_base[b] + h * image_width[b] +
        t - first_row[b]``."""
        device = self.order.device
        table = torch.tensor([(base - first, heads * base - first, width) for base, width, first
                              in zip(self.image_base, self.image_width, self.first_row)], device=device)  # (B, 3)
        per_token = table.repeat_interleave(self.counts, dim=0, output_size=self.first_row[-1])  # (T, 3)
        tokens = torch.arange(self.first_row[-1], device=device)
        head_rows = (per_token[:, 1:2] + tokens[:, None]) + per_token[:, 2:] * torch.arange(heads, device=device)
        return per_token[:, 0] + tokens, head_rows


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

    def groups(self, pair_macs: float, overhead_macs: float, max_pairs: float = float("inf")) -> GroupLayout:
        """The attention groups (see :func:`plan_groups`); ``pair_macs``: MACs per (query, key) pair."""
        counts = self.count_list
        batch, device = len(counts), self.index.device
        first_row = list(itertools.accumulate(counts, initial=0))  # packed row of each image's first token
        if min(counts) == max(counts):  # no padding: consecutive images, as evenly split as the cap allows
            width = counts[0]
            per_group = batch if width * width * batch <= max_pairs else max(1, int(max_pairs // (width * width)))
            bounds = np.linspace(0, batch, -(-batch // per_group) + 1).round().astype(int).tolist()
            return GroupLayout(torch.arange(batch, device=device),
                               [(start, end, width) for start, end in zip(bounds[:-1], bounds[1:])], width,
                               self.counts, first_row, first_row[:-1], [width] * batch)
        spans, order = [], []
        for images in plan_groups(counts, pair_macs, overhead_macs, max_pairs):
            spans.append((len(order), len(order) + len(images), max(counts[i] for i in images)))
            order += images
        width = spans[-1][2]
        image_base, image_width, next_slot = [0] * batch, [0] * batch, 0  # compact layout: each group at its own width
        for start, end, group_width in spans:
            for image in order[start:end]:
                image_base[image], image_width[image] = next_slot, group_width
                next_slot += group_width
        # per-image lists are built in Python (32 numbers); only the per-token tensors are torch ops
        count, first = (torch.tensor([values[i] for i in order], device=device) for values in (counts, first_row))
        slot = torch.arange(width, device=device)
        valid = slot[None] < count[:, None]
        source = torch.where(valid, first[:, None] + slot[None], 0).reshape(-1)
        return GroupLayout(torch.tensor(order, device=device), spans, width, self.counts, first_row, image_base,
                           image_width, source, valid)


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
    into a compact head-first buffer, which one gather of d-wide rows packs (:meth:`GroupLayout.compact_rows`).
    """
    tokens, _, heads, head_dim = qkv.shape
    batch, width_all = packing.shape
    max_pairs = MAX_GROUP_PROBS[device_type] / heads if need_importance else float("inf")
    layout = packing.groups(2 * heads * head_dim, GROUP_OVERHEAD_MACS[device_type], max_pairs)
    width, starts = layout.width, layout.group_starts
    rows = layout.head_rows(qkv.shape)  # (3, B, H, width)
    qkv_rows = qkv.reshape(-1, head_dim)
    alive = torch.ones(batch, width, device=qkv.device) if layout.valid is None else layout.valid.float()
    key_bias = torch.zeros_like(alive) if log_size is None else layout.padded(log_size[:, None]).view(batch, width)
    key_bias = key_bias.masked_fill(alive == 0, float("-inf")).to(qkv.dtype).view(batch, 1, 1, width)  # padded keys
    out = qkv.new_empty(starts[-1] * heads, head_dim)  # compact: group g is (n_g, H, w_g, d) from row H * starts[g]
    if need_importance:
        key_bias = key_bias.expand(batch, heads, 1, width).reshape(batch * heads, 1, width)
        alive = alive.view(batch, 1, 1, width)
        query_weight = (alive / (alive.sum(-1, keepdim=True) * heads)).to(qkv.dtype).expand(batch, heads, 1, width)
        received = qkv.new_empty(starts[-1])  # compact: group g is (n_g, 1, w_g) from starts[g]
    for (start, end, w), first in zip(layout.spans, starts):
        n = end - start
        group = qkv_rows.index_select(0, rows[:, start:end, :, :w].reshape(-1)).view(3, n, heads, w, head_dim)
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
    slot, head_rows = layout.compact_rows(heads)
    out = out.index_select(0, head_rows.view(-1)).view(tokens, heads * head_dim)
    if not need_importance:
        return out, None
    importance = received.index_select(0, slot).float()  # (T,) in packed order
    return out, torch.zeros(batch * width_all, device=qkv.device).index_copy_(0, packing.index, importance).view(batch, width_all)
