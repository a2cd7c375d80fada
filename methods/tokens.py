"""Token-set operations shared by the plug-ins: bipartite split, size-weighted merge, keep/compact.

All functions leave the first ``ctx.num_prefix`` tokens (CLS, distillation, registers) where they are and
update ``ctx.size`` / ``ctx.alive`` / ``ctx.source`` consistently with ``x``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from methods.blocks import ReductionContext
from methods.ragged import Packing


def bipartite_slices(num_prefix: int) -> tuple[slice, slice]:
    """Alternating split of the non-prefix positions: set A = odd, set B = even offsets after the prefix.

    For a CLS-only model this is ToMe's reference split (``a, b = x[..., ::2, :], x[..., 1::2, :]`` with CLS
    in A and excluded from matching); here prefix tokens are in neither set, which also protects registers.
    As slices of the token dimension (views, no gather).
    """
    return slice(num_prefix + 1, None, 2), slice(num_prefix, None, 2)


def bipartite_positions(tokens: int, num_prefix: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bipartite_slices` as index tensors of ``tokens`` positions."""
    positions = torch.arange(tokens, device=device)
    a_rows, b_rows = bipartite_slices(num_prefix)
    return positions[a_rows], positions[b_rows]


def key_similarity(keys: torch.Tensor, a_pos: torch.Tensor | slice, b_pos: torch.Tensor | slice) -> torch.Tensor:
    """Cosine similarity of keys: ``keys: (B, N, d)`` -> ``(B, |A|, |B|)``; positions as index tensors or slices
    (slices select views, no gather)."""
    keys = F.normalize(keys.float(), dim=-1)
    with fp32_region(keys.device.type):
        return keys[:, a_pos] @ keys[:, b_pos].transpose(1, 2)


def fp32_region(device_type: str) -> contextlib.AbstractContextManager:
    """A context that turns autocast off (similarities stay fp32 under any autocast); a no-op one where autocast is
    not on, since entering ``torch.autocast`` costs tens of microseconds, paid in every block."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else contextlib.nullcontext()


def _flat_rows(index: torch.Tensor, tokens: int) -> torch.Tensor:
    """``index: (B, K)`` positions within each image -> (B * K,) rows of the flattened (B * tokens, ...) batch."""
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * tokens).reshape(-1)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x: (B, N, ...)``, ``index: (B, K)`` -> ``(B, K, ...)``: one ``index_select`` of whole rows of the
    flattened batch (on a CPU ~10x faster than ``gather`` with an index expanded over the channels)."""
    batch, tokens = x.shape[:2]
    return x.reshape(batch * tokens, *x.shape[2:]).index_select(0, _flat_rows(index, tokens)).view(*index.shape, *x.shape[2:])


