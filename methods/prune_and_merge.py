"""Prune-and-Merge: static merge / reconstruct matrices with a shortcut for pruned tokens.

From "Prune and Merge: Efficient Token Compression for Vision Transformer with Spatial Information
Preserved". A block-wrapping plug-in: block ``l`` becomes

    x_out = R_l · Block(M_l · x) + p_l ⊙ x          x: (B, N, C), M_l: (c_l, N), R_l: (N, c_l), p_l: (N,)

so the block sees ``c_l`` tokens and the stream between blocks always has all ``N``. The structure is the
same for every image (static):

1. **Scoring (calibration)**: on the unreduced model, for ``calib_batches`` labelled batches, accumulate per
   block and key position ``|sum over batch, heads, queries of A ⊙ dL/dA|`` (A: softmax attention);
   normalise each block's vector to sum 1 over the patch positions and weight block ``l`` by
   ``1 - depth_decay · l``.
2. **Structure search**: rank all (block, patch position) scores together; the lowest ``prune_rate`` fraction
   is pruned (shortcut only), the highest ``keep_rate`` fraction are centres, the rest are merged.
   ``c_l`` = centres of block ``l`` + prefix tokens.
3. **Merge to centre**: a merged token joins the nearest centre in its image row (ties: the left one); if
   its row has no centre, the nearest centre in raster order; if the block has no centre at all, it is
   pruned. M's row of a centre holds 1 at the centre and ``score_j / score_centre`` at each member j;
   prefix tokens (CLS, registers) are fixed one-hot rows. ``R = pinv(M)``.
4. **Regimes**: ``calibrated`` (steps 1-3 only, cheap) or ``finetuned``: M and R then train with soft
   distillation from the unreduced model (CE + alpha · T² · KL at temperature T; alpha 1, T 20 as the
   reference) for the configured image budget; only M's non-zero entries and R's rows of non-pruned tokens
   train, so the structure stays what the search chose; prefix rows stay one-hot.

Differences from the authors' code: their optimiser gives the configured learning rate to one parameter
group only, so M and R train at 1e-6; here M and R train at ``lr`` (the paper's intent). Fine-tuning the
backbone too is ``train_all=True``. Blocks whose structure is the identity (every token a centre) skip the
two matmuls, so ``keep_rate=1, prune_rate=0`` is exactly the unreduced model; their M and R are not trained
(they take no part in the forward pass).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.errors import BenchError
from bench.precision import autocast
from methods.base import FitReport, Knob, TokenReducer, budgeted_batches, register_reducer
from methods.blocks import ModelDims, ReductionContext, run_block
from methods.parallel import all_ranks_true, all_reduce_sum, data_parallel


def gradient_attention_scores(loss: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
    """``|sum over batch, heads, queries of A ⊙ dL/dA|`` per block and key: list of (B, H, N, N) -> (L, N).

    ``dL/dA`` comes from ``torch.autograd.grad``, which runs only the backward steps that reach the maps: none of the
    weight gradients a full ``loss.backward()`` would also compute (the same dL/dA, bit for bit; a calibration batch
    of 64 on the embedded model takes 0.55 s instead of 0.76 s)."""
    grads = torch.autograd.grad(loss, maps)
    return torch.stack([(a.detach() * g).sum(dim=(0, 1, 2)).abs() for a, g in zip(maps, grads)])


def search_structure(scores: torch.Tensor, num_prefix: int, keep_rate: float, prune_rate: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ranking of (block, patch) scores -> (centre, pruned) boolean masks (L, N); prefix never either."""
    patch_scores = scores[:, num_prefix:]
    flat = patch_scores.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices
    total = flat.numel()
    n_centre, n_pruned = round(keep_rate * total), round(prune_rate * total)
    centre = torch.zeros(total, dtype=torch.bool)
    pruned = torch.zeros(total, dtype=torch.bool)
    centre[order[:n_centre]] = True
    pruned[order[total - n_pruned:]] = True
    pad = torch.zeros(scores.shape[0], num_prefix, dtype=torch.bool)
    return torch.cat([pad, centre.view_as(patch_scores)], 1), torch.cat([pad, pruned.view_as(patch_scores)], 1)


