"""Paper-ready figures from the results store (nothing is recomputed).

1. ``frontier``: top-1 vs GMACs, a line through each method's sweep, Pareto-optimal points filled and the others
   hollow, the unreduced baseline as a star, Wilson 95 % error bars, knob labels;
2. ``throughput``: top-1 vs images/s, one panel per device and precision (the largest batch measured);
3. ``realisation``: measured speedup vs GMACs ratio with the y = x line, batch 1 and the throughput batch, error
   bars the quartiles of the per-round speedups (baseline and method timed back to back);
4. ``tokens``: mean tokens per block for each method at matched GMACs (the spread over images shaded);
5. ``frontier_..._seeds``: where a setting was run under several seeds, the frontier of each series' means over the
   seeds, error bars one sample standard deviation of top-1 and of GMACs (:mod:`bench.seeds`).

One fixed colour-blind-safe colour (Okabe-Ito) and marker per method in every figure, TrueType fonts in PDF,
sized for a 3.4-inch column; each figure is written as PDF, SVG and PNG.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bench.matched import pareto_front  # noqa: E402
from bench.published import points_for  # noqa: E402
from bench.seeds import seed_spread  # noqa: E402
from bench.settings import series_labels, split_by_setting  # noqa: E402

OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442", "#999999"]
METHOD_STYLE = {  # label -> (colour, marker); the baseline is black
    "none": ("#000000", "*"), "tome": (OKABE_ITO[0], "o"), "topk": (OKABE_ITO[1], "v"), "ltmp": (OKABE_ITO[2], "s"),
    "ltp": (OKABE_ITO[3], "D"), "ltm": (OKABE_ITO[4], "P"), "pm": (OKABE_ITO[5], "^"), "pm-ft": (OKABE_ITO[7], "X"),
}
#: Your plug-ins' and variant series' colours (from Paul Tol's muted scheme and one brown), none of them a shipped
#: method's, each with a marker of :data:`EXTRA_MARKERS`
EXTRA_COLOURS = ["#882255", "#332288", "#999933", "#CC6677", "#DDCC77", "#8C564B"]
EXTRA_MARKERS = ["h", "<", ">", "p", "d", "8"]
STYLE = {"font.size": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none", "axes.spines.top": False,
         "axes.spines.right": False, "figure.dpi": 100, "savefig.bbox": "tight", "lines.linewidth": 1.2,
         "lines.markersize": 5}
COLUMN_WIDTH = 3.4


def style_of(label: str, labels: Iterable[str]) -> tuple[str, str]:
    """Fixed style for known methods; others (plug-ins, variant series) get :data:`EXTRA_COLOURS` in sorted-label
    order."""
    if label in METHOD_STYLE:
        return METHOD_STYLE[label]
    others = sorted(l for l in set(labels) if l not in METHOD_STYLE)
    index = others.index(label) if label in others else 0
    return EXTRA_COLOURS[index % len(EXTRA_COLOURS)], EXTRA_MARKERS[index % len(EXTRA_MARKERS)]


def knob_text(method: str, knobs: str) -> str:
    """A point's label: the values of the knobs the plug-in sweeps (``16`` for ToMe r=16); all values for plug-ins
    not loaded."""
    from methods.base import swept_values

    return ", ".join(f"{v}" for v in swept_values(method, json.loads(knobs)).values())


#: No dates in the files and fixed SVG ids: re-plotting the same store writes byte-identical figures.
UNDATED = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": {}}


def _save(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for suffix, metadata in UNDATED.items():
        path = out_dir / f"{name}.{suffix}"
        with plt.rc_context({"svg.hashsalt": name}):
            fig.savefig(path, dpi=200 if suffix == "png" else None, bbox_inches="tight", metadata=metadata)
        paths.append(path)
    plt.close(fig)
    return paths


def frontier(cells: pd.DataFrame, labels_on: bool = True, title: str | None = None,
             published: pd.DataFrame | None = None) -> plt.Figure:
    """Top-1 vs GMACs per method; cells of one evaluation setting (:mod:`bench.settings`). ``published``: the
    papers' points for this setting (:func:`bench.published.points_for`), drawn as crosses joined by dotted lines
    in the colour of the method's first series."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.6))
        labels = list(cells["label"].unique())
        pareto = pareto_front(cells["gmacs"], cells["top1"])
        cells = cells.assign(pareto=pareto)
        knob_labels: list[matplotlib.text.Annotation] = []
        for label, group in cells.groupby("label", sort=True):
            colour, marker = style_of(label, labels)
            group = group.sort_values("gmacs", kind="stable")
            y = 100 * group["top1"]
            # clipped at 0: stores written before wilson_interval pinned its ends hold lows a hair above a top-1 of 0
            err = np.clip([100 * (group["top1"] - group["top1_low"]), 100 * (group["top1_high"] - group["top1"])], 0, None)
            if label == "none":
                ax.errorbar(group["gmacs"], y, yerr=err, fmt="*", color=colour, markersize=10, label="baseline",
                            zorder=5, capsize=2)
                continue
            ax.errorbar(group["gmacs"], y, yerr=err, color=colour, marker=marker, markerfacecolor="white",
                        label=label, capsize=2, linewidth=1.0)
            front = group[group["pareto"]]
            ax.plot(front["gmacs"], 100 * front["top1"], linestyle="none", marker=marker, color=colour, zorder=4,
                    gid=f"pareto:{label}")
            if labels_on:
                knob_labels += annotate_knobs(ax, group, "gmacs", colour)
        for method, points in ([] if published is None else published.groupby("method", sort=True)):
            colour = style_of(cells.loc[cells["method"] == method, "label"].iloc[0], labels)[0]
            points = points.sort_values("gmacs")
            ax.plot(points["gmacs"], points["top1"], linestyle=":", marker="x", markersize=4, linewidth=0.8,
                    color=colour, gid=f"published:{method}")
        if published is not None and not published.empty:  # one legend entry for every method's published points
            ax.plot([], [], linestyle=":", marker="x", markersize=4, linewidth=0.8, color="grey", label="published")
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3, linewidth=0.5)
        ax.legend(frameon=False, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
        ax.set_title(title or f"{cells['model'].iloc[0]} on {cells['dataset'].iloc[0]}", fontsize=7)
        place_labels(fig, ax, knob_labels)
        return fig


def seed_frontier(spread: pd.DataFrame, title: str) -> plt.Figure:
    """Top-1 vs GMACs of one setting's :func:`bench.seeds.seed_spread` rows: each series' means over the seeds, one
    sample standard deviation as error bars on both axes."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.6))
        labels = list(spread["method"].unique())
        for label, group in spread.groupby("method", sort=True):
            colour, marker = style_of(label, labels)
            group = group.sort_values("gmacs_mean", kind="stable")
            baseline = label == "none"
            ax.errorbar(group["gmacs_mean"], group["top1_mean"], xerr=group["gmacs_sd"], yerr=group["top1_sd"],
                        color=colour, marker="*" if baseline else marker, markersize=10 if baseline else None,
                        linestyle="none" if baseline else "-", label="baseline" if baseline else label, capsize=2,
                        linewidth=1.0, gid=f"seeds:{label}")
        ax.set_xlabel("GMACs per image (mean over seeds)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3, linewidth=0.5)
        ax.legend(frameon=False, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
        seeds = sorted({int(seed) for text in spread["seeds"] for seed in text.split(", ")})
        ax.set_title(f"{title}: seeds {', '.join(map(str, seeds))} (mean ± sd)", fontsize=7)
        return fig


def annotate_knobs(ax: plt.Axes, group: pd.DataFrame, x: str, colour: str) -> list[matplotlib.text.Annotation]:
    """One knob label per drawn point of a method's cells ``group`` at (``group[x]``, top-1 in %): knob values whose
    cells coincide share it ("0.9/0.8"). :func:`place_labels` then moves them apart."""
    labels = []
    for (x_value, top1), same in group.groupby([x, "top1"], sort=False):
        text = "/".join(knob_text(row.method, row.knobs) for row in same.itertuples())
        labels.append(ax.annotate(text, (x_value, 100 * top1), fontsize=5, xytext=LABEL_SPOTS[0][1:3],
                                  textcoords="offset points", color=colour))
    return labels


#: Where a knob label may sit, most preferred first: ``(ring, dx, dy, horizontal alignment)``, offsets in points from
#: its point. Right and below first (where labels always sat), then above, then left; each ring farther out.
LABEL_SPOTS = [(ring, side * (3 + 4 * ring), dy, "left" if side > 0 else "right")
               for ring in range(4) for side in (1, -1) for dy in (-6 - 5 * ring, 2 + 5 * ring)]
#: What a label may cover, cheapest first, as the cost of covering one: a line joining a series' points, an error
#: bar, a marker, the axes' edge, another label; and the cost of each ring of :data:`LABEL_SPOTS` farther from its
#: point (a label far away is hard to tell apart). A label takes the first spot of least total cost.
COVER_COST = {"line": 1.0, "ring": 2.0, "error bar": 3.0, "marker": 30.0, "outside": 100.0, "label": 1000.0}


def _obstacles(ax: plt.Axes) -> tuple[list[matplotlib.transforms.Bbox], list[tuple[str, matplotlib.path.Path]]]:
    """What is drawn in ``ax``, in display coordinates: one box per marker, and the lines (series and error bars)
    as ``(kind, path)``."""
    markers, paths = [], []
    for line in ax.get_lines():
        if not line.get_visible():
            continue
        if line.get_marker() not in (None, "None", "", " "):
            half = line.get_markersize() * ax.figure.dpi / 72 / 2
            for x, y in line.get_transform().transform(line.get_xydata()):
                markers.append(matplotlib.transforms.Bbox([[x - half, y - half], [x + half, y + half]]))
        if line.get_linestyle() not in ("None", "", " ") and len(line.get_xydata()) > 1:
            paths.append(("line", line.get_transform().transform_path(line.get_path())))
    for collection in ax.collections:  # error bars
        transform = collection.get_transform()
        paths += [("error bar", transform.transform_path(path)) for path in collection.get_paths()]
    return markers, paths


def place_labels(fig: plt.Figure, ax: plt.Axes, labels: list[matplotlib.text.Annotation]) -> None:
    """Put each point label at the spot (:data:`LABEL_SPOTS`) where it covers least (:data:`COVER_COST`): no other
    label, marker or error bar where the plot leaves room, so that knob labels of nearby points stay readable.
    Labels are placed in order of their points' x; the point each label names does not move."""
    if not labels:  # labels_on=False: nothing to place, so no extra draw
        return
    fig.canvas.draw()  # lays the axes out: before it, their limits are not final and unplaced labels have no extent
    renderer = fig.canvas.get_renderer()
    markers, paths = _obstacles(ax)
    frame = ax.get_window_extent(renderer)
    placed: list[matplotlib.transforms.Bbox] = []

    def cost(box: matplotlib.transforms.Bbox, ring: int) -> float:
        covered = {"ring": ring, "label": sum(box.overlaps(other) for other in placed),
                   "marker": sum(box.overlaps(marker) for marker in markers),
                   "outside": not (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1))}
        for kind in ("line", "error bar"):
            covered[kind] = sum(path.intersects_bbox(box, filled=False) for k, path in paths if k == kind)
        return sum(COVER_COST[kind] * count for kind, count in covered.items())

    for label in sorted(labels, key=lambda text: text.xy[0]):
        best: tuple[float, tuple[float, float, str]] | None = None
        for ring, dx, dy, align in LABEL_SPOTS:
            label.set_position((dx, dy))
            label.set_horizontalalignment(align)
            spot_cost = cost(label.get_window_extent(renderer), ring)
            if best is None or spot_cost < best[0]:
                best = (spot_cost, (dx, dy, align))
            if spot_cost == 0:
                break
        dx, dy, align = best[1]
        label.set_position((dx, dy))
        label.set_horizontalalignment(align)
        placed.append(label.get_window_extent(renderer))


