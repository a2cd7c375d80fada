"""LTMP, LTP and LTM: learned-threshold token merging and/or pruning.

From Bonnaerens & Dambre, "Learned Thresholds Token Merging and Pruning for Vision Transformers" (TMLR 2023).
In every block, after attention (+ residual) and before the MLP, with two learned scalars per block:

* **merge** (LTM, LTMP): split the alive non-prefix tokens alternately into A and B (as ToMe); an A token whose
  best cosine key similarity (keys averaged over heads) to a B token exceeds ``theta_merge`` merges into it
  (size-weighted average; no top-r, so the count depends on the image); the B token keeps the maximum
  importance of its members;
* **prune** (LTP, LTMP): tokens whose importance (attention received, mean over heads and alive queries) is
  not above ``theta_prune`` are dropped;
* prefix tokens (CLS, registers) are never merged or pruned; attention uses proportional attention
  (log size) and masks dead keys.

**Training form** (``masked = True``): the sequence keeps its length and an alive mask goes through the
blocks; each decision is ``step(value - theta)`` forward and the gradient of ``sigmoid((value - theta)/tau)``
backward. The loss is CE (label smoothing 0.1) + lambda * (r_FLOPs - r_target)^2 (:func:`flops_ratio`); only the
thresholds train (SGD, no momentum, lr 5e-3 merge / 5e-6 prune, clamped to [0, 1] after each step; init
0.9 / 0.0). **Inference form** (``masked = False``): tokens are really dropped, image by image, and a batch is
padded to its largest count (padded keys masked), so batches of any size run for real; the merge then
updates only the destination rows (:func:`merge_into_kept`) and the blocks skip the padding
(:mod:`methods.ragged`).

Differences from the authors' code, all deliberate (tests pin them):

* the A/B alternation runs over the *alive* tokens in their original order, in both forms (the reference
  alternates over padded positions in training and compacted ones at inference), and merging keeps the
  original order of the remaining tokens (ToMe re-orders to [A, B]) so both forms see the same sequence;
* importance averages over alive queries only (the reference includes dead ones in training);
* the inference form is batched (the reference runs batch 1 only);
* at the bounds of their range the thresholds decide nothing: the best cosine is clamped to 1, so
  ``theta_merge = 1`` merges nothing, and an alive token's importance to the smallest positive float, so
  ``theta_prune = 0`` prunes nothing (rounding could otherwise give a cosine of 1 + 1e-7 or an attention of
  exactly 0; dead tokens keep importance 0, so the training form's gradients are the reference's). In the
  inference form such a block then skips computing the statistic (:meth:`LearnedThresholds.needs_at`);
* ``tau`` defaults to 0.5, the value of the authors' training script that produced the paper's numbers
  (their model code defaults to 0.1); it is a knob.

An addition, off by default: ``clip_grad`` bounds the L2 norm of the thresholds' gradient in each step (the paper
clips nothing). The derivative of the masked softmax ``exp(l_j) m_j / sum_k exp(l_k) m_k`` with respect to the mask
of a dead key grows as ``exp(g)`` where that key's logit leads every alive key's by ``g`` (with one alive and one
dead key it is exactly ``-exp(g)``; a test pins it), and the straight-through step passes it on to the thresholds.
In the embedded config's fit (24 steps at x10 / x100 the paper's learning rates) such a lead reached 46 after five
steps, the thresholds' gradient 2.7e7, and one SGD step sent four merge thresholds to 0 (every A token merges) and a
prune threshold to 1; the fit never recovered. The fit records its largest gradient norm and how many steps were
clipped, and the mean and standard deviation of r_FLOPs over its last quarter of steps (a large spread: thresholds
still oscillating about r_target); a non-finite gradient skips its step and is counted, like a non-finite loss.

A second addition, also off by default: ``lr_schedule: cosine`` decays both learning rates to 0 over the fit's budget
(:func:`lr_factor`). The paper states one epoch of SGD at fixed rates; the authors' script asks timm for a cosine
schedule but steps it once per epoch (``--sched-on-updates`` is off by default), so over their one epoch the rates
stay constant, which is the default here. A short fit at raised rates ends wherever its last large step left the
thresholds; decaying the rates lets it settle.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.precision import autocast
from methods.base import FitReport, Knob, TokenReducer, budgeted_batches, register_reducer
from methods.blocks import ModelDims, ReductionContext
from methods.parallel import all_ranks_true, data_parallel
from methods.ragged import Packing
from methods.tokens import (bipartite_positions, bipartite_similarity_macs, bipartite_slices, compact, fp32_region,
                           key_similarity, members, straight_through_step)

COMMON_KNOBS = (
    Knob("r_target", float, default=0.7, low=0.05, high=1.0, sweep=(0.9, 0.8, 0.7, 0.6, 0.5),
         help="target FLOPs ratio kept (budget-aware loss)"),
    Knob("tau", float, default=0.5, low=1e-4, high=10.0, help="temperature of the straight-through sigmoid"),
    Knob("lambda_budget", float, default=10.0, low=0.0, help="weight of the FLOPs budget term"),
    Knob("clip_grad", float, default=0.0, low=0.0,
         help="largest L2 norm of the thresholds' gradient per step (0: unclipped, as in the paper)"),
    Knob("lr_schedule", str, default="constant", choices=("constant", "cosine"),
         help="the learning rates over the fit: constant (the paper) or cosine decay to 0 over its budget"),
)
LR_MERGE = Knob("lr_merge", float, default=5e-3, low=0.0, help="SGD learning rate of the merge thresholds")
LR_PRUNE = Knob("lr_prune", float, default=5e-6, low=0.0, help="SGD learning rate of the prune thresholds")
INIT_MERGE = Knob("init_merge", float, default=0.9, low=0.0, high=1.0, help="initial merge threshold")
INIT_PRUNE = Knob("init_prune", float, default=0.0, low=0.0, high=1.0, help="initial prune threshold")
TRACE_KNOB = Knob("trace_source", bool, default=False, help="track which patches each token holds (for plots)")
#: LTMP's knobs; LTP has no merge knobs and LTM no prune knobs (setting one is an error, not a silent no-op)
LTMP_KNOBS = (*COMMON_KNOBS, LR_MERGE, LR_PRUNE, INIT_MERGE, INIT_PRUNE, TRACE_KNOB)
LTP_KNOBS = (*COMMON_KNOBS, LR_PRUNE, INIT_PRUNE, TRACE_KNOB)
LTM_KNOBS = (*COMMON_KNOBS, LR_MERGE, INIT_MERGE, TRACE_KNOB)
#: the thresholds' bounds that decide nothing (see _active_layers): a method's ``off`` knobs, and where it lacks a
#: decision, that decision's thresholds
INERT_INIT = {"init_merge": 1.0, "init_prune": 0.0}


def lr_factor(schedule: str, images_seen: int, budget_images: int) -> float:
    """The learning rates' multiplier for a step taken after ``images_seen`` of the fit's ``budget_images``: 1 for
    ``constant``, ``(1 + cos(pi * images_seen / budget_images)) / 2`` for ``cosine`` (1 at the first step, near 0 at
    the last; counted in images, so it needs no batch size and each rank of a split budget follows its own share)."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(images_seen / budget_images, 1.0)))


