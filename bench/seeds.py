"""Runs repeated under other seeds, set side by side: how much each cell's figures move with the seed.

Each ``--seed`` is its own evaluation setting (:mod:`bench.settings`), with its own baseline, figures and table
section. The seed orders the images a fit trains on (and draws a ``--limit`` subset), so where a setting was run
under two or more seeds, the spread of a learned method's top-1, GMACs and r_FLOPs over the seeds is the variance of
its fit, which neither the Wilson interval nor the paired drop (both over the evaluation images) contains. A method
that learns nothing gives the same figures under every seed on a full evaluation set with given weights (spread 0);
random weights are drawn by the seed too, so there the spread is also that of the weights.
"""
from __future__ import annotations

import pandas as pd

from bench.settings import Setting, series_labels, split_by_setting

#: One row per series and knobs measured under two or more seeds: means and sample standard deviations over seeds.
SPREAD_COLUMNS = ["method", "knobs", "seeds", "top1_mean", "top1_sd", "top1_min", "top1_max", "drop_mean",
                  "drop_sd", "gmacs_mean", "gmacs_sd", "r_flops_mean", "r_flops_sd"]


def seed_spread(cells: pd.DataFrame, drops: pd.Series | None = None,
                naming: pd.DataFrame | None = None) -> list[tuple[Setting, pd.DataFrame]]:
    """The settings of ``cells`` (store rows) that differ only by seed, each with its :data:`SPREAD_COLUMNS` rows;
    none where no series was measured under two seeds. A series repeats where its knobs read alike
    (:func:`bench.tables.knob_summary`). ``drops``: each cell's paired top-1 drop from its own seed's baseline in
    points, indexed by ``cell_key`` (None: no drop columns). Top-1 and drops in points; the standard deviation is
    the sample one (n - 1)."""
    from bench.tables import knob_summary

    unseeded, naming = (None if frame is None else without_seed(frame) for frame in (cells, naming))
    drops = pd.Series(dtype=float) if drops is None else drops
    spreads = []
    for setting, group in split_by_setting(unseeded, naming):
        group = group.assign(seed=cells.loc[group.index, "seed"], series=series_labels(group),
                             knob_text=[knob_summary(m, k) for m, k in zip(group["method"], group["knobs"])],
                             drop=group["cell_key"].map(drops).astype(float))
        rows = [summarise(series, knobs, repeats)  # one cell per seed (more would be cells of the same knobs text)
                for (series, knobs), repeats in group.groupby(["series", "knob_text"], sort=False)
                if repeats["seed"].nunique() >= 2 and not repeats["seed"].duplicated().any()]
        if rows:
            spreads.append((setting, pd.DataFrame(rows, columns=SPREAD_COLUMNS)))
    return spreads


def without_seed(cells: pd.DataFrame) -> pd.DataFrame:
    """``cells`` with the seed taken out of their setting: seed 0 for all, and random weights (``random-seedN``,
    drawn by the seed) named alike."""
    weights = cells["checkpoint_sha"].where(~cells["checkpoint_sha"].str.startswith("random-seed"), "random-seed")
    return cells.assign(seed=0, checkpoint_sha=weights)


def summarise(series: str, knobs: str, repeats: pd.DataFrame) -> dict:
    """One :data:`SPREAD_COLUMNS` row of the cells ``repeats`` (one per seed)."""
    top1 = 100 * repeats["top1"]
    return {"method": series, "knobs": knobs, "seeds": ", ".join(str(s) for s in sorted(repeats["seed"])),
            "top1_mean": top1.mean(), "top1_sd": top1.std(), "top1_min": top1.min(), "top1_max": top1.max(),
            "drop_mean": repeats["drop"].mean(), "drop_sd": repeats["drop"].std(),
            "gmacs_mean": repeats["gmacs"].mean(), "gmacs_sd": repeats["gmacs"].std(),
            "r_flops_mean": repeats["r_flops"].mean(), "r_flops_sd": repeats["r_flops"].std()}


def spread_text(spread: pd.DataFrame) -> pd.DataFrame:
    """One setting's :func:`seed_spread` rows as the text a table prints: mean ± sd [min-max] over the seeds."""
    text = lambda mean, sd, digits: "–" if pd.isna(mean) else f"{mean:.{digits}f} ± {sd:.{digits}f}"
    return pd.DataFrame({
        "method": spread["method"], "knobs": spread["knobs"], "seeds": spread["seeds"],
        "top-1 (%), mean ± sd [min-max]": [f"{text(m, s, 2)} [{lo:.2f}-{hi:.2f}]" for m, s, lo, hi in zip(
            spread["top1_mean"], spread["top1_sd"], spread["top1_min"], spread["top1_max"])],
        "drop (points)": [text(m, s, 2) for m, s in zip(spread["drop_mean"], spread["drop_sd"])],
        "GMACs": [text(m, s, 4) for m, s in zip(spread["gmacs_mean"], spread["gmacs_sd"])],
        "r_FLOPs": [text(m, s, 3) for m, s in zip(spread["r_flops_mean"], spread["r_flops_sd"])],
    })