def _throughput_rows(cells: pd.DataFrame, timings: pd.DataFrame) -> pd.DataFrame:
    merged = timings.merge(cells, on="cell_key")
    largest = merged.groupby(["device", "precision"])["batch"].transform("max")
    return merged[merged["batch"] == largest]


def throughput(cells: pd.DataFrame, timings: pd.DataFrame) -> plt.Figure:
    rows = _throughput_rows(cells, timings)
    panels = sorted(rows.groupby(["device", "precision"]).groups)
    labels = list(cells["label"].unique())
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(COLUMN_WIDTH * len(panels), 2.6), squeeze=False)
        for ax, (device, precision) in zip(axes[0], panels):
            panel = rows[(rows["device"] == device) & (rows["precision"] == precision)]
            knob_labels = []
            for label, group in panel.groupby("label", sort=True):
                colour, marker = style_of(label, labels)
                group = group.sort_values("images_per_s")
                ax.plot(group["images_per_s"], 100 * group["top1"], color=colour, marker=marker,
                        markersize=10 if label == "none" else 5, label="baseline" if label == "none" else label)
                if label != "none":
                    knob_labels += annotate_knobs(ax, group, "images_per_s", colour)
            ax.set_xlabel(f"images/s ({device}, {precision}, batch {int(panel['batch'].iloc[0])})")
            ax.set_ylabel("top-1 accuracy (%)")
            ax.grid(alpha=0.3, linewidth=0.5)
            ax.legend(frameon=False, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
            place_labels(fig, ax, knob_labels)
        return fig


def speedup_spread(timings: pd.DataFrame) -> np.ndarray | None:
    """(2, n) distances below and above each point's speedup to the quartiles of its per-round ratios, or None when
    the store predates them. The ratio of medians may lie just outside the per-round quartiles: clipped at 0."""
    if "speedup_q1" not in timings or timings["speedup_q1"].isna().any():
        return None
    speedup = timings["speedup"].to_numpy(float)
    return np.clip(np.stack([speedup - timings["speedup_q1"].to_numpy(float),
                             timings["speedup_q3"].to_numpy(float) - speedup]), 0.0, None)


def realisation(cells: pd.DataFrame, timings: pd.DataFrame) -> plt.Figure:
    """Measured speedup against the GMACs ratio; error bars: quartiles of the per-round speedups."""
    merged = timings.merge(cells, on="cell_key")
    batches = sorted(merged["batch"].unique())
    shown = [batches[0]] + ([batches[-1]] if len(batches) > 1 else [])
    labels = list(cells["label"].unique())
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(shown), figsize=(COLUMN_WIDTH * len(shown), 2.6), squeeze=False)
        for ax, batch in zip(axes[0], shown):
            panel = merged[merged["batch"] == batch]
            limit = max(float(panel["gmacs_ratio"].max()), float(panel["speedup"].max()), 1.0) * 1.05
            ax.plot([0.9, limit], [0.9, limit], color="grey", linestyle="--", linewidth=0.8, label="y = x")
            for (label, precision), group in panel.groupby(["label", "precision"], sort=True):
                colour, marker = style_of(label, labels)
                group = group.sort_values("gmacs_ratio")
                name = "baseline" if label == "none" else label
                ax.plot(group["gmacs_ratio"], group["speedup"], color=colour, marker=marker,
                        linestyle="-" if precision == "bf16" else ":", label=f"{name} ({precision})")
                spread = speedup_spread(group)
                if spread is not None:
                    ax.errorbar(group["gmacs_ratio"], group["speedup"], yerr=spread, fmt="none", ecolor=colour,
                                elinewidth=0.6, capsize=1.5, gid=f"spread:{label}:{precision}")
            ax.set_xlabel("GMACs ratio (baseline / method)")
            ax.set_ylabel(f"measured speedup, batch {batch}")
            ax.grid(alpha=0.3, linewidth=0.5)
            ax.legend(frameon=False, fontsize=5, ncol=2)
        return fig


