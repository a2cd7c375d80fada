"""Top-1 / top-5 with a Wilson 95 % interval, plus per-image token counts and GMACs from the same pass."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from tqdm import tqdm

from bench.flops import image_macs
from bench.precision import autocast


def wilson_interval(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion. Its ends at 0 and at ``total`` correct are exactly 0 and 1
    (in floating point ``centre - half`` can land a hair above 0, an interval that no longer holds the proportion)."""
    if total == 0:
        return (0.0, 1.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    low = 0.0 if correct == 0 else min(p, max(0.0, centre - half))
    high = 1.0 if correct == total else max(p, min(1.0, centre + half))
    return (low, high)


@dataclass
class EvalResult:
    images: int = 0
    top1_correct: int = 0
    top5_correct: int = 0
    macs: list[torch.Tensor] = field(default_factory=list)  # (B,) per batch
    token_sum: torch.Tensor | None = None  # (depth, 2) summed over images
    token_min: torch.Tensor | None = None
    token_max: torch.Tensor | None = None
    synchronised: tuple[float, float, float] | None = None

    @property
    def top1(self) -> float:
        return self.top1_correct / self.images if self.images else float("nan")

    @property
    def top5(self) -> float:
        return self.top5_correct / self.images if self.images else float("nan")

    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.top1_correct, self.images)

    def macs_summary(self) -> tuple[float, float, float]:
        """Mean, min and max MACs per image (over all ranks after :meth:`synchronise`)."""
        if self.synchronised is not None:
            return self.synchronised
        macs = torch.cat(self.macs)
        return float(macs.mean()), float(macs.min()), float(macs.max())

    def synchronise(self) -> None:
        """Combine the partial results of all ranks (exact: sums, mins and maxes of integers)."""
        from bench import distributed

        if not distributed.active():
            return
        macs = torch.cat(self.macs)
        totals = distributed.all_reduce(torch.tensor([self.images, self.top1_correct, self.top5_correct, float(macs.sum())],
                                                     dtype=torch.float64))
        self.images, self.top1_correct, self.top5_correct = (int(v) for v in totals[:3])
        self.token_sum = distributed.all_reduce(self.token_sum)
        self.token_min = distributed.all_reduce(self.token_min, "min")
        self.token_max = distributed.all_reduce(self.token_max, "max")
        low = distributed.all_reduce(macs.min().reshape(1), "min")
        high = distributed.all_reduce(macs.max().reshape(1), "max")
        self.synchronised = (float(totals[3]) / self.images, float(low), float(high))

    def tokens_mean(self) -> torch.Tensor:
        """(depth, 2) mean token counts per image (attention, MLP)."""
        return self.token_sum / self.images

    def add(self, logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, macs: torch.Tensor) -> None:
        k = min(5, logits.shape[1])
        topk = logits.topk(k, -1).indices
        hits = topk == labels[:, None]
        self.images += len(labels)
        self.top1_correct += int(hits[:, 0].sum())
        self.top5_correct += int(hits.any(-1).sum())
        self.macs.append(macs)
        counts = counts.cpu()
        batch_sum, batch_min, batch_max = counts.sum(0), counts.min(0).values, counts.max(0).values
        if self.token_sum is None:
            self.token_sum, self.token_min, self.token_max = batch_sum, batch_min, batch_max
        else:
            self.token_sum = self.token_sum + batch_sum
            self.token_min = torch.minimum(self.token_min, batch_min)
            self.token_max = torch.maximum(self.token_max, batch_max)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], embed: int,
             precision: str = "fp32", device: str = "cpu", total: int | None = None, progress: bool = True,
             desc: str = "eval") -> EvalResult:
    """Run ``model`` (patched by a reducer) over ``batches`` of ``(x: (B, C, H, W), y: (B,))``."""
    ctx = model._reduction_ctx
    result = EvalResult()
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="img", leave=False)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits = model(x).float()
        counts = ctx.counts()
        result.add(logits.cpu(), y.cpu(), counts, image_macs(counts, ctx.dims, ctx.reducer, embed))
        bar.update(len(y))
    bar.close()
    return result
