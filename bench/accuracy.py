"""Top-1 / top-5 with a Wilson 95 % interval, plus per-image token counts and GMACs from the same pass.

Each image's top-1 hit is kept too, in evaluation order (the seeded subset's, the same for every cell of a
setting), so two cells evaluated on the same images compare paired (:func:`paired_difference`): their difference
in top-1 has a far tighter interval than the two cells' own intervals suggest."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from bench.flops import image_macs
from bench.precision import autocast


#: The two-sided 95 % quantile of the standard normal distribution.
Z95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
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


def interval_text(value: float, half: float) -> str:
    """``90.32 ± 0.58`` (two decimals), ``–`` where ``value`` is missing (NaN)."""
    return "–" if math.isnan(value) else f"{value:.2f} ± {half:.2f}"


def interval_texts(values: Iterable[float], halves: Iterable[float]) -> list[str]:
    """:func:`interval_text` of each value and its interval's half-width."""
    return [interval_text(float(v), float(h)) for v, h in zip(values, halves)]


def pack_hits(hits: torch.Tensor) -> bytes:
    """``hits: (n,)`` bool -> n bits, packed 8 to a byte (1,250 bytes for 10,000 images)."""
    return np.packbits(hits.cpu().numpy().astype(bool)).tobytes()


def unpack_hits(packed: bytes, images: int) -> np.ndarray:
    """The ``(images,)`` bool array :func:`pack_hits` packed."""
    return np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[:images].astype(bool)


def mean_difference(differences: np.ndarray, z: float = Z95) -> tuple[float, float]:
    """``differences: (n,)`` per-image differences between two readings of the same images -> ``(mean, half-width
    of its 95 % interval)``, the standard error being that of a mean, ``sqrt(mean(d**2) - mean(d)**2) / sqrt(n)``."""
    mean = float(differences.mean())
    return mean, z * math.sqrt(max(float((differences ** 2).mean()) - mean ** 2, 0.0) / len(differences))


def paired_difference(hits_a: np.ndarray, hits_b: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """Top-1 of A minus top-1 of B on the same images (``hits_*: (n,)`` bool, image i of A is image i of B):
    ``(difference, half-width of its 95 % interval, two-sided p-value of McNemar's exact test)``.

    Only the discordant images carry information: ``b`` that A gets right and B wrong, ``c`` the reverse. The
    difference is ``(b - c) / n``; its standard error is that of the mean of the per-image differences (each -1, 0
    or 1, :func:`mean_difference`), ``sqrt((b + c) / n - ((b - c) / n)**2) / sqrt(n)``; McNemar's p is the binomial
    probability of a split at least as uneven as ``b : c`` among ``b + c`` fair coin flips."""
    if hits_a.shape != hits_b.shape:
        raise ValueError(f"paired cells must cover the same images ({hits_a.shape} vs {hits_b.shape})")
    b, c = int((hits_a & ~hits_b).sum()), int((~hits_a & hits_b).sum())
    difference, half = mean_difference(hits_a.astype(float) - hits_b.astype(float), z)
    tail = Fraction(sum(math.comb(b + c, i) for i in range(min(b, c) + 1)), 2 ** (b + c))
    return difference, half, float(min(Fraction(1), 2 * tail))


@dataclass
class EvalResult:
    images: int = 0
    top1_correct: int = 0
    top5_correct: int = 0
    macs: list[torch.Tensor] = field(default_factory=list)  # (B,) per batch
    hits: list[torch.Tensor] = field(default_factory=list)  # (B,) bool per batch: top-1 right
    all_hits: torch.Tensor | None = None  # (images,) bool, every rank's in evaluation order (after synchronise)
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

    def image_hits(self) -> torch.Tensor:
        """(images,) bool: each image's top-1 hit in evaluation order (all ranks' after :meth:`synchronise`)."""
        return self.all_hits if self.all_hits is not None else torch.cat(self.hits)

    def synchronise(self) -> None:
        """Combine the partial results of all ranks (exact: sums, mins and maxes of integers; each image's hit put
        back at the place in the evaluation order that :func:`bench.distributed.shard` gave this rank)."""
        from bench import distributed

        if not distributed.active():
            return
        local_hits = torch.cat(self.hits)
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
        placed = torch.zeros(self.images, dtype=torch.int32)
        placed[distributed.shard(torch.arange(self.images))] = local_hits.to(torch.int32)  # this rank's positions
        self.all_hits = distributed.all_reduce(placed).bool()

    def tokens_mean(self) -> torch.Tensor:
        """(depth, 2) mean token counts per image (attention, MLP)."""
        return self.token_sum / self.images

    def add(self, logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, macs: torch.Tensor) -> None:
        k = min(5, logits.shape[1])
        topk = logits.topk(k, -1).indices
        hits = topk == labels[:, None]
        self.images += len(labels)
        self.top1_correct += int(hits[:, 0].sum())
        self.hits.append(hits[:, 0].cpu())
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
