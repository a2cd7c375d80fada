"""Which cells a figure or a table section may compare: those of one evaluation setting.

A setting is the model and its weights, the evaluation set (dataset and image count), the device, the
evaluation precision and the run's seed, which draws a ``--limit`` subset of the images and orders the images a
fit trains on (it is part of every cell's key). Cells of different settings never share a figure or a table
section: a 500-image ``--quick`` run beside the full one, random weights beside pretrained ones, or two
ImageFolders evaluated on one model would otherwise put two baselines on one frontier and join points measured on
different images; two seeds' subsets of one size would be paired image by image although they hold different
images, and two seeds' fits would be drawn as one series.

Names: a *family* is one model on one kind of dataset (``vit_fmnist_convstem__fashion-mnist-test``). Its setting
with the most evaluation images (then the most cells, then the first in sorted order) keeps the plain stem and
title; each other setting adds what differs from it (``__500img``, ``__bf16``, ``__cuda``, ``__w1a2b3c4d``,
``__val``, ``__seed1``), so a full run keeps its file names however many smoke runs share the store.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import pandas as pd

#: The store columns that make cells comparable.
SETTING_COLUMNS = ("model", "checkpoint_sha", "dataset", "eval_images", "device", "eval_precision", "seed")

SettingKey = tuple[Any, ...]


@dataclass(frozen=True)
class Setting:
    """One evaluation setting's name: ``stem`` for file names, ``title`` for figures and table sections."""

    stem: str
    title: str


def _weights_text(sha: str) -> tuple[str, str]:
    if sha == "pretrained":
        return "pretrained", "pretrained weights"
    if sha.startswith("random-"):
        return sha, f"random weights ({sha.removeprefix('random-')})"
    return f"w{sha[:8]}", f"weights {sha[:8]}"


def _difference(column: str, value: Any) -> tuple[str, str]:
    """(stem tag, title text) for a setting's ``column`` that differs from its family's main setting (no title text
    for the dataset, which the title names anyway)."""
    if column == "checkpoint_sha":
        return _weights_text(str(value))
    if column == "dataset":
        return PurePath(str(value).split(":", 1)[-1]).name or "data", ""
    if column == "eval_images":
        return f"{int(value)}img", f"{int(value):,} images"
    if column == "eval_precision":
        return str(value), f"{value} evaluation"
    if column == "seed":
        return f"seed{int(value)}", f"seed {int(value)}"
    return str(value), str(value)


def dataset_kind(dataset: str) -> str:
    """``imagefolder:/data/val`` -> ``imagefolder``; ``fashion-mnist-test`` unchanged."""
    return dataset.split(":", 1)[0]


def name_settings(cells: pd.DataFrame) -> dict[SettingKey, Setting]:
    """A unique :class:`Setting` name for every setting in ``cells`` (store rows), keyed by its column values."""
    columns = list(SETTING_COLUMNS)
    counts = cells.groupby(columns, sort=True).size().reset_index(name="n_cells")
    counts["kind"] = counts["dataset"].map(dataset_kind)
    names: dict[SettingKey, Setting] = {}
    for (model, kind), family in counts.groupby(["model", "kind"], sort=True):
        family = family.sort_values(["eval_images", "n_cells"], ascending=False, kind="stable")
        main = family.iloc[0]
        for _, row in family.iterrows():
            differences = [_difference(c, row[c]) for c in columns[1:] if row[c] != main[c]]
            stem = "__".join([f"{model}__{kind}", *(tag for tag, _ in differences)])
            texts = [text for _, text in differences if text]
            title = f"{model} on {row['dataset']}" + (f" ({', '.join(texts)})" if texts else "")
            names[tuple(row[c] for c in columns)] = Setting(stem, title)
    stems = [s.stem for s in names.values()]
    for key, setting in names.items():  # tags that still collide (two folders both named val): add a short hash
        if stems.count(setting.stem) > 1:
            digest = hashlib.sha256(repr(key).encode()).hexdigest()[:6]
            names[key] = Setting(f"{setting.stem}__{digest}", f"{setting.title} [{digest}]")
    return names