def merge_matrix(score: torch.Tensor, centre: torch.Tensor, pruned: torch.Tensor, num_prefix: int, grid_width: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's M (c, N) and final pruned mask (N,). ``score``, ``centre``, ``pruned``: (N,)."""
    tokens = score.numel()
    centres = [int(i) for i in centre.nonzero().flatten()]
    rows = list(range(num_prefix)) + centres
    matrix = torch.zeros(len(rows), tokens, dtype=torch.float32)
    for row, position in enumerate(rows):
        matrix[row, position] = 1.0
    pruned = pruned.clone()
    row_of = {position: row for row, position in enumerate(rows)}
    for position in range(num_prefix, tokens):
        if centre[position] or pruned[position]:
            continue
        if not centres:
            pruned[position] = True
            continue
        image_row, column = divmod(position - num_prefix, grid_width)
        same_row = [c for c in centres if (c - num_prefix) // grid_width == image_row]
        pool = same_row or centres
        key = (lambda c: (abs((c - num_prefix) % grid_width - column), c)) if same_row else (lambda c: (abs(c - position), c))
        target = min(pool, key=key)
        matrix[row_of[target], position] = float(score[position] / score[target].clamp_min(1e-12))
    return matrix, pruned


@register_reducer("pm")
class PruneAndMerge(TokenReducer):
    knobs = (
        Knob("keep_rate", float, default=0.7, low=0.01, high=1.0, sweep=(0.9, 0.8, 0.7, 0.6, 0.5),
             help="fraction of (block, patch) slots that are centres: the mean fraction of tokens a block sees"),
        Knob("prune_rate", float, default=0.1, low=0.0, high=0.99, help="fraction of slots pruned (shortcut only)"),
        Knob("regime", str, default="calibrated", choices=("calibrated", "finetuned"), help="fine-tune M and R or not"),
        Knob("calib_batches", int, default=8, low=1, help="labelled batches for the gradient-weighted scores"),
        Knob("depth_decay", float, default=0.025, low=0.0, high=1.0, help="block l's scores are weighted 1 - decay*l"),
        Knob("alpha", float, default=1.0, low=0.0, help="weight of the distillation loss"),
        Knob("temperature", float, default=20.0, low=0.01, help="distillation temperature"),
        Knob("lr", float, default=1e-4, low=0.0, help="Adam learning rate of M and R when fine-tuning"),
        Knob("train_all", bool, default=False, help="fine-tune the backbone too"),
    )
    off = {"keep_rate": 1.0, "prune_rate": 0.0}
    trains = True

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        if self.keep_rate + self.prune_rate > 1.0:
            raise BenchError(f"knobs pm.keep_rate={self.keep_rate} + pm.prune_rate={self.prune_rate} exceed 1: lower one of them")
        self.calibrating = False
        self.bypass = False  # run the unreduced model (the distillation teacher)
        self.scores: torch.Tensor | None = None
        self.M = torch.nn.ParameterList()
        self.R = torch.nn.ParameterList()
        self.pruned: list[torch.Tensor] = []
        self.identity: list[bool] = []

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"probs"}) if self.calibrating else frozenset()

    # --- structure ---------------------------------------------------------------------------------
    def calibrate(self, model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], precision: str = "fp32") -> int:
        """Gradient-weighted attention scores over ``calib_batches`` batches, then the structure. Returns images used."""
        ctx: ReductionContext = model._reduction_ctx
        device = next(model.parameters()).device
        total, images = None, 0
        self.calibrating = True
        try:
            for index, (x, y) in enumerate(batches):
                if index >= self.calib_batches:
                    break
                x, y = x.to(device), y.to(device)
                with torch.enable_grad(), autocast(str(device), precision):
                    loss = F.cross_entropy(model(x).float(), y)
                scores = gradient_attention_scores(loss, ctx.attention_maps).float().cpu()
                total = scores if total is None else total + scores
                images += len(y)
                ctx.attention_maps = []  # free the maps and their graph now (the next forward would, later)
        finally:
            self.calibrating = False
        if total is None:
            raise BenchError("Prune-and-Merge calibration got no batches: check the training data")
        self.set_scores(all_reduce_sum(total), ctx.dims)
        self.M.to(device), self.R.to(device)  # built on the CPU: onto the model's device (in place)
        return images

    def set_scores(self, raw: torch.Tensor, dims: ModelDims) -> None:
        """Normalise, weight by depth, search the structure and build M, R, p for every block."""
        prefix = dims.num_prefix
        scores = raw.clone().float()
        patch = scores[:, prefix:]
        scores[:, prefix:] = patch / patch.sum(1, keepdim=True).clamp_min(1e-12)
        scores *= (1 - self.depth_decay * torch.arange(dims.depth, dtype=torch.float32))[:, None]
        self.scores = scores
        centre, pruned = search_structure(scores, prefix, self.keep_rate, self.prune_rate)
        self.M, self.R, self.pruned, self.identity = torch.nn.ParameterList(), torch.nn.ParameterList(), [], []
        for layer in range(dims.depth):
            matrix, layer_pruned = merge_matrix(scores[layer], centre[layer], pruned[layer], prefix, dims.grid[1])
            self.M.append(torch.nn.Parameter(matrix))
            self.R.append(torch.nn.Parameter(torch.linalg.pinv(matrix)))
            self.pruned.append(layer_pruned)
            self.identity.append(matrix.shape[0] == matrix.shape[1] and bool(torch.equal(matrix, torch.eye(len(matrix)))))

    def prepare_for_test(self, model) -> None:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(2, *ModelDims.of(model).image_shape, generator=generator)
        labels = torch.randint(0, max(model.num_classes, 1), (2,), generator=generator)
        if model.num_classes == 0:  # headless models: score against the features' own argmax
            labels = torch.zeros(2, dtype=torch.long)
        self.calibrate(model, [(images, labels)])

    # --- forward -----------------------------------------------------------------------------------
    def block_forward(self, layer: int, block, x: torch.Tensor, ctx: ReductionContext) -> torch.Tensor:
        if self.calibrating or self.bypass or not self.M or self.identity[layer]:
            return run_block(block, x, ctx, layer)
        if self.M[layer].shape[1] != x.shape[1]:
            raise BenchError(f"Prune-and-Merge was calibrated for {self.M[layer].shape[1]} tokens, got {x.shape[1]}")
        # batched matmuls against the matrices broadcast over the batch (stride 0, no copy): torch.matmul(M, x) folds
        # x's batch into a transposed (B * C, N) copy and returns a transposed result, 10 % slower for DeiT-S at batch 32
        batch = x.shape[0]
        # a stored cell's M and R are loaded on the CPU (load_learned_state): they follow x to its device
        merge = self.M[layer].to(device=x.device, dtype=x.dtype)
        rebuild = self.R[layer].to(device=x.device, dtype=x.dtype)
        inner = run_block(block, torch.bmm(merge.expand(batch, -1, -1), x), ctx, layer)  # (B, c_l, C)
        shortcut = self.pruned[layer].to(device=x.device, dtype=x.dtype)[None, :, None] * x
        return torch.baddbmm(shortcut, rebuild.expand(batch, -1, -1), inner)  # (B, N, C)

    def token_groups(self, layer: int, ctx: ReductionContext) -> torch.Tensor | None:
        """The tokens block ``layer`` sees: M's rows (nonzero pattern); pruned positions belong to none."""
        if not self.M:
            return None
        groups = (self.M[layer].detach() != 0).float()
        return groups.expand(ctx.begin_shape[0], *groups.shape)

    def extra_macs(self, layer: int, n_attn: torch.Tensor, n_mlp: torch.Tensor, dims: ModelDims) -> torch.Tensor:
        """M·x and R·y: 2 · N · c_l · d per image (dense, as executed); none for identity blocks."""
        if not self.M or self.identity[layer]:
            return torch.zeros_like(n_attn, dtype=torch.float64)
        return 2.0 * dims.tokens * n_attn.double() * dims.dim

    # --- fitting -----------------------------------------------------------------------------------
    def fit(self, model, train_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
            budget: dict[str, Any], progress: bool = True) -> FitReport:
        device = next(model.parameters()).device
        tic = time.perf_counter()
        model.eval()
        report = FitReport(device=str(device))
        report.images_seen = self.calibrate(model, train_batches(), budget.get("precision", "fp32"))
        report.extra["calibration_images"] = report.images_seen
        if self.regime == "finetuned":
            self._finetune(model, train_batches, budget, report, progress)
        report.wall_time_s = time.perf_counter() - tic
        return report

    def _finetune(self, model, train_batches, budget: dict[str, Any], report: FitReport, progress: bool) -> None:
        device = next(model.parameters()).device
        trained = [layer for layer, identity in enumerate(self.identity) if not identity]  # identity blocks skip M, R
        grad_masks = [(self.M[l], (self.M[l].detach() != 0).float()) for l in trained] + \
                     [(self.R[l], (~self.pruned[l]).float()[:, None].to(device)) for l in trained]
        params = [matrix for matrix, _ in grad_masks]
        if not params and not self.train_all:  # every block the identity: nothing to train
            report.extra["finetune_images"] = 0
            return
        backbone = [p for p in model.parameters() if p.requires_grad] if self.train_all else []
        frozen = [] if self.train_all else [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        optimizer = torch.optim.Adam([{"params": params, "lr": self.lr}] +
                                     ([{"params": backbone, "lr": self.lr}] if backbone else []))
        bar = tqdm(total=budget["budget_images"], desc="fit pm", unit="img", disable=not progress, leave=False)
        try:
            with data_parallel(model, params) as train_model:
                seen = self._distill(model, train_model, optimizer, grad_masks, train_batches, budget, report, bar)
        finally:
            self.bypass = False
            bar.close()
            for p in frozen:
                p.requires_grad_(True)
        report.images_seen += seen
        report.extra["finetune_images"] = seen

    def _distill(self, model, train_model, optimizer, grad_masks: list[tuple[torch.nn.Parameter, torch.Tensor]],
                 train_batches, budget: dict[str, Any], report: FitReport, bar: tqdm) -> int:
        """CE + alpha * T^2 * KL(teacher || student) steps until the image budget is spent, each matrix's gradient
        multiplied by its mask (the structure stays); returns images seen."""
        device = next(model.parameters()).device
        prefix = model._reduction_ctx.num_prefix
        temperature, seen = self.temperature, 0
        for x, y in budgeted_batches(train_batches, budget["budget_images"]):
            x, y = x.to(device), y.to(device)
            with torch.no_grad(), autocast(str(device), budget.get("precision", "fp32")):
                self.bypass = True
                teacher = model(x).float()
                self.bypass = False
            with autocast(str(device), budget.get("precision", "fp32")):
                student = train_model(x).float()
            distill = F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1),
                               reduction="batchmean") * temperature ** 2
            loss = F.cross_entropy(student, y) + self.alpha * distill
            seen += len(y)
            report.steps += 1
            bar.update(len(y))
            optimizer.zero_grad(set_to_none=True)
            if not all_ranks_true(bool(torch.isfinite(loss))):
                report.skipped_steps += 1
                continue
            loss.backward()
            for matrix, mask in grad_masks:
                matrix.grad.mul_(mask.to(matrix.grad.device))
            optimizer.step()
            with torch.no_grad():
                for m in self.M:
                    m[:prefix] = torch.eye(prefix, m.shape[1], device=m.device)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        return seen

    def learned_state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {} if self.scores is None else {"scores": self.scores}
        for layer, (m, r, p) in enumerate(zip(self.M, self.R, self.pruned)):
            state[f"M.{layer}"], state[f"R.{layer}"], state[f"pruned.{layer}"] = m.detach().cpu(), r.detach().cpu(), p
        return state

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        depth = sum(1 for key in state if key.startswith("M."))
        self.scores = state.get("scores")
        self.M = torch.nn.ParameterList([torch.nn.Parameter(state[f"M.{l}"].clone()) for l in range(depth)])
        self.R = torch.nn.ParameterList([torch.nn.Parameter(state[f"R.{l}"].clone()) for l in range(depth)])
        self.pruned = [state[f"pruned.{l}"].clone() for l in range(depth)]
        self.identity = [m.shape[0] == m.shape[1] and bool(torch.equal(m.detach(), torch.eye(len(m)))) for m in self.M]
