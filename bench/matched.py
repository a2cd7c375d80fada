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

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

#: Cost levels: how many times fewer GMACs (or how much speedup) than the unreduced model.
LEVELS = (1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0)
#: A cell this close to a level counts as measured there.
AT_LEVEL = 5e-3


def pareto_front(cost: Iterable[float], quality: Iterable[float]) -> list[bool]:
    """True for points no other point beats (lower-or-equal cost and higher-or-equal quality, one strictly)."""
    points = list(zip(cost, quality))
    return [not any((c2 <= c and q2 >= q) and (c2 < c or q2 > q) for c2, q2 in points) for c, q in points]


def read_at(saving: Sequence[float], values: Sequence[float], level: float) -> float | None:
    """``values`` linearly interpolated at ``level`` of ``saving`` (higher = cheaper), or None outside
    [min(saving), max(saving)]. Points of equal saving are averaged first."""
    frame = pd.DataFrame({"saving": saving, "value": values}).groupby("saving", sort=True)["value"].mean()
    if frame.empty or not frame.index.min() - 1e-12 <= level <= frame.index.max() + 1e-12:
        return None
    return float(np.interp(level, frame.index.to_numpy(float), frame.to_numpy(float)))


def matched(table: pd.DataFrame, axis: str, levels: Sequence[float] = LEVELS) -> pd.DataFrame:
    """Long form: one row per (level, method) with ``top1`` and ``top1_pm`` (percent) read off the method's Pareto
    cells at ``level`` of the saving column ``axis`` (``gmacs_ratio`` or a ``speedup ...`` column).

    ``table``: rows of :func:`bench.tables.comparison` for one evaluation setting (``method``, ``top1``, ``top1_pm``
    and ``axis``). The baseline (``none``) is left out; levels that fewer than two methods reach are dropped.
    Columns: ``axis``, ``level``, ``method``, ``top1``, ``top1_pm``, ``cells`` (``measured`` where a cell sits within
    0.005 of the level, ``cheaper`` where the front's cheapest cell stands in, else ``interpolated``)."""
    rows = []
    reduced = table[(table["method"] != "none") & table[axis].notna()]
    for method, group in reduced.groupby("method", sort=True):
        saving, top1, half = (group[c].to_numpy(float) for c in (axis, "top1", "top1_pm"))
        least = saving.min()
        front = np.array(pareto_front(-saving, top1))
        saving, top1, half = saving[front], top1[front], half[front]
        first = int(saving.argmin())
        for level in levels:
            value = read_at(saving, top1, level)
            if value is not None:
                exact = bool(np.isclose(saving, level, rtol=0, atol=AT_LEVEL).any())
                rows.append({"axis": axis, "level": level, "method": method, "top1": value,
                             "top1_pm": read_at(saving, half, level), "cells": "measured" if exact else "interpolated"})
            elif least <= level < saving[first]:  # only dominated cells here: the cheaper, better one stands in
                rows.append({"axis": axis, "level": level, "method": method, "top1": float(top1[first]),
                             "top1_pm": float(half[first]), "cells": "cheaper"})
    frame = pd.DataFrame(rows, columns=["axis", "level", "method", "top1", "top1_pm", "cells"])
    reach = frame.groupby("level")["method"].transform("nunique")
    return frame[reach >= 2].reset_index(drop=True)


def cost_axes(table: pd.DataFrame) -> list[str]:
    """The saving columns of a comparison table: ``gmacs_ratio``, then each ``speedup ...`` column."""
    return ["gmacs_ratio", *sorted(c for c in table.columns if c.startswith("speedup"))]


def matched_all(table: pd.DataFrame, levels: Sequence[float] = LEVELS) -> pd.DataFrame:
    """:func:`matched` on every cost axis of ``table``, stacked."""
    return pd.concat([matched(table, axis, levels) for axis in cost_axes(table)], ignore_index=True)


def axis_text(axis: str, level: float) -> str:
    """``×1.50 fewer GMACs`` or ``×1.50 speedup cpu fp32 b32``."""
    return f"×{level:.2f} fewer GMACs" if axis == "gmacs_ratio" else f"×{level:.2f} {axis}"


def wide(long: pd.DataFrame) -> pd.DataFrame:
    """One row per (axis, level), one column per method, cells as text: ``top1 ± pm`` with its :data:`MARKS`, ``–``
    where the method does not reach the level, and the best of the row wrapped in ``**``."""
    records = []
    methods_seen = sorted(long["method"].unique())
    axis_order = {axis: i for i, axis in enumerate(dict.fromkeys(long["axis"]))}  # as :func:`cost_axes` gave them
    long = long.sort_values(["level"]).sort_values(["axis"], key=lambda axes: axes.map(axis_order), kind="stable")
    for (axis, level), group in long.groupby(["axis", "level"], sort=False):
        best = group["top1"].max()
        record = {"cost": axis_text(axis, level)}
        by_method = group.set_index("method")
        for method in methods_seen:
            if method not in by_method.index:
                record[method] = "–"
                continue
            row = by_method.loc[method]
            text = f"{row['top1']:.2f} ± {row['top1_pm']:.2f}" + MARKS[row["cells"]]
            record[method] = f"**{text}**" if np.isclose(row["top1"], best) else text
        records.append(record)
    return pd.DataFrame(records)


#: How a value was read: interpolated (no mark), a cell at the level, or a cell that saves more standing in.
MARKS = {"interpolated": "", "measured": " =", "cheaper": " ≥"}

NOTE = ("Top-1 (%) of each method at equal cost, read off its Pareto-optimal cells by linear interpolation between "
        "the two that bracket the cost (`=`: a cell measured at that cost; `≥`: a cell of the method that saves more "
        "and is at least as accurate as those measured at this cost; `–`: outside the method's measured range, never "
        "extrapolated). Bold: the best at that cost; differences inside the ± intervals are not significant.")