def split_by_setting(cells: pd.DataFrame, naming: pd.DataFrame | None = None) -> list[tuple[Setting, pd.DataFrame]]:
    """``cells`` in groups of one setting each, with the names they get among the cells of ``naming``
    (default: ``cells`` itself; pass the whole store so that a run's files are named as ``plot`` names them)."""
    names = name_settings(cells if naming is None else pd.concat([naming, cells]).drop_duplicates("cell_key"))
    groups = [(names[key], group) for key, group in cells.groupby(list(SETTING_COLUMNS), sort=True)]
    return sorted(groups, key=lambda named: named[0].stem)  # a family's main setting (the plain stem) first


def series_labels(cells: pd.DataFrame) -> pd.Series:
    """Each cell's series name within one setting: its label, with the knobs that tell variants apart appended
    where one label covers cells whose fixed (not swept) knobs or fit settings differ, e.g. ``ltmp (clip_grad=0.0)``
    beside ``ltmp (clip_grad=1.0)`` after a config changed a knob, ``ltmp (fit.budget_images=384)`` beside
    ``ltmp (fit.budget_images=1536)`` after it changed the fit's budget, or two unlabelled entries of one method;
    where one label covers cells of several methods (configs run into one store), the method is appended:
    ``x (tome)``. Otherwise their sweeps would be drawn as one line and read as one method's Pareto front. A knob
    missing from a cell (stored before the knob existed) counts at its declared default; plug-ins not loaded keep
    their label, their swept knobs being unknown."""
    import json

    import methods

    fixed: dict[Any, dict[str, Any]] = {}
    for index, method, knobs_json in zip(cells.index, cells["method"], cells["knobs"]):
        reducer_cls = methods.REGISTRY.get(method)
        if reducer_cls is not None:
            values = {**reducer_cls.knob_defaults(), **json.loads(knobs_json)}
            fixed[index] = {k: v for k, v in values.items() if k not in reducer_cls.swept_knobs()}
    fits = fit_settings(cells)
    names = cells["label"].copy()
    for label, indices in cells.groupby("label").groups.items():
        if cells.loc[indices, "method"].nunique() > 1:  # one label on two methods (configs run into one store)
            names[indices] = [f"{label} ({method})" for method in cells.loc[indices, "method"]]
            continue
        if not all(i in fixed for i in indices):
            continue
        differing = sorted(k for k in set().union(*(fixed[i] for i in indices))
                           if len({json.dumps(fixed[i].get(k)) for i in indices}) > 1)
        recorded = [i for i in indices if i in fits]  # a fit's settings count where the store kept them
        differing_fit = sorted(k for k in set().union(*(fits[i] for i in recorded))
                               if len({json.dumps(fits[i].get(k)) for i in recorded}) > 1)
        for i in indices if differing or differing_fit else []:
            parts = [f"{k}={fixed[i].get(k)}" for k in differing]
            parts += [f"fit.{k}={fits[i].get(k)}" for k in differing_fit if i in fits]
            names[i] = f"{label} ({', '.join(parts)})" if parts else label
    return names


def fit_settings(cells: pd.DataFrame) -> dict[Any, dict[str, Any]]:
    """index -> the fit settings (``budget_images``, ``batch_size``, ...) of each cell that trained, where the store
    kept them (the ``fit`` column: none for cells of methods that do not train, nor for cells stored before it)."""
    import json

    column = cells["fit"] if "fit" in cells else pd.Series(None, index=cells.index, dtype=object)
    return {index: json.loads(text) for index, text in column.items() if isinstance(text, str) and text != "null"}


def select_labels(cells: pd.DataFrame, timings: pd.DataFrame, methods: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cells whose label ``methods`` names (comma-separated, as ``--methods``) and the baseline's (``none``), which
    every drop, GMACs ratio and speedup is measured against, with their timings. :class:`BenchError` naming the
    labels to choose from where ``methods`` names none or one the cells lack."""
    from bench.config import named_labels
    from bench.errors import BenchError

    known = sorted(set(cells["label"]))
    wanted = named_labels(methods, f" from {known}")
    unknown = sorted(wanted - set(known))
    if unknown:
        raise BenchError(f"--methods names {unknown}, which the store holds no cells of: choose from {known}")
    chosen = cells[cells["label"].isin(wanted | {"none"})]
    return chosen, timings[timings["cell_key"].isin(chosen["cell_key"])]
