"""The papers' published numbers beside a run of the same model: does this run reproduce them?

``bench/assets/published.yaml`` holds, per timm model name, the top-1 (%) and GMACs per image that the methods'
papers report on ImageNet-1k val. A setting (:mod:`bench.settings`) gets them where its model is listed, its data
is an ImageFolder and its weights are not random: the numbers only mean something against the papers' own
weights, preprocessing and 50,000 validation images, which the suite cannot check, so the note says so.

Each published point is set beside the run's top-1 *at the published cost*, read off the Pareto-optimal cells of
every series of the same method (``pm`` and ``pm-ft`` both face Prune-and-Merge's number): a cell within
:data:`TOLERANCE` GMACs of it (the papers round to 0.1) counts as measured there; otherwise the two cells that
bracket the cost are interpolated linearly (as :mod:`bench.matched` does); outside the measured range there is
no reading.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench.accuracy import interval_texts
from bench.errors import BenchError
from bench.matched import MARKS, pareto_front, read_at
from bench.settings import dataset_kind

PUBLISHED_FILE = Path(__file__).resolve().parent / "assets" / "published.yaml"
#: Published GMACs are given to 0.1: a cell this close counts as measured at the published cost.
TOLERANCE = 0.05
COLUMNS = ["model", "method", "knobs", "top1", "gmacs", "source"]
COMPARED = ["method", "knobs", "source", "gmacs", "top1_published", "series", "top1_here", "top1_here_pm",
            "difference", "cells"]

NOTE = ("Published ImageNet-1k top-1 (%) at the papers' GMACs (given to 0.1), beside this setting's top-1 at that "
        "cost, read off each series of the method on its Pareto-optimal cells (`=`: a cell within 0.05 GMACs; else "
        "interpolated between the two cells that bracket it; `–`: outside the measured range). `difference` = here "
        "− published: it measures reproduction only where the weights, preprocessing and evaluation images are the "
        "papers' (ImageNet-1k val, 50,000 images).")


def load(path: str | Path = PUBLISHED_FILE) -> pd.DataFrame:
    """Every published point: columns :data:`COLUMNS`, one row per point."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        rows = [{"model": model, **point} for model, points in raw.items() for point in points]
        frame = pd.DataFrame(rows, columns=COLUMNS)
    except (OSError, yaml.YAMLError, TypeError, AttributeError) as exc:
        raise BenchError(f"published numbers {path} unreadable ({type(exc).__name__}): restore it with "
                         "`git checkout bench/assets`") from exc
    return frame.astype({"top1": float, "gmacs": float, "knobs": object}).fillna({"knobs": ""})  # all missing: float NaN


def points_for(cells: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """The published points that apply to the cells of one setting (store rows): its model's, where the data is an
    ImageFolder and the weights are not random; only methods the setting measured. Empty otherwise."""
    published = load() if published is None else published
    first = cells.iloc[0]
    if dataset_kind(str(first["dataset"])) != "imagefolder" or str(first["checkpoint_sha"]).startswith("random-"):
        return published.iloc[0:0]
    return published[(published["model"] == first["model"]) & published["method"].isin(cells["method"])]


def read_here(gmacs: np.ndarray, top1: np.ndarray, top1_pm: np.ndarray, cost: float) -> tuple[float, float, str] | None:
    """(top-1, half-width, ``measured``/``interpolated``) of one series at ``cost`` GMACs off its Pareto cells,
    or None outside their range. ``gmacs``, ``top1``, ``top1_pm``: (cells,) of the series."""
    front = np.array(pareto_front(gmacs, top1))
    gmacs, top1, top1_pm = gmacs[front], top1[front], top1_pm[front]
    distance = np.abs(gmacs - cost)
    if distance.min() <= TOLERANCE + 1e-9:
        nearest = int(distance.argmin())
        return float(top1[nearest]), float(top1_pm[nearest]), "measured"
    value = read_at(gmacs, top1, cost)
    return None if value is None else (value, read_at(gmacs, top1_pm, cost), "interpolated")


def compare(table: pd.DataFrame, methods_of: pd.Series, points: pd.DataFrame) -> pd.DataFrame:
    """One row per (published point, series of its method): columns :data:`COMPARED` (``top1_here`` NaN where
    the series does not reach the cost). ``table``: :func:`bench.tables.comparison` rows of one setting (``method``
    holds the series label); ``methods_of``: series label -> registered method name."""
    rows = []
    for point in points.itertuples():
        for series in sorted(label for label, method in methods_of.items() if method == point.method):
            group = table[table["method"] == series]
            here = read_here(*(group[c].to_numpy(float) for c in ("gmacs", "top1", "top1_pm")), point.gmacs)
            value, half, how = here if here is not None else (np.nan, np.nan, "")
            rows.append({"method": point.method, "knobs": point.knobs, "source": point.source, "gmacs": point.gmacs,
                         "top1_published": point.top1, "series": series, "top1_here": value, "top1_here_pm": half,
                         "difference": value - point.top1, "cells": how})
    return pd.DataFrame(rows, columns=COMPARED)


def shown(compared: pd.DataFrame) -> pd.DataFrame:
    """``compared`` as text columns for the reports: here as ``top1 ± pm`` with ``=`` where measured, ``–``
    where out of range."""
    text = [here + MARKS.get(how, "")
            for here, how in zip(interval_texts(compared["top1_here"], compared["top1_here_pm"]), compared["cells"])]
    return pd.DataFrame({
        "method": compared["method"], "paper's setting": compared["knobs"].replace("", "–"),
        "source": compared["source"], "series": compared["series"], "GMACs": [f"{g:.1f}" for g in compared["gmacs"]],
        "top-1 published": [f"{t:.1f}" for t in compared["top1_published"]], "top-1 here": text,
        "difference": ["–" if pd.isna(d) else f"{d:+.2f}" for d in compared["difference"]],
    })