def flops_ratio(before: list[torch.Tensor], after: list[torch.Tensor], tokens: int, dim: int) -> torch.Tensor:
    """The paper's r_FLOPs: mean over blocks of the block's cost ratio at mean alive fractions.

    Block l with alive fractions ``m_{l-1}`` (entering attention) and ``m_l`` (entering the MLP):
    ``(2 m_{l-1} n d^2 + (m_{l-1} n)^2 d + 4 m_l n d^2) / (6 n d^2 + n^2 d)``.
    """
    n, d = float(tokens), float(dim)
    dense = 6 * n * d * d + n * n * d
    ratios = [(2 * m0 * n * d * d + (m0 * n) ** 2 * d + 4 * m1 * n * d * d) / dense for m0, m1 in zip(before, after)]
    return torch.stack([torch.as_tensor(r) for r in ratios]).mean()


def best_matches(keys: torch.Tensor, in_a: torch.Tensor, in_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A token's best cosine similarity to a B token and that B token's position.

    ``keys: (B, N, d)``; ``in_a``, ``in_b``: (B, N) disjoint. Only the |A| x |B| block is computed (what the
    GMACs count). Returns ``best: (B, N)`` (-2 outside A, so those never merge) and ``dst: (B, N)`` positions.
    """
    a_index, a_valid = members(in_a)
    b_index, b_valid = members(in_b)
    keys = F.normalize(keys.float(), dim=-1)
    gather = lambda index: keys.gather(1, index[..., None].expand(-1, -1, keys.shape[2]))
    with fp32_region(keys.device.type):  # similarities in fp32 under any autocast
        scores = gather(a_index) @ gather(b_index).transpose(1, 2)
    scores = scores.masked_fill(~(a_valid[:, :, None] & b_valid[:, None, :]), float("-inf"))
    best_a, match = scores.amax(-1), scores.argmax(-1)  # ties: the first B token, as in merging_pairs
    best_a = best_a.clamp_max(1.0)  # a cosine; rounding can give 1 + 1e-7, which theta_merge = 1 must not merge
    best = torch.full(in_a.shape, -2.0, device=keys.device).scatter(1, a_index, torch.where(a_valid, best_a, -2.0))
    dst = torch.zeros(in_a.shape, dtype=torch.long, device=keys.device).scatter(1, a_index, b_index.gather(1, match))
    return best, dst


def merging_pairs(keys: torch.Tensor, num_prefix: int, counts: torch.Tensor,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merges of the inference form: the A tokens whose best cosine similarity to a B token exceeds
    ``threshold``, as :func:`best_matches` finds them, for images whose alive tokens are their first ``counts: (B,)``
    positions (after compaction). A and B are then strided slices, so nothing is sorted or gathered.

    ``keys: (B, N, d)``, zero in the padding (as :meth:`Packing.unpack` leaves it). A zero key's cosines are all 0,
    which no ``threshold >= 0`` (every threshold LTMP learns) exceeds, so then dead A tokens never merge and dead B
    tokens never win an argmax without being masked; a negative ``threshold`` masks them. Returns ``(image, source,
    target)``, (M,) each: A token ``source`` of image ``image`` joins B token ``target``. Only the merging rows look
    up their argmax (on the CPU the row maxima cost a tenth of it).
    """
    tokens = keys.shape[1]
    a_rows, b_rows = bipartite_slices(num_prefix)  # A: positions num_prefix + 1 + 2i, B: num_prefix + 2j (views)
    scores = key_similarity(keys, a_rows, b_rows)
    if threshold < 0 and int(counts.min()) < tokens:  # dead B tokens never receive, dead A tokens never merge
        a_pos, b_pos = bipartite_positions(tokens, num_prefix, keys.device)
        scores += torch.where(b_pos[None, None, :] < counts[:, None, None], 0.0, float("-inf"))
        scores.masked_fill_((a_pos[None] >= counts[:, None])[..., None], float("-inf"))
    image, row = (scores.amax(-1).clamp_max(1.0) > threshold).nonzero(as_tuple=True)
    column = scores[image, row].argmax(-1)
    return image, row * 2 + (num_prefix + 1), column * 2 + num_prefix  # a_pos[row], b_pos[column]


def merge_into_kept(tokens: torch.Tensor, token_rows: torch.Tensor, kept: torch.Tensor, keep_rows: torch.Tensor,
                    source: torch.Tensor, target: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """The size-weighted merge of the inference form, touching only the rows that merge. Returns ``kept``, updated.

    ``tokens: (R, C)`` the rows before the merge, ``token_rows: (P,)`` the row of each (flat) position;
    ``keep_rows: (R,)`` bool, which rows were kept; ``kept: (R', C)`` those rows, in row order. The token at
    position ``source`` joins the one at ``target`` ((M,) each) with ``share = s_a / s'_d`` (M,), its size over the
    destination's size after the merge. A destination ``d`` becomes ``(s_d x_d + sum_a s_a x_a) / s'_d``, written as
    ``x_d + sum_a (s_a / s'_d) (x_a - x_d)`` so that it is one ``index_add`` over the M merged rows instead of a
    scatter over the whole batch (the training form's formula; the two agree to float rounding). Destinations that
    were pruned after merging get nothing.
    """
    if source.numel() == 0:
        return kept
    source_row, target_row = token_rows.index_select(0, source), token_rows.index_select(0, target)
    share = torch.where(keep_rows.index_select(0, target_row), share, 0.0).to(tokens.dtype)  # pruned: add 0 somewhere
    delta = (tokens.index_select(0, source_row) - tokens.index_select(0, target_row)).mul_(share[:, None])
    kept_row = keep_rows.cumsum(0).sub_(1)  # (R,) the row in kept of each kept row of tokens
    return kept.index_add_(0, kept_row.index_select(0, target_row).clamp_min_(0), delta)


class LearnedThresholds(TokenReducer):
    """Shared machinery of LTMP / LTP / LTM; subclasses set ``merge`` and ``prune``."""

    knobs = LTMP_KNOBS
    merge: bool = True
    prune: bool = True
    trains = True
    input_dependent = True
    proportional_attention = True
    off = dict(INERT_INIT)
    monotone_knob = ("init_prune", (0.01, 0.015, 0.02))  # from 0, which skips importance, GMACs first rise by its cost

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self.trace_source = self.values["trace_source"]
        self.needs = frozenset({"keys"} if self.merge else set()) | frozenset({"importance"} if self.prune else set())
        self.masked = False
        self.theta_merge = torch.nn.Parameter(torch.zeros(0))
        self.theta_prune = torch.nn.Parameter(torch.zeros(0))
        self._fractions: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._active: list[tuple[bool, bool]] = []

    def check_model(self, model) -> None:
        depth = len(model.blocks)
        if self.theta_merge.numel() != depth:
            init = {**INERT_INIT, **self.values}
            self.theta_merge = torch.nn.Parameter(torch.full((depth,), init["init_merge"]))
            self.theta_prune = torch.nn.Parameter(torch.full((depth,), init["init_prune"]))

    def begin(self, ctx: ReductionContext, x: torch.Tensor) -> None:
        self._fractions = []
        self._active = self._active_layers()

    def _active_layers(self) -> list[tuple[bool, bool]]:
        """(merges, prunes) of every block. In the inference form a block whose ``theta_merge`` is 1 merges
        nothing (cosine similarity is at most 1) and one whose ``theta_prune`` is 0 prunes nothing (importance is
        positive), so that block computes neither statistic; the training form always needs both for the
        thresholds' gradients, and its forward pass gives the same decisions (:meth:`_decide` clamps both values)."""
        if self.masked:
            return [(self.merge, self.prune)] * self.theta_merge.numel()
        merges = (self.theta_merge.detach() < 1).tolist() if self.merge else [False] * self.theta_merge.numel()
        prunes = (self.theta_prune.detach() > 0).tolist() if self.prune else [False] * self.theta_prune.numel()
        return list(zip(merges, prunes))

    def needs_at(self, layer: int) -> frozenset[str]:
        """``keys`` where block ``layer`` merges, ``importance`` where it prunes (see :meth:`_active_layers`)."""
        active = self._active if len(self._active) == self.theta_merge.numel() else self._active_layers()
        if layer >= len(active):
            return self.needs
        merges, prunes = active[layer]
        return frozenset({"keys"} if merges else set()) | frozenset({"importance"} if prunes else set())

    # --- the decision rule: the training form (_decide) and the inference form (_decide_packed) ----
    def _step(self, value: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """0/1 decision ``value > threshold``, straight-through (the training form)."""
        return straight_through_step(value, threshold, self.values["tau"])

    def _matches(self, ctx: ReductionContext, candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best B match of every A token among the ``candidate: (B, N)`` tokens (see :func:`best_matches`)."""
        rank = candidate.long().cumsum(1) - 1
        return best_matches(ctx.stats["keys"], candidate & (rank % 2 == 1), candidate & (rank % 2 == 0))

    def _decide(self, layer: int, ctx: ReductionContext, x: torch.Tensor) -> torch.Tensor:
        """The training form's decisions in block ``layer`` on ``x: (B, N, C)``: merges ``x`` (returned), sets
        ``ctx.size`` and ``ctx.alive`` (B, N), 0/1 with the straight-through gradients."""
        batch, tokens = x.shape[:2]
        prefix = ctx.num_prefix
        alive_hard = torch.ones(batch, tokens, dtype=torch.bool, device=x.device) if ctx.alive is None else ctx.alive > 0
        alive = alive_hard.float() if ctx.alive is None else ctx.alive.float()
        is_rest = torch.arange(tokens, device=x.device) >= prefix
        candidate = alive_hard & is_rest
        size = ctx.sizes(x)
        importance = ctx.stats.get("importance")
        if self.merge and bool((candidate.sum(1) >= 2).any()):  # some image has an A and a B token
            best, dst = self._matches(ctx, candidate)
            merged = self._step(best, self.theta_merge[layer]) * (best > -2).float()
            weight = merged * size  # (B, N): size moved into the destination
            new_size = size.scatter_add(1, dst, weight)
            merged_hard = merged.detach() > 0
            numerator = x * size[..., None].to(x.dtype)
            numerator = numerator.scatter_add(1, dst[..., None].expand_as(x), (weight[..., None] * x.float()).to(x.dtype))
            x = numerator / new_size[..., None].to(x.dtype)
            size = new_size
            if ctx.source is not None:
                ctx.source = ctx.source.scatter_add(1, dst[..., None].expand_as(ctx.source),
                                                    ctx.source * merged_hard[..., None].to(ctx.source.dtype))
            if importance is not None:
                importance = importance.scatter_reduce(1, dst, torch.where(merged_hard, importance, 0.0), "amax")
            alive = alive * (1 - merged)
        if self.prune:
            # an alive token's attention is positive: one that underflowed to 0 still counts as attention. Dead tokens
            # keep their 0, so at theta 0 their step stays 0 and, as in the reference, passes no gradient back
            # through their earlier masks (alive * kept).
            importance = torch.where(alive_hard, importance.clamp_min(torch.finfo(torch.float32).tiny), importance)
            kept = self._step(importance, self.theta_prune[layer])
            alive = alive * torch.where(is_rest, kept, torch.ones_like(kept))
        ctx.size = size
        ctx.alive = alive
        return x

    def _decide_packed(self, layer: int, ctx: ReductionContext,
                       packing: Packing) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The inference form's decisions in block ``layer`` (the same rule as :meth:`_decide`, on hard masks):
        ``keep: (B, N)`` bool and the merges ``(source, target, share)`` ((M,) each: flat positions ``b * N + n`` in
        ``packing``'s layout, see :func:`merge_into_kept`) or None. The alive tokens of ``packing`` are the first of
        each image (compaction keeps them there). Updates ``ctx.size`` (and ``ctx.source``) where tokens merge."""
        merges, prunes = self._active[layer]
        keep = packing.alive.clone()
        importance = ctx.stats.get("importance")
        pairs = None
        if merges and max(packing.count_list) - ctx.num_prefix >= 2:  # some image has an A and a B token
            image, source, target = merging_pairs(ctx.stats["keys"], ctx.num_prefix, packing.counts,
                                                  float(self.theta_merge[layer]))
            image_start = image * packing.shape[1]
            source, target = image_start + source, image_start + target  # flat positions
            size = torch.ones(keep.numel(), device=keep.device) if ctx.size is None else ctx.size.reshape(-1)
            moved = size.index_select(0, source)
            size = size.index_add(0, target, moved)
            pairs = (source, target, moved / size.index_select(0, target))
            ctx.size = size.view(packing.shape)
            if ctx.source is not None:
                flat = ctx.source.flatten(0, 1)
                ctx.source = flat.index_add(0, target, flat.index_select(0, source)).view(ctx.source.shape)
            if importance is not None:  # a merged B token keeps the largest importance of its members
                flat = importance.view(-1)
                importance = flat.scatter_reduce(0, target, flat.index_select(0, source), "amax").view(importance.shape)
            keep.view(-1).index_fill_(0, source, False)
        if prunes:  # as in _decide: an alive token's importance is positive
            rest = slice(ctx.num_prefix, None)
            keep[:, rest] &= importance[:, rest].clamp_min(torch.finfo(torch.float32).tiny) > self.theta_prune[layer]
        return keep, pairs

    def reduce(self, layer: int, x: torch.Tensor, ctx: ReductionContext) -> torch.Tensor:
        """``x: (B, N, C)``. The training form masks; the inference form runs :meth:`reduce_packed` on the alive tokens."""
        if not self.masked:
            packing = ctx.packing() or Packing.full(x)
            tokens, packing = self.reduce_packed(layer, packing.pack(x), packing, ctx)
            return packing.unpack(tokens)
        before = ctx.alive
        x = self._decide(layer, ctx, x)
        tokens = x.shape[1]
        before_fraction = (torch.ones(()) if before is None else before.float().sum(1).mean() / tokens)
        self._fractions.append((before_fraction, ctx.alive.sum(1).mean() / tokens))
        return x

    def reduces_packed(self) -> bool:
        return not self.masked  # the inference form

    def reduce_packed(self, layer: int, tokens: torch.Tensor, packing: Packing,
                      ctx: ReductionContext) -> tuple[torch.Tensor, Packing]:
        """The inference form on the alive tokens ``tokens: (T, C)`` of ``packing``'s (B, N) batch: drops and merges
        tokens and returns the kept ones ``(T', C)`` with their :class:`Packing` (``ctx`` follows)."""
        if self._active[layer] == (False, False):  # this block's thresholds can drop nothing
            return tokens, packing
        keep, pairs = self._decide_packed(layer, ctx, packing)
        if ctx.num_prefix == 0:  # never leave an image without tokens
            empty = ~keep.any(1)
            keep[empty, 0] = True
        kept, kept_packing, keep_rows = compact(tokens, packing, ctx, keep)
        if pairs is not None:  # merges drop their sources, so kept is a new tensor: adding into it in place is safe
            kept = merge_into_kept(tokens, packing.source, kept, keep_rows, *pairs)
        return kept, kept_packing

    def extra_macs(self, layer: int, n_attn: torch.Tensor, n_mlp: torch.Tensor, dims: ModelDims) -> torch.Tensor:
        if "keys" not in self.needs_at(layer):  # no similarity computed in this block
            return torch.zeros_like(n_attn, dtype=torch.float64)
        return bipartite_similarity_macs(n_attn, dims.num_prefix, dims.head_dim)

    # --- training ---------------------------------------------------------------------------------
    def budget_loss(self, tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        before, after = zip(*self._fractions)
        ratio = flops_ratio(list(before), list(after), tokens, dim)
        return self.values["lambda_budget"] * (ratio - self.values["r_target"]) ** 2, ratio

    def fit(self, model, train_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
            budget: dict[str, Any], progress: bool = True) -> FitReport:
        device = next(model.parameters()).device
        self.theta_merge.data, self.theta_prune.data = self.theta_merge.data.to(device), self.theta_prune.data.to(device)
        trainable = ([self.theta_merge] if self.merge else []) + ([self.theta_prune] if self.prune else [])
        learning_rates = ([self.values["lr_merge"]] if self.merge else []) + ([self.values["lr_prune"]] if self.prune else [])
        optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(trainable, learning_rates)], momentum=0.0)
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        report = FitReport(device=str(device))
        model.eval()  # the backbone is frozen: keep dropout off and BatchNorm statistics fixed
        self.masked = True
        tic = time.perf_counter()
        try:
            with data_parallel(model, trainable) as train_model:
                self._train(train_model, model._reduction_ctx.dims, optimizer, train_batches, budget, report, progress)
        finally:
            self.masked = False
            for p in frozen:
                p.requires_grad_(True)
        report.wall_time_s = time.perf_counter() - tic
        report.extra["r_target"] = self.values["r_target"]
        return report

    def _train(self, train_model, dims: ModelDims, optimizer: torch.optim.Optimizer, train_batches, budget: dict[str, Any],
               report: FitReport, progress: bool) -> None:
        """SGD on the thresholds until ``budget_images`` images were seen; a non-finite loss or gradient skips the step."""
        device = next(train_model.parameters()).device
        report.extra.update(max_grad_norm=0.0, clipped_steps=0)
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        ratios: list[float] = []  # r_FLOPs of every step that updated the thresholds
        bar = tqdm(total=budget["budget_images"], desc=f"fit {self.name}", unit="img", disable=not progress, leave=False)
        for x, y in budgeted_batches(train_batches, budget["budget_images"]):
            x, y = x.to(device), y.to(device)
            factor = lr_factor(self.values["lr_schedule"], report.images_seen, budget["budget_images"])
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * factor
            with autocast(str(device), budget.get("precision", "fp32")):
                logits = train_model(x).float()
            penalty, ratio = self.budget_loss(dims.tokens, dims.dim)
            loss = F.cross_entropy(logits, y, label_smoothing=0.1) + penalty
            report.images_seen += len(y)
            report.steps += 1
            bar.update(len(y))
            optimizer.zero_grad(set_to_none=True)
            finite = all_ranks_true(bool(torch.isfinite(loss)))
            if finite:
                loss.backward()
                finite = self._clip_gradient(report)
            if not finite:
                report.skipped_steps += 1
                continue
            optimizer.step()
            with torch.no_grad():
                self.theta_merge.clamp_(0.0, 1.0)
                self.theta_prune.clamp_(0.0, 1.0)
            ratios.append(float(ratio.detach()))
            bar.set_postfix(loss=f"{loss.item():.3f}", r_flops=f"{ratios[-1]:.3f}")
        bar.close()
        if ratios:  # where the fit ended: a large spread means the thresholds still oscillate about r_target
            tail = ratios[-max(1, len(ratios) // 4):]
            report.extra.update(last_r_flops=ratios[-1], tail_r_flops_mean=statistics.fmean(tail),
                                tail_r_flops_sd=statistics.stdev(tail) if len(tail) > 1 else 0.0)

    def _clip_gradient(self, report: FitReport) -> bool:
        """Scale the thresholds' gradient to norm ``clip_grad`` where it is larger (0: never); record the largest
        finite norm seen and the clipped steps in ``report.extra``. False where the gradient is not finite (the
        step is then skipped, like a non-finite loss; ranks agree, as DDP averaged the gradients)."""
        thresholds = [p for p in (self.theta_merge, self.theta_prune) if p.grad is not None]
        limit = self.values["clip_grad"]
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in thresholds]))
        if not math.isfinite(norm):
            return False
        if 0 < limit < norm:
            torch.nn.utils.clip_grads_with_norm_(thresholds, limit, torch.tensor(norm))
            report.extra["clipped_steps"] += 1
        report.extra["max_grad_norm"] = max(norm, report.extra["max_grad_norm"])
        return True

    def learned_state(self) -> dict[str, torch.Tensor]:
        return {"theta_merge": self.theta_merge.detach().cpu(), "theta_prune": self.theta_prune.detach().cpu()}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        self.theta_merge = torch.nn.Parameter(state["theta_merge"].clone())
        self.theta_prune = torch.nn.Parameter(state["theta_prune"].clone())


@register_reducer("ltmp")
class LTMP(LearnedThresholds):
    """Learned-threshold merging, then pruning."""


@register_reducer("ltp")
class LTP(LearnedThresholds):
    """Learned-threshold pruning only (the suite's pure learned pruning)."""

    knobs = LTP_KNOBS
    merge = False
    off = {"init_prune": INERT_INIT["init_prune"]}


@register_reducer("ltm")
class LTM(LearnedThresholds):
    """Learned-threshold merging only (the paper's ablation)."""

    knobs = LTM_KNOBS
    prune = False
    off = {"init_merge": INERT_INIT["init_merge"]}
    monotone_knob = ("init_merge", (1.0, 0.6, 0.2))