def tokens_per_layer(cells: pd.DataFrame) -> plt.Figure:
    """Each method's cell closest to the median GMACs of all reduced cells, so methods compare at equal cost."""
    reduced = cells[cells["label"] != "none"]
    target = float(reduced["gmacs"].median()) if not reduced.empty else float(cells["gmacs"].median())
    labels = list(cells["label"].unique())
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.4))
        for label, group in cells.groupby("label", sort=True):
            row = group.iloc[(group["gmacs"] - target).abs().argsort().iloc[0]]
            colour, marker = style_of(label, labels)
            mean = json.loads(row["tokens_attn"])
            layers = list(range(len(mean)))
            name = "baseline" if label == "none" else f"{label} ({row['gmacs']:.3f} G)"
            ax.plot(layers, mean, color=colour, marker=marker, label=name)
            if pd.notna(row["tokens_attn_min"]):  # a row stored without the range: NULL, read as NaN under pandas 3
                low, high = json.loads(row["tokens_attn_min"]), json.loads(row["tokens_attn_max"])
                if low != high:
                    ax.fill_between(layers, low, high, color=colour, alpha=0.15, linewidth=0)
        ax.set_xlabel("block")
        ax.set_ylabel("tokens entering attention")
        shaded = "; shaded: range over images" if ax.collections else ""
        ax.set_title(f"at matched cost (~{target:.3f} GMACs){shaded}", fontsize=7)
        ax.grid(alpha=0.3, linewidth=0.5)
        ax.legend(frameon=False, fontsize=5, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # off the spread
        return fig


def plot_all(store_path: str | Path, out_dir: str | Path, echo=print) -> list[Path]:
    """Every figure for every model/dataset in the store. One-line messages where data is missing."""
    from bench.store import read_results

    return plot_cells(*read_results(store_path), out_dir, echo)


def plot_cells(cells: pd.DataFrame, timings: pd.DataFrame, out_dir: str | Path, echo=print,
               naming: pd.DataFrame | None = None) -> list[Path]:
    """Every figure for the given cells and their timings, one set per evaluation setting, named among the cells of
    ``naming`` (default ``cells``; see :mod:`bench.settings`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for setting, group in split_by_setting(cells, naming):
        group = group.assign(label=series_labels(group))  # a label's variants: separate series
        paths += _save(frontier(group, title=setting.title, published=points_for(group)), out,
                       f"frontier_{setting.stem}")
        paths += _save(tokens_per_layer(group), out, f"tokens_{setting.stem}")
        group_timings = timings[timings["cell_key"].isin(group["cell_key"])]
        if group_timings.empty:
            echo(f"note: no latency measurements for {setting.title}: throughput and realisation figures skipped")
            continue
        paths += _save(throughput(group, group_timings), out, f"throughput_{setting.stem}")
        paths += _save(realisation(group, group_timings), out, f"realisation_{setting.stem}")
    for setting, spread in seed_spread(cells, naming=naming):  # the figure draws top-1 and GMACs only
        paths += _save(seed_frontier(spread, setting.title), out, f"frontier_{setting.stem}__seeds")
    return paths
