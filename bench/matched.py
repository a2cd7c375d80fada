"""Top-1 at matched cost: the suite's question (at equal cost, which method keeps the most accuracy?) as a table.

A sweep measures each method at its own costs (ToMe at r = 16, 24, 32; LTMP wherever its learned thresholds land),
so no two methods share a cost exactly. This module reads each method's top-1 off its own sweep at common cost
levels (×1.25, ×1.5, ... fewer GMACs, or that much measured speedup):

* only a method's **Pareto-optimal cells** count (no other cell of the same method is cheaper-or-equal and at least
  as accurate), the points a user of that method would pick;
* between the two of them that bracket a level, top-1 and its interval half-width are **interpolated linearly in
  the cost** (the half-width so interpolated bounds the interpolated value's from above, the two cells' errors
  being positively correlated on the same images);
* where only cells the front dominates were measured (below the front's smallest saving, but not below the
  method's smallest), the front's cheapest cell stands in: it saves more and is at least as accurate (``cheaper``);
* **outside** a method's measured range there is no value (no extrapolation), and a level enters the table only
  where at least two methods reach it.

Nothing here is measured: every value is a linear reading between two measured cells of the store, and the
table says so.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from bench.accuracy import interval_text, mean_difference

#: Cost levels: how many times fewer GMACs (or how much speedup) than the unreduced model.
LEVELS = (1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0)
#: A cell this close to a level counts as measured there.
AT_LEVEL = 5e-3


def pareto_front(cost: Iterable[float], quality: Iterable[float]) -> list[bool]:
    """True for points no other point beats (lower-or-equal cost and higher-or-equal quality, one strictly)."""
    points = list(zip(cost, quality))
    return [not any((c2 <= c and q2 >= q) and (c2 < c or q2 > q) for c2, q2 in points) for c, q in points]


def level_weights(saving: Sequence[float], level: float) -> np.ndarray | None:
    """Weights ``(points,)`` that read ``level`` off points of ``saving`` (higher = cheaper) by linear interpolation:
    ``weights @ values`` is the reading of ``values``. The two points that bracket ``level`` share the weight (points
    of equal saving split theirs evenly); None outside [min(saving), max(saving)]."""
    saving = np.asarray(saving, dtype=float)
    if saving.size == 0 or not saving.min() - 1e-12 <= level <= saving.max() + 1e-12:
        return None
    unique, which = np.unique(saving, return_inverse=True)
    at_unique = np.zeros(len(unique))
    if len(unique) == 1:
        at_unique[0] = 1.0
    else:
        upper = int(np.clip(np.searchsorted(unique, level), 1, len(unique) - 1))
        share = float(np.clip((level - unique[upper - 1]) / (unique[upper] - unique[upper - 1]), 0.0, 1.0))
        at_unique[upper - 1], at_unique[upper] = 1.0 - share, share
    return at_unique[which] / np.bincount(which)[which]


def read_at(saving: Sequence[float], values: Sequence[float], level: float) -> float | None:
    """``values`` linearly interpolated at ``level`` of ``saving`` (higher = cheaper), or None outside
    [min(saving), max(saving)]. Points of equal saving are averaged first."""
    weights = level_weights(saving, level)
    return None if weights is None else float(weights @ np.asarray(values, dtype=float))


def readings(table: pd.DataFrame, axis: str, levels: Sequence[float]) -> Iterator[tuple[float, str, pd.Series, str]]:
    """``(level, method, weights, cells)`` for each level a method's Pareto cells reach: ``weights`` over rows of
    ``table`` (indexed like it; ``weights @ table.loc[weights.index, "top1"]`` is the reading), ``cells`` as
    :func:`matched` names them."""
    reduced = table[(table["method"] != "none") & table[axis].notna()]
    for method, group in reduced.groupby("method", sort=True):
        least = group[axis].min()
        front = group[pareto_front(-group[axis], group["top1"])]
        first = front[axis].idxmin()
        for level in levels:
            weights = level_weights(front[axis].to_numpy(float), level)
            if weights is not None:
                exact = bool(np.isclose(front[axis], level, rtol=0, atol=AT_LEVEL).any())
                yield level, method, pd.Series(weights, index=front.index), "measured" if exact else "interpolated"
            elif least <= level < front.loc[first, axis]:  # only dominated cells here: the cheaper, better one stands in
                yield level, method, pd.Series([1.0], index=[first]), "cheaper"


def matched(table: pd.DataFrame, axis: str, levels: Sequence[float] = LEVELS,
            hits: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Long form: one row per (level, method) with ``top1`` and ``top1_pm`` (percent) read off the method's Pareto
    cells at ``level`` of the saving column ``axis`` (``gmacs_ratio`` or a ``speedup ...`` column).

    ``table``: rows of :func:`bench.tables.comparison` for one evaluation setting (``method``, ``top1``, ``top1_pm``
    and ``axis``). The baseline (``none``) is left out; levels that fewer than two methods reach are dropped.
    Columns: ``axis``, ``level``, ``method``, ``top1``, ``top1_pm``, ``cells`` (``measured`` where a cell sits within
    0.005 of the level, ``cheaper`` where the front's cheapest cell stands in, else ``interpolated``), and
    ``gap``/``gap_pm``: the method's top-1 minus the best's at that level with the half-width of its 95 % interval,
    measured paired on the same images (:func:`paired_gap`) where ``hits`` (``cell_key`` -> ``(images,)`` bool)
    holds every cell read, else NaN."""
    rows, mixes = [], []
    for level, method, weights, cells in readings(table, axis, levels):
        read = table.loc[weights.index]
        rows.append({"axis": axis, "level": level, "method": method, "top1": float(weights @ read["top1"]),
                     "top1_pm": float(weights @ read["top1_pm"]), "cells": cells})
        keys = read["cell_key"] if "cell_key" in read else pd.Series(dtype=object)
        usable = hits is not None and len(keys) == len(read) and all(k in hits for k in keys)
        mixes.append(sum(w * hits[k].astype(float) for w, k in zip(weights, keys)) if usable else None)
    frame = pd.DataFrame(rows, columns=["axis", "level", "method", "top1", "top1_pm", "cells"])
    frame["gap"], frame["gap_pm"] = np.nan, np.nan
    for _, at_level in frame.groupby("level"):
        best = at_level["top1"].idxmax()
        for index in at_level.index:
            if mixes[index] is not None and mixes[best] is not None:
                frame.loc[index, ["gap", "gap_pm"]] = paired_gap(mixes[index], mixes[best])
    reach = frame.groupby("level")["method"].transform("nunique")
    return frame[reach >= 2].reset_index(drop=True)