def _scatter_add_rows(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``target: (B, N, ...)`` plus ``values: (B, K, ...)`` added at rows ``index: (B, K)``, as one ``index_add`` of
    whole rows of the flattened batch (not ``scatter_add`` with an index expanded over the channels)."""
    batch, tokens = target.shape[:2]
    flat = target.reshape(batch * tokens, *target.shape[2:])
    return flat.index_add(0, _flat_rows(index, tokens), values.reshape(-1, *values.shape[2:])).view(target.shape)


def merge_bipartite(x: torch.Tensor, ctx: ReductionContext, a_pos: torch.Tensor, b_pos: torch.Tensor,
                    merged_a: torch.Tensor, dst_b: torch.Tensor, kept_a: torch.Tensor) -> torch.Tensor:
    """Merge A tokens into B tokens by size-weighted average and drop them (compact form).

    ``x: (B, N, C)``; ``merged_a``/``dst_b``: (B, r) indices into A / B (token ``a_pos[merged_a[i]]`` joins
    ``b_pos[dst_b[i]]``); ``kept_a``: (B, |A| - r) indices into A, sorted. Returns ``(B, N - r, C)`` ordered as
    [prefix, kept A, B]; ``ctx.size`` and ``ctx.source`` follow.
    """
    size = ctx.sizes(x)
    weighted = x * size[..., None].to(x.dtype)
    prefix = slice(0, ctx.num_prefix)

    def merge(values: torch.Tensor) -> torch.Tensor:
        a, b = values[:, a_pos], values[:, b_pos]
        b = _scatter_add_rows(b, dst_b, _gather_rows(a, merged_a))
        return torch.cat([values[:, prefix], _gather_rows(a, kept_a), b], 1)

    new_size = merge(size)
    out = merge(weighted) / new_size[..., None].to(x.dtype)
    ctx.size = new_size
    if ctx.source is not None:
        ctx.source = merge(ctx.source)
    return out


def keep_tokens(x: torch.Tensor, ctx: ReductionContext, keep: torch.Tensor) -> torch.Tensor:
    """Keep the tokens at ``keep: (B, K)`` positions (sorted; prefix positions included) -> ``(B, K, C)``."""
    ctx.size = None if ctx.size is None else ctx.size.gather(1, keep)
    ctx.alive = None if ctx.alive is None else ctx.alive.gather(1, keep)
    if ctx.source is not None:
        ctx.source = _gather_rows(ctx.source, keep)
    return _gather_rows(x, keep)


def members(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where ``mask: (B, N)`` holds, in order, padded to the batch's largest count: (B, K) and valid (B, K).
    Padded entries point at positions outside the set."""
    count = mask.sum(1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, : int(count.max())]
    return order, torch.arange(order.shape[1], device=mask.device)[None] < count[:, None]


def compact(tokens: torch.Tensor, packing: Packing, ctx: ReductionContext,
            keep_mask: torch.Tensor) -> tuple[torch.Tensor, Packing, torch.Tensor]:
    """Drop tokens where ``keep_mask: (B, N)`` (a subset of ``packing``'s alive positions) is False, image by image.

    ``tokens: (T, C)`` are the alive tokens of ``packing``; returns the kept ones ``(T', C)`` (one gather of their
    rows; the padded batch is never built), their :class:`Packing` and ``keep_rows: (T,)`` bool, the decision of
    each row of ``tokens``. Kept tokens keep their order and move to the front of their image; ``ctx.size`` and
    ``ctx.source`` follow, and ``ctx.alive`` marks the padding up to the batch's largest count (None when there is
    none) so that attention masks it and pooling ignores it.
    """
    flat_keep = keep_mask.reshape(-1)
    keep_rows = flat_keep if packing.dense else flat_keep.index_select(0, packing.index)  # (T,)
    rows = keep_rows.nonzero().squeeze(1)  # (T',) the kept rows of tokens
    if rows.numel() == keep_rows.numel():  # nothing to drop
        return tokens, packing, keep_rows
    counts = keep_mask.sum(1)
    kept = ctx.repack(Packing.of_counts(counts, counts.tolist()))
    positions = rows if packing.dense else packing.index.index_select(0, rows)  # (T',) old flat positions b * N + n
    if ctx.size is not None:  # the padding holds some kept token's size (positive: its log is finite)
        ctx.size = kept.unpack(ctx.size.reshape(-1, 1).index_select(0, positions), zero_padding=False)[..., 0]
    if ctx.source is not None:
        ctx.source = kept.unpack(ctx.source.flatten(0, 1).index_select(0, positions))
    return tokens.index_select(0, rows), kept, keep_rows


def bipartite_similarity_macs(n_attn: torch.Tensor, num_prefix: int, head_dim: int) -> torch.Tensor:
    """MACs of the |A| x |B| key-similarity matmul for ``n_attn: (B,)`` tokens -> (B,) float64."""
    rest = (n_attn - num_prefix).double().clamp_min(0)
    a = torch.floor(rest / 2)
    return a * (rest - a) * head_dim


class _StraightThroughStep(torch.autograd.Function):
    """Forward: exactly ``(value > threshold)`` as 0/1. Backward: the sigmoid's gradient (see below)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, threshold: torch.Tensor, tau: float) -> torch.Tensor:
        soft = torch.sigmoid((value - threshold) / tau)
        ctx.save_for_backward(soft)
        ctx.tau, ctx.threshold_shape = tau, threshold.shape
        return (value > threshold).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (soft,) = ctx.saved_tensors
        local = grad * soft * (1 - soft) / ctx.tau
        return local, (-local).sum().reshape(ctx.threshold_shape), None


def straight_through_step(value: torch.Tensor, threshold: torch.Tensor, tau: float) -> torch.Tensor:
    """Exactly ``(value > threshold)`` as 0/1 in the forward pass; the gradient of
    ``sigmoid((value - threshold) / tau)`` in the backward pass. ``threshold`` is a scalar tensor.

    (``hard + soft - soft.detach()`` is *not* exact: ``1 + s - s`` rounds to ``1 - 6e-8`` for many ``s``.)
    """
    return _StraightThroughStep.apply(value.float(), threshold, tau)