def paired_gap(mix: np.ndarray, best: np.ndarray) -> tuple[float, float]:
    """``(gap, half-width)`` in points of a reading against the best one on the same images. ``mix``, ``best``:
    ``(images,)`` each image's interpolated hit (the readings' weights over their cells' 0/1 hits). The gap is the mean
    of the per-image differences with its interval (:func:`bench.accuracy.mean_difference`, as
    :func:`bench.accuracy.paired_difference` reads it, which this equals where both readings are single cells)."""
    gap, half = mean_difference(mix - best)
    return 100 * gap, 100 * half


def cost_axes(table: pd.DataFrame) -> list[str]:
    """The saving columns of a comparison table: ``gmacs_ratio``, then each ``speedup ...`` column."""
    return ["gmacs_ratio", *sorted(c for c in table.columns if c.startswith("speedup"))]


def matched_all(table: pd.DataFrame, levels: Sequence[float] = LEVELS,
                hits: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """:func:`matched` on every cost axis of ``table``, stacked."""
    return pd.concat([matched(table, axis, levels, hits) for axis in cost_axes(table)], ignore_index=True)


def axis_text(axis: str, level: float) -> str:
    """``×1.50 fewer GMACs`` or ``×1.50 speedup cpu fp32 b32``."""
    return f"×{level:.2f} fewer GMACs" if axis == "gmacs_ratio" else f"×{level:.2f} {axis}"


def reading_text(row: pd.Series, best: bool) -> str:
    """``top1 ± pm`` with its :data:`MARKS`, in ``**`` where it is the best of its cost."""
    text = interval_text(row["top1"], row["top1_pm"]) + MARKS[row["cells"]]
    return f"**{text}**" if best else text


def gap_text(row: pd.Series, best: bool) -> str:
    """``best``, or the paired gap to it as ``-0.07 ± 0.12`` (``n/a`` for cells stored without per-image hits)."""
    if best:
        return "best"
    return "n/a" if pd.isna(row["gap"]) else f"{round(row['gap'], 2) + 0.0:+.2f} ± {row['gap_pm']:.2f}"  # no -0.00


def wide(long: pd.DataFrame, text: Callable[[pd.Series, bool], str] = reading_text) -> pd.DataFrame:
    """One row per (axis, level), one column per method, cells as ``text`` gives them (default
    :func:`reading_text`; :func:`gap_text` for the paired gaps), ``–`` where the method does not reach the level."""
    records = []
    methods_seen = sorted(long["method"].unique())
    axis_order = {axis: i for i, axis in enumerate(dict.fromkeys(long["axis"]))}  # as :func:`cost_axes` gave them
    long = long.sort_values(["level"]).sort_values(["axis"], key=lambda axes: axes.map(axis_order), kind="stable")
    for (axis, level), group in long.groupby(["axis", "level"], sort=False):
        best = group["top1"].max()
        record = {"cost": axis_text(axis, level)}
        by_method = group.set_index("method")
        for method in methods_seen:
            record[method] = (text(by_method.loc[method], bool(np.isclose(by_method.loc[method, "top1"], best)))
                              if method in by_method.index else "–")
        records.append(record)
    return pd.DataFrame(records)


#: How a value was read: interpolated (no mark), a cell at the level, or a cell that saves more standing in.
MARKS = {"interpolated": "", "measured": " =", "cheaper": " ≥"}

NOTE = ("Top-1 (%) of each method at equal cost, read off its Pareto-optimal cells by linear interpolation between "
        "the two that bracket the cost (`=`: a cell measured at that cost; `≥`: a cell of the method that saves more "
        "and is at least as accurate as those measured at this cost; `–`: outside the method's measured range, never "
        "extrapolated). Bold: the best at that cost; differences inside the ± intervals are not significant.")

GAP_NOTE = ("Each method's top-1 minus the best's at that cost (points), measured paired on the same images: each "
            "image's hit interpolated with the weights of the readings above, and the 95 % interval of the mean "
            "per-image difference. A gap whose interval excludes 0 is significant; these intervals are much tighter "
            "than the ± of the readings, which ignore that every method saw the same images.")
