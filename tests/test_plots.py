"""Pareto front on hand-made points; plotting a small store writes every file with the expected series."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import matplotlib.transforms
import numpy as np
import pandas as pd
import pytest
import torch

from bench import plots, settings, tables
from bench.errors import BenchError
from bench.accuracy import pack_hits
from bench.store import Store
from tests.test_store import fake_row, fake_timing
from tests.tiny_model import test_tiny_vit as make_tiny


@pytest.fixture(autouse=True)
def close_figures() -> Iterator[None]:
    """Figures the tests build and inspect (not saved, so not closed by the code under test) are closed after each."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def test_pareto_front_hand_points() -> None:
    cost = [1.0, 2.0, 3.0, 2.5, 1.0]
    quality = [0.5, 0.7, 0.9, 0.6, 0.4]
    #   (1, .5) front; (2, .7) front; (3, .9) front; (2.5, .6) dominated by (2, .7); (1, .4) dominated by (1, .5)
    assert plots.pareto_front(cost, quality) == [True, True, True, False, False]
    assert plots.pareto_front([1.0, 1.0], [0.5, 0.5]) == [True, True]  # ties dominate nobody


def small_store(path: Path, with_timings: bool = True) -> Path:
    store = Store(path)
    rows = [("b", "none", 0.92, 2.0), ("t1", "tome", 0.91, 1.5), ("t2", "tome", 0.89, 1.0),
            ("l1", "ltmp", 0.915, 1.4), ("l2", "ltmp", 0.90, 1.1), ("l3", "ltmp", 0.85, 0.9)]
    for key, method, top1, gmacs in rows:
        row = fake_row(key, method, top1, gmacs)
        row["tokens_attn_min"], row["tokens_attn_max"] = [190, 170], [197, 185]
        store.write_cell(row, [fake_timing(1), fake_timing(32)] if with_timings else [])
    store.close()
    return path


def test_every_figure_is_written_with_the_expected_series(tmp_path: Path) -> None:
    store = small_store(tmp_path / "s.sqlite")
    paths = plots.plot_all(store, tmp_path / "figs")
    names = {p.name for p in paths}
    for figure in ("frontier", "tokens", "throughput", "realisation"):
        for suffix in ("pdf", "svg", "png"):
            assert f"{figure}_m__d.{suffix}" in names
    assert all(p.stat().st_size > 1000 for p in paths)
    assert (tmp_path / "figs" / "frontier_m__d.pdf").read_bytes()[:4] == b"%PDF"

    db = Store(store)
    cells, timings = db.cells(), db.timings()
    fig = plots.frontier(cells)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(legend) == ["baseline", "ltmp", "tome"]
    # Pareto points are re-drawn filled. Front: baseline (2.0, 92), ltmp (1.4, 91.5), (1.1, 90), (0.9, 85),
    # tome (1.0, 89); tome (1.5, 91) is beaten by ltmp (1.4, 91.5).
    front = {line.get_gid(): len(line.get_xdata()) for line in ax.get_lines() if (line.get_gid() or "").startswith("pareto")}
    assert front == {"pareto:tome": 1, "pareto:ltmp": 3}
    realisation = plots.realisation(cells, timings)
    assert len(realisation.axes) == 2  # batch 1 and batch 32
    tokens = plots.tokens_per_layer(cells)
    assert len(tokens.axes[0].get_lines()) == 3  # one per method
    assert tokens.axes[0].get_title().endswith("shaded: range over images")  # small_store has spreads
    assert "baseline (bf16)" in [t.get_text() for t in realisation.axes[0].get_legend().get_texts()]
    through = plots.throughput(cells, timings)
    assert len(through.axes) == 1 and len(through.axes[0].get_lines()) == 3
    knob_labels = [text for text in through.axes[0].texts if text.get_text()]  # the reduced cells' swept knobs
    assert sorted(text.get_text() for text in knob_labels) == ["0.7", "0.7", "0.7", "8", "8"]
    boxes = [text.get_window_extent(through.canvas.get_renderer()) for text in knob_labels]
    assert all(sum(box.overlaps(other) for other in boxes) == 1 for box in boxes)  # only itself


def test_knob_labels_of_nearby_points_do_not_overlap(tmp_path: Path) -> None:
    """Two methods at almost the same (GMACs, top-1) with the same knob text: the labels would sit on each other."""
    store = Store(tmp_path / "s.sqlite")
    for key, method, top1, gmacs in [("b", "none", 0.92, 2.0), ("l", "ltmp", 0.900, 1.00), ("p", "ltp", 0.9005, 1.002)]:
        store.write_cell(fake_row(key, method, top1, gmacs), [])
    store.close()
    fig = plots.frontier(Store(tmp_path / "s.sqlite").cells())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [text for text in fig.axes[0].texts if text.get_text()]
    assert len(labels) == 2 and labels[0].get_text() == labels[1].get_text()
    first, second = (text.get_window_extent(renderer) for text in labels)
    assert first.width > 1 and second.width > 1  # drawn labels, not matplotlib's placeholder unit box
    assert not first.overlaps(second)
    assert {text.xy for text in labels} == {(1.0, 90.0), (1.002, 90.05)}  # the labelled points stay where they are


#: The embedded default's cells (reports/results.csv, rounded): label, method, swept knob, GMACs, top-1
EMBEDDED_CELLS = [("none", "none", {}, 0.188, 0.9032), ("ltmp", "ltmp", {"r_target": 0.8}, 0.148, 0.9030),
                  ("ltmp", "ltmp", {"r_target": 0.65}, 0.127, 0.9014), ("ltmp", "ltmp", {"r_target": 0.5}, 0.101, 0.8977),
                  ("ltp", "ltp", {"r_target": 0.65}, 0.129, 0.9022), ("tome", "tome", {"r": 16}, 0.140, 0.9029),
                  ("tome", "tome", {"r": 24}, 0.117, 0.9002), ("tome", "tome", {"r": 32}, 0.097, 0.8954),
                  ("pm", "pm", {"keep_rate": 0.6}, 0.136, 0.8994), ("pm", "pm", {"keep_rate": 0.4}, 0.091, 0.8950),
                  ("pm-ft", "pm", {"keep_rate": 0.6}, 0.136, 0.8909), ("topk", "topk", {"keep_rate": 0.7}, 0.112, 0.8947),
                  ("topk", "topk", {"keep_rate": 0.5}, 0.084, 0.8863)]


def test_knob_labels_cover_no_marker_and_no_other_label(tmp_path: Path) -> None:
    """The embedded default's frontier, crowded between 0.12 and 0.15 GMACs: labels placed only apart from each
    other covered other methods' markers (LTP's 0.65 sat on PM's triangle). Every label now clears every marker
    (boxes of the markers' drawn size, computed here from the cells) and every other label, inside the axes."""
    store = Store(tmp_path / "s.sqlite")
    for index, (label, method, knobs, gmacs, top1) in enumerate(EMBEDDED_CELLS):
        row = fake_row(f"c{index}", method, top1, gmacs)
        row.update(label=label, knobs=knobs, top1_low=top1 - 0.006, top1_high=top1 + 0.006)
        store.write_cell(row, [])
    store.close()
    fig = plots.frontier(Store(tmp_path / "s.sqlite").cells())
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    points_to_pixels = fig.dpi / 72
    markers = []
    for label, _, _, gmacs, top1 in EMBEDDED_CELLS:
        x, y = ax.transData.transform((gmacs, 100 * top1))
        half = (10 if label == "none" else 5) / 2 * points_to_pixels
        markers.append(matplotlib.transforms.Bbox([[x - half, y - half], [x + half, y + half]]))
    labels = [text for text in ax.texts if text.get_text()]
    assert len(labels) == len(EMBEDDED_CELLS) - 1  # every reduced cell, the baseline unlabelled
    boxes = [text.get_window_extent(renderer) for text in labels]
    frame = ax.get_window_extent(renderer)
    for text, box in zip(labels, boxes):
        assert box.width > 1, text.get_text()
        assert not any(box.overlaps(marker) for marker in markers), (text.get_text(), text.xy)
        assert sum(box.overlaps(other) for other in boxes) == 1, (text.get_text(), text.xy)  # itself only
        assert frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1), text.get_text()


def test_cells_at_the_same_point_share_one_label(tmp_path: Path) -> None:
    """Thresholds that never move (random weights, a target the fit cannot reach) put several knob values on one
    point; one label per point names them all instead of a column of labels pushed off the axes."""
    store = Store(tmp_path / "s.sqlite")
    store.write_cell(fake_row("b", "none", 0.92, 2.0), [])
    for key, target, gmacs in [("a", 0.9, 1.5), ("c", 0.7, 1.5), ("d", 0.5, 1.2)]:
        row = fake_row(key, "ltmp", 0.9, gmacs)
        row["knobs"] = {"r_target": target}
        store.write_cell(row, [])
    store.close()
    fig = plots.frontier(Store(tmp_path / "s.sqlite").cells())
    labels = {text.get_text(): text.xy for text in fig.axes[0].texts if text.get_text()}
    assert labels == {"0.9/0.7": (1.5, 90.0), "0.5": (1.2, 90.0)}


def test_empty_store_and_missing_throughput_give_one_line_messages(tmp_path: Path) -> None:
    Store(tmp_path / "empty.sqlite").close()
    with pytest.raises(BenchError, match="no results"):
        plots.plot_all(tmp_path / "empty.sqlite", tmp_path / "f")
    messages = []
    paths = plots.plot_all(small_store(tmp_path / "nt.sqlite", with_timings=False), tmp_path / "g", echo=messages.append)
    assert len(messages) == 1 and "no latency measurements" in messages[0]
    assert {p.stem.split("_")[0] for p in paths} == {"frontier", "tokens"}


def test_one_colour_per_method_everywhere() -> None:
    labels = ["none", "tome", "mine", "yours"]
    assert plots.style_of("tome", labels) == plots.METHOD_STYLE["tome"]
    assert plots.style_of("mine", labels) != plots.style_of("yours", labels)
    assert plots.style_of("mine", labels) == plots.style_of("mine", list(reversed(labels)))
    # your plug-ins' and variant series' colours are never a shipped method's (the second and third took pm-ft's grey
    # and ToMe's orange) and differ from each other
    shipped = {colour for colour, _ in plots.METHOD_STYLE.values()}
    yours = [f"mine{i}" for i in range(len(plots.EXTRA_COLOURS))]
    colours = [plots.style_of(label, labels + yours)[0] for label in yours]
    assert not shipped & set(colours) and len(set(colours)) == len(yours)


def test_figures_plot_the_quantities_their_axes_name(tmp_path: Path) -> None:
    """A baseline and three reduced cells, timed at batches 1 and 32 with distinct values: the realisation figure
    plots each cell's speedup (y) against its GMACs ratio (x); the throughput figure plots images/s of the largest
    batch of each precision (fp32 was timed at batch 1 only), sorted; the frontier's lines run in GMACs order; the
    tokens figure takes each method's cell closest to the median GMACs of the reduced cells (1.2: ToMe's
    1.0, not its first cell 1.5; LTMP's 1.2)."""
    store = Store(tmp_path / "s.sqlite")
    for key, method, gmacs, speedups, rates in (("b", "none", 2.0, (1.0, 1.0), (90.0, 900.0)),
                                                ("t1", "tome", 1.5, (1.1, 1.3), (99.0, 1170.0)),
                                                ("t2", "tome", 1.0, (1.2, 1.8), (108.0, 1620.0)),
                                                ("l1", "ltmp", 1.2, (0.9, 1.5), (81.0, 1350.0))):
        timings = [{**fake_timing(batch), "speedup": speedup, "images_per_s": rate}
                   for batch, speedup, rate in zip((1, 32), speedups, rates)]
        timings.append({**fake_timing(1), "precision": "fp32", "images_per_s": 9000.0 / rates[0]})  # batch 1 only
        store.write_cell(fake_row(key, method, 0.9, gmacs), timings)
    store.close()
    db = Store(tmp_path / "s.sqlite")
    cells, timings = db.cells(), db.timings()

    def series(ax) -> dict[str, tuple[list[float], list[float]]]:
        return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
                if not line.get_label().startswith(("_", "y = x"))}

    batch1, batch32 = plots.realisation(cells, timings).axes
    assert series(batch32)["tome (bf16)"] == ([1.0 / 0.75, 2.0], [1.3, 1.8])  # GMACs ratios 2 / 1.5 and 2 / 1.0
    assert series(batch1)["ltmp (bf16)"] == ([2.0 / 1.2], [0.9])
    through, fp32 = plots.throughput(cells, timings).axes
    assert series(through)["tome"] == ([1170.0, 1620.0], [90.0, 90.0])  # batch 32's images/s, sorted
    assert series(fp32)["tome"] == ([9000 / 108, 9000 / 99], [90.0, 90.0])  # fp32's largest batch, 1; stored 99 first
    assert fp32.get_xlabel() == "images/s (cpu, fp32, batch 1)"
    frontier = {bars.get_label(): list(bars.lines[0].get_xdata()) for bars in plots.frontier(cells).axes[0].containers}
    assert frontier["tome"] == [1.0, 1.5]  # stored 1.5 first: the line runs in GMACs order
    tokens = plots.tokens_per_layer(cells).axes[0]
    assert [t.get_text() for t in tokens.get_legend().get_texts()] == ["ltmp (1.200 G)", "baseline", "tome (1.000 G)"]
    assert all(list(line.get_ydata()) == [197, 189] for line in tokens.get_lines())  # tokens entering attention


def test_realisation_error_bars_span_the_per_round_quartiles(tmp_path: Path) -> None:
    """speedup 1.5 with per-round quartiles 1.4 and 1.7 -> a bar from 1.4 to 1.7 at the cell's GMACs ratio (2.0);
    a first quartile above the speedup (the ratio of medians) gives no bar below it; a store without quartiles
    draws no bars. The y = x line reaches past the largest speedup where it exceeds the GMACs ratios."""
    store = Store(tmp_path / "s.sqlite")
    store.write_cell(fake_row("l1", "ltmp", 0.9, 1.0), [{**fake_timing(32), "speedup_q1": 1.4, "speedup_q3": 1.7}])
    store.close()
    db = Store(tmp_path / "s.sqlite")
    ax = plots.realisation(db.cells(), db.timings()).axes[0]
    assert len(ax.containers) == 1
    (segment,) = ax.containers[0].lines[2][0].get_segments()
    assert segment.tolist() == [[2.0, 1.4], [2.0, 1.7]]
    fast = Store(tmp_path / "fast.sqlite")  # 3x faster at a GMACs ratio of 2: the y = x line reaches past both
    fast.write_cell(fake_row("l2", "ltmp", 0.9, 1.0), [{**fake_timing(32), "speedup": 3.0}])
    (diagonal,) = [line for line in plots.realisation(fast.cells(), fast.timings()).axes[0].get_lines()
                   if line.get_label() == "y = x"]
    assert list(diagonal.get_xdata()) == pytest.approx([0.9, 3.0 * 1.05])
    fast.close()
    above = pd.DataFrame({"speedup": [1.5], "speedup_q1": [1.55], "speedup_q3": [1.7]})  # per-round q1 above it
    assert plots.speedup_spread(above) == pytest.approx(np.array([[0.0], [0.2]]))
    bare = small_store(tmp_path / "bare.sqlite")
    db = Store(bare)
    assert all(len(ax.containers) == 0 for ax in plots.realisation(db.cells(), db.timings()).axes)


def settings_store(path: Path) -> Path:
    """One model evaluated on 1,000 images: the main setting, pretrained weights, weights of a checkpoint file, bf16
    evaluation; a 100-image smoke run; three ImageFolders, two of them called ``val``. Each with a baseline and one
    ToMe cell; the main setting also has a second ToMe cell (more cells win a tie in images)."""
    store = Store(path)
    variants = {"full": {}, "pre": {"checkpoint_sha": "pretrained"}, "file": {"checkpoint_sha": "1a2b3c4d5e6f7a8b"},
                "bf16": {"eval_precision": "bf16"},
                "quick": {"eval_images": 100}, "in": {"dataset": "imagefolder:/a/test"},
                "va": {"dataset": "imagefolder:/b/val"}, "vb": {"dataset": "imagefolder:/c/val"}}
    for name, fields in variants.items():
        for method, top1, gmacs in (("none", 0.9, 2.0), ("tome", 0.8, 1.0)):
            store.write_cell({**fake_row(f"{name}-{method}", method, top1, gmacs), "eval_images": 1000, **fields},
                             [fake_timing()])
    store.write_cell({**fake_row("full-tome2", "tome", 0.7, 0.5), "eval_images": 1000}, [fake_timing()])
    store.close()
    return path


def test_cells_of_different_settings_never_share_a_figure_or_a_table(tmp_path: Path) -> None:
    db = Store(settings_store(tmp_path / "s.sqlite"))
    cells, timings = db.cells(), db.timings()
    named = {setting.stem: sorted(group["cell_key"]) for setting, group in settings.split_by_setting(cells)}
    assert list(named) == sorted(named)  # by name: a family's main setting (the plain stem) first
    val_stems = sorted(stem for stem in named if stem.startswith("m__imagefolder__val__"))
    assert len(val_stems) == 2  # both folders are called val: a short hash tells them apart
    # in each family (model, dataset kind) the setting with the most images (then cells) keeps the plain name; the
    # others add how they differ from it
    assert named == {"m__d": ["full-none", "full-tome", "full-tome2"], "m__d__pretrained": ["pre-none", "pre-tome"],
                     "m__d__w1a2b3c4d": ["file-none", "file-tome"],
                     "m__d__bf16": ["bf16-none", "bf16-tome"], "m__d__100img": ["quick-none", "quick-tome"],
                     "m__imagefolder": ["in-none", "in-tome"], val_stems[0]: named[val_stems[0]],
                     val_stems[1]: named[val_stems[1]]}
    assert sorted(named[val_stems[0]] + named[val_stems[1]]) == ["va-none", "va-tome", "vb-none", "vb-tome"]
    paths = plots.plot_cells(cells, timings, tmp_path / "figs")
    assert {p.name for p in paths if p.suffix == ".png" and p.name.startswith("frontier")} == {
        f"frontier_{stem}.png" for stem in named}
    markdown = tables.export(cells, timings, tmp_path / "out")[1].read_text()
    assert markdown.count("### ") == 8 and markdown.count("| none ") == 8
    assert "### m on d\n" in markdown and "### m on d (1,000 images)" not in markdown
    assert "### m on d (100 images)\n" in markdown and "### m on d (bf16 evaluation)\n" in markdown
    assert "### m on d (weights 1a2b3c4d)\n" in markdown
    assert "### m on imagefolder:/a/test\n" in markdown and "### m on imagefolder:/b/val [" in markdown


def test_runs_of_two_seeds_are_two_settings_each_paired_with_its_own_baseline(tmp_path: Path) -> None:
    """``--seed`` draws a ``--limit`` subset and orders a fit's images: two seeds' cells of one size are compared
    only within their seed. Seed 1's subset holds other images, so its ToMe cell is paired with seed 1's baseline:
    hits (1, 1, 0, 0) against (1, 1, 1, 1) drop 2 of 4 images, where seed 0's baseline (0, 0, 1, 1) would read a
    drop of 0."""
    path = tmp_path / "s.sqlite"
    store = Store(path)
    for key, method, seed, hits in (("b0", "none", 0, [0, 0, 1, 1]), ("t0", "tome", 0, [0, 0, 1, 1]),
                                    ("b1", "none", 1, [1, 1, 1, 1]), ("t1", "tome", 1, [1, 1, 0, 0])):
        hits = torch.tensor(hits, dtype=torch.bool)
        store.write_cell({**fake_row(key, method, float(hits.float().mean()), 2.0 if method == "none" else 1.0),
                          "eval_images": 4, "seed": seed, "top1_hits": pack_hits(hits)}, [fake_timing()])
    store.close()
    cells, timings = Store(path).cells(), Store(path).timings()
    named = {setting.stem: (setting.title, sorted(group["cell_key"])) for setting, group in settings.split_by_setting(cells)}
    assert named == {"m__d": ("m on d", ["b0", "t0"]), "m__d__seed1": ("m on d (seed 1)", ["b1", "t1"])}
    drops = tables.paired_to_baseline(cells)["top1_drop"]
    assert drops["t1"] == pytest.approx(50.0) and drops["t0"] == pytest.approx(0.0)
    markdown = tables.export(cells, timings, tmp_path / "out")[1].read_text()
    assert "### m on d\n" in markdown and "### m on d (seed 1)\n" in markdown
    assert markdown.count("| none ") == 3 and "### m on d: across seeds\n" in markdown  # two sections, one spread


def test_a_setting_run_under_three_seeds_gets_its_spread_over_them(tmp_path: Path) -> None:
    """Seeds 0, 1 and 2 on the same 4 images: the baseline's hits (1, 1, 1, 0) each time, LTMP's fit giving
    (1, 1, 1, 0), (1, 1, 0, 0) and (1, 1, 1, 1): top-1 75 / 50 / 100 %, mean 75, sample sd 25; paired drops 0 / 25 /
    -25 points, mean 0, sd 25; GMACs 1.0 / 1.2 / 1.4, mean 1.2, sd 0.2. ToMe, run under seed 0 only, and a bf16
    setting under one seed get no spread. LTMP's seed 2 is stored first: the seeds are listed in order."""
    path = tmp_path / "s.sqlite"
    store = Store(path)
    rows = [("b0", "none", 0, [1, 1, 1, 0], 2.0), ("b1", "none", 1, [1, 1, 1, 0], 2.0), ("b2", "none", 2, [1, 1, 1, 0], 2.0),
            ("l2", "ltmp", 2, [1, 1, 1, 1], 1.4), ("l0", "ltmp", 0, [1, 1, 1, 0], 1.0), ("l1", "ltmp", 1, [1, 1, 0, 0], 1.2),
            ("t0", "tome", 0, [1, 1, 0, 0], 1.0)]
    for key, method, seed, hits, gmacs in rows:
        hits = torch.tensor(hits, dtype=torch.bool)
        store.write_cell({**fake_row(key, method, float(hits.float().mean()), gmacs), "eval_images": 4, "seed": seed,
                          "top1_hits": pack_hits(hits)}, [fake_timing()])
    store.write_cell({**fake_row("bf", "none", 0.75, 2.0), "eval_images": 4, "eval_precision": "bf16"}, [fake_timing()])
    store.close()
    cells, timings = Store(path).cells(), Store(path).timings()
    paths = tables.export(cells, timings, tmp_path / "out")
    spread = pd.read_csv(tmp_path / "out" / "results_seeds.csv").set_index("method")
    assert tmp_path / "out" / "results_seeds.csv" in paths and sorted(spread.index) == ["ltmp", "none"]
    ltmp = spread.loc["ltmp"]
    assert ltmp["seeds"] == "0, 1, 2" and ltmp["setting"] == "m on d"
    assert (ltmp["top1_mean"], ltmp["top1_sd"], ltmp["top1_min"], ltmp["top1_max"]) == pytest.approx((75, 25, 50, 100))
    assert (ltmp["drop_mean"], ltmp["drop_sd"], ltmp["gmacs_mean"], ltmp["gmacs_sd"]) == pytest.approx((0, 25, 1.2, 0.2))
    assert spread.loc["none", "top1_sd"] == 0 and pd.isna(spread.loc["none", "drop_mean"])
    markdown = paths[1].read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| ltmp ") and "0, 1, 2" in line)
    assert markdown.count(": across seeds") == 1 and [cell.strip() for cell in row.split("|")[4:8]] == [
        "75.00 ± 25.00 [50.00-100.00]", "0.00 ± 25.00", "1.2000 ± 0.2000", "0.600 ± 0.100"]
    assert list(pd.read_csv(paths[0])["seed"]) == [0, 0, 0, 0, 1, 1, 2, 2]  # results.csv: setting by setting
    tables.export(cells[cells["seed"] == 0], timings, tmp_path / "out")  # one seed: no spread, and no stale file
    assert not (tmp_path / "out" / "results_seeds.csv").exists()
    figures = {path.name for path in plots.plot_cells(cells, timings, tmp_path / "figs") if path.suffix == ".png"}
    assert "frontier_m__d__seeds.png" in figures and sum(name.endswith("__seeds.png") for name in figures) == 1
    fig = plots.seed_frontier(spread.reset_index(), "m on d")
    drawn = {container.get_label(): container.lines[0] for container in fig.axes[0].containers}  # the data lines
    assert drawn["ltmp"].get_xydata().tolist() == [[pytest.approx(1.2), pytest.approx(75.0)]]
    assert fig.axes[0].get_title() == "m on d: seeds 0, 1, 2 (mean ± sd)"
    assert plots.seed_frontier(spread.reset_index().assign(seeds="2, 10"), "m").axes[0].get_title() == \
        "m: seeds 2, 10 (mean ± sd)"  # in numeric order
    whole = pd.concat([cells, cells.assign(eval_images=1000, cell_key=cells["cell_key"] + "-full")])
    named = {path.name for path in plots.plot_cells(cells, timings, tmp_path / "named", naming=whole)}
    assert "frontier_m__d__4img__seeds.png" in named  # named as in the whole store, beside a 1,000-image evaluation


def test_a_runs_files_are_named_as_plot_names_them_in_the_whole_store(tmp_path: Path) -> None:
    """A smoke run next to a full evaluation in the store: its figures carry the tag, also when written alone."""
    db = Store(settings_store(tmp_path / "s.sqlite"))
    cells = db.cells()
    quick = cells[cells["eval_images"] == 100]
    ((alone, _),) = settings.split_by_setting(quick)
    ((in_store, _),) = settings.split_by_setting(quick, naming=cells)
    assert (alone.stem, in_store.stem) == ("m__d", "m__d__100img")


def test_a_top1_of_zero_with_a_low_end_a_hair_above_it_plots(tmp_path: Path) -> None:
    """Random-weight runs score 0 %; stores from before the Wilson ends were pinned hold top1_low = 2.8e-17 there,
    which matplotlib refused as a negative error bar (the run crashed after measuring every cell)."""
    store = Store(tmp_path / "s.sqlite")
    for key, method in (("b", "none"), ("t", "tome")):
        store.write_cell({**fake_row(key, method, 0.0, 2.0 if method == "none" else 1.0),
                          "top1_low": 2.7755575615628914e-17, "top1_high": 0.24}, [fake_timing()])
    store.close()
    paths = plots.plot_all(tmp_path / "s.sqlite", tmp_path / "figs")
    assert {p.name for p in paths if p.suffix == ".png"} >= {"frontier_m__d.png", "realisation_m__d.png"}


def test_token_map_paints_each_group_in_its_mean_colour() -> None:
    """A 2x2 grid of 2x2-pixel patches: patches 0 and 1 merged, 2 alone, 3 pruned; RGB keeps the colours. A grey
    2x3 grid keeps its rows and columns apart; grey model input is drawn scaled to its batch's range."""
    from bench.tokenviz import display_images, paint

    image = np.zeros((4, 4, 3))
    image[:2, :2] = (1.0, 0.0, 0.0)  # patch 0 red
    image[:2, 2:] = (0.0, 0.0, 1.0)  # patch 1 blue
    image[2:, :2] = (0.0, 0.5, 0.0)  # patch 2 dark green
    groups = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])  # (groups, patches): membership
    painted = paint(image, groups, (2, 2))
    assert painted.shape == (4, 4, 3)
    assert np.allclose(painted[0, 0], (0.5, 0.0, 0.5)) and np.allclose(painted[1, 3], (0.5, 0.0, 0.5))  # merged
    assert np.allclose(painted[3, 1], (0.0, 0.5, 0.0)) and np.allclose(painted[3, 3], (0.85, 0.85, 0.85))  # pruned
    grey = paint(image[..., 0], groups, (2, 2))  # grey: kept tokens tinted blue (b = 0.8 v + 0.2)
    assert np.allclose(grey[0, 0], (0.5, 0.5, 0.6)) and np.allclose(grey[3, 3], (0.85, 0.85, 0.85))

    wide = np.repeat(np.repeat(np.arange(6.0).reshape(2, 3) / 5, 2, 0), 2, 1)  # 2x3 patches of 2x2 pixels
    painted = paint(wide, torch.tensor([[1.0, 0, 0, 0, 0, 1]]), (2, 3))  # patches 0 and 5 merged, the rest pruned
    assert painted.shape == (4, 6, 3) and np.allclose(painted[0, 0], (0.5, 0.5, 0.6))  # (0 + 1) / 2, tinted blue
    assert np.allclose(painted[3, 5], (0.5, 0.5, 0.6)) and np.allclose(painted[0, 2], 0.85)

    model = make_tiny()
    assert np.allclose(display_images(torch.tensor([-1.0, 0.0, 3.0]).view(1, 1, 1, 3), model), [[[0.0, 0.25, 1.0]]])
    pixels = torch.rand(2, 3, 32, 32)
    shown = display_images((pixels - 0.5) / 0.5, model)  # the tiny model's mean and std are 0.5
    assert shown.shape == (2, 32, 32, 3) and np.allclose(shown, pixels.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_group_borders_derived_by_hand() -> None:
    """A 2x3 grid of 2x2-pixel patches labelled [[0, 0, 1], [pruned, pruned, 1]]: two vertical borders right of column 1
    (x = 3.5), two horizontal ones under row 0 in columns 0 and 1 (y = 1.5), none between the two pruned patches or
    inside a group; one group covering everything has no border."""
    from bench.tokenviz import group_borders

    groups = torch.tensor([[1.0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1]])
    segments = group_borders(groups, (2, 3), (2, 2))
    assert segments.shape == (4, 2, 2)
    assert sorted(map(str, segments.tolist())) == sorted(map(str, [
        [[3.5, -0.5], [3.5, 1.5]], [[3.5, 1.5], [3.5, 3.5]], [[-0.5, 1.5], [1.5, 1.5]], [[1.5, 1.5], [3.5, 1.5]]]))
    assert group_borders(torch.ones(1, 6), (2, 3), (2, 2)).shape == (0, 2, 2)


def test_captured_groups_hold_each_kept_patch_once_and_pruned_ones_nowhere() -> None:
    """The token maps' groups on the tiny model (64 patches + CLS, 2 blocks), per image, one row per token alive after
    the block (CLS's row holds no patch): ToMe r=4 keeps 60 then 56 patch tokens whose groups hold each patch once
    (with 2 register tokens as well, 60 patch tokens and 3 prefix rows); LTP with theta_prune 1/65 in block 1 prunes
    a different number per image of a padded batch, each image's rows being the tokens it keeps alone at batch 1, its
    pruned patches in no group."""
    import copy

    import methods
    from bench import tokenviz

    torch.manual_seed(0)
    model, images = make_tiny().eval(), torch.randn(3, 3, 32, 32)
    tome = methods.create("tome", r=4)
    groups = tokenviz.capture_groups(tome.apply(copy.deepcopy(model)), tome, images, [0, 1])
    for layer, tokens in ((0, 61), (1, 57)):
        assert all(g.shape == (tokens, 64) and torch.equal(g.sum(0), torch.ones(64)) for g in groups[layer]), layer
    assert not tome.trace_source
    registers = make_tiny(reg_tokens=2).eval()  # 3 prefix tokens: their columns are no patches
    groups = tokenviz.capture_groups(tome.apply(registers), tome, images, [0])
    assert all(g.shape == (63, 64) and torch.equal(g.sum(0), torch.ones(64)) for g in groups[0])
    ltp = methods.create("ltp")
    patched = ltp.apply(copy.deepcopy(model))
    ltp.load_learned_state({"theta_merge": torch.ones(2), "theta_prune": torch.tensor([0.0, 1 / 65])})
    groups = tokenviz.capture_groups(patched, ltp, images, [1])[1]
    alone = []
    for image in images:
        hook = patched.blocks[1].register_forward_hook(lambda module, inputs, output: alone.append(output.shape[1]))
        with torch.inference_mode():
            patched(image[None])
        hook.remove()
    assert [len(g) for g in groups] == alone and len(set(alone)) > 1
    for g in groups:
        assert g.sum(0).max() == 1 and int(g.sum()) == len(g) - 1 < 64  # one patch per kept patch token


def test_token_maps_of_few_methods_keep_their_panels_together(tmp_path: Path, monkeypatch) -> None:
    """One method beside the input: the two columns sit side by side, not spread over a two-column-wide page."""
    import json

    import pandas as pd

    from bench import tokenviz

    figures = []
    monkeypatch.setattr(tokenviz, "_save", lambda fig, out_dir, name: figures.append(fig) or [])
    model = make_tiny().eval()
    cells = pd.DataFrame([{"label": "none", "method": "none", "knobs": "{}", "cell_key": "b", "gmacs": 1.0},
                          {"label": "tome", "method": "tome", "knobs": json.dumps({"r": 2}), "cell_key": "t", "gmacs": 0.8}])
    images = torch.rand(2, 3, 32, 32)
    tokenviz.token_maps(model, cells, {}, images, tokenviz.display_images(images, model), tmp_path, "one")
    (fig,) = figures
    fig.canvas.draw()
    inputs, maps = (ax.get_position(original=False) for ax in fig.axes[:2])  # row 0: input, tome
    panel, gap = inputs.width * fig.get_figwidth(), (maps.x0 - inputs.x1) * fig.get_figwidth()
    assert 0 < gap < 0.5 * panel, (gap, panel)


def test_a_runs_token_maps_draw_its_own_reduced_cells_with_their_stored_thresholds(tmp_path: Path, monkeypatch) -> None:
    """A run's token maps: nothing for a run of the baseline alone, even beside another model's cells in the store;
    with ToMe r=2 and LTP (thresholds from the store: theta_prune 0, then 1) on the 2-block tiny model, rows for
    blocks 1 and 2 of the first 3 images, and after those blocks ToMe keeps 63 then 61 tokens (65 - 2 per block), LTP
    all 65 (every importance is above 0) then CLS alone (every importance is below 1)."""
    from types import SimpleNamespace

    from bench import tokenviz
    from bench.store import pack_state

    figures = []
    monkeypatch.setattr(tokenviz, "_save", lambda fig, out_dir, name: figures.append((fig, name)) or [name])
    torch.manual_seed(0)
    work = SimpleNamespace(config={"model": "m"}, dataset="d", model=make_tiny().eval(), device="cpu",
                           eval_batches=lambda: iter([(torch.randn(4, 3, 32, 32), torch.zeros(4))]))
    store = Store(tmp_path / "s.sqlite")
    store.write_cell({**fake_row("base", "none", 0.9, 2.0), "learned_state": None}, [])
    store.write_cell({**fake_row("other", "tome", 0.8, 1.0), "model": "another", "learned_state": None}, [])
    assert tokenviz.token_maps_from_run(work, store.cells(), store, tmp_path) == []
    thresholds = {"theta_merge": torch.ones(2), "theta_prune": torch.tensor([0.0, 1.0])}
    store.write_cell({**fake_row("tome", "tome", 0.8, 1.5), "knobs": {"r": 2}, "learned_state": None}, [])
    store.write_cell({**fake_row("ltp", "ltp", 0.8, 1.4), "knobs": {}, "learned_state": pack_state(thresholds)}, [])
    assert tokenviz.token_maps_from_run(work, store.cells(), store, tmp_path) == ["token_maps_m__d"]
    ((fig, _),) = figures
    axes = np.array(fig.axes).reshape(6, 3)  # 3 images x 2 blocks; input, ltp, tome
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["block 1", "block 2"] * 3
    assert [ax.get_title().split("\n")[0] for ax in axes[0]] == ["input", "ltp", "tome"]
    counts = [[ax.texts[0].get_text() for ax in row[1:]] for row in axes]
    assert counts == [["65 tok", "63 tok"], ["1 tok", "61 tok"]] * 3
    borders = [[len(ax.collections[0].get_segments()) for ax in row[1:]] for row in axes]  # each map outlined
    assert [ltp for ltp, _ in borders[:2]] == [2 * 8 * 7, 0] and all(tome > 0 for _, tome in borders)  # 64 groups, none


def test_knob_labels_always_name_the_swept_knob_even_at_its_default() -> None:
    """Tables show the swept knob at any value (Top-K at its default keep_rate 0.7 once read "-") and other knobs
    where they differ from the defaults; figure labels show the swept knob's value; plug-ins not loaded show all."""
    import json

    import methods
    from bench.plots import knob_text
    from bench.tables import knob_summary

    ltmp = json.dumps({"r_target": 0.7, "tau": 0.5, "lr_merge": 0.05})  # r_target and tau at their defaults
    assert knob_summary("topk", json.dumps({"keep_rate": 0.7, "fuse": True})) == "keep_rate=0.7"
    assert knob_summary("ltmp", ltmp) == "r_target=0.7, lr_merge=0.05"
    assert methods.create("ltmp", r_target=0.7, lr_merge=0.05).describe() == "r_target=0.7, lr_merge=0.05"  # progress
    assert knob_summary("tome", json.dumps({"r": 8, "prop_attn": False})) == "r=8, prop_attn=False"
    assert knob_summary("none", "{}") == "-"
    assert knob_summary("not_loaded", json.dumps({"ratio": 0.3, "depth": 2})) == "ratio=0.3, depth=2"
    assert knob_summary("not_loaded", "{}") == "-"
    assert knob_text("ltmp", ltmp) == "0.7" and knob_text("topk", json.dumps({"keep_rate": 0.5, "fuse": True})) == "0.5"
    assert knob_text("none", "{}") == "" and knob_text("not_loaded", json.dumps({"ratio": 0.3})) == "0.3"


def test_replotting_a_store_writes_byte_identical_figures(tmp_path: Path) -> None:
    """No creation dates and no random SVG ids: a figure regenerated from the same store is the same file, so a
    re-plot leaves a repository's committed figures unchanged."""
    store = small_store(tmp_path / "s.sqlite")
    first = {p.name: p.read_bytes() for p in plots.plot_all(store, tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in plots.plot_all(store, tmp_path / "b")}
    assert {name.rsplit(".", 1)[1] for name in first} == {"pdf", "svg", "png"}
    assert first == second


def test_variants_of_one_label_are_separate_series(tmp_path: Path, monkeypatch) -> None:
    """Cells of one label whose fixed knobs differ (a config changed ``clip_grad`` between runs into one store) are
    two series in the frontier and two columns of the matched-cost table; a cell stored before the knob existed
    counts at its default (0.0). Swept knobs (``r_target``) never split a series."""
    store = Store(tmp_path / "s.sqlite")
    rows = [("b", "none", {}, 0.92, 2.0), ("old", "ltmp", {"r_target": 0.8}, 0.91, 1.6),
            ("u", "ltmp", {"r_target": 0.5, "clip_grad": 0.0}, 0.88, 1.0),
            ("c1", "ltmp", {"r_target": 0.8, "clip_grad": 1.0}, 0.915, 1.6),
            ("c2", "ltmp", {"r_target": 0.5, "clip_grad": 1.0}, 0.89, 1.0)]
    for key, method, knobs, top1, gmacs in rows:
        store.write_cell({**fake_row(key, method, top1, gmacs), "knobs": knobs}, [fake_timing(32)])
    cells, timings = store.cells(), store.timings()
    store.close()
    names = dict(zip(cells["cell_key"], settings.series_labels(cells)))
    assert names == {"b": "none", "old": "ltmp (clip_grad=0.0)", "u": "ltmp (clip_grad=0.0)",
                     "c1": "ltmp (clip_grad=1.0)", "c2": "ltmp (clip_grad=1.0)"}
    drawn = []
    real_frontier = plots.frontier
    monkeypatch.setattr(plots, "frontier", lambda group, **kw: drawn.append(real_frontier(group, **kw)) or drawn[-1])
    plots.plot_cells(cells, timings, tmp_path / "figs")
    legend = sorted(t.get_text() for t in drawn[0].axes[0].get_legend().get_texts())
    assert legend == ["baseline", "ltmp (clip_grad=0.0)", "ltmp (clip_grad=1.0)"]
    tables.export(cells, timings, tmp_path / "out")
    long = pd.read_csv(tmp_path / "out" / "results_matched.csv")
    assert sorted(long["method"].unique()) == ["ltmp (clip_grad=0.0)", "ltmp (clip_grad=1.0)"]
    # one variant alone keeps the plain label
    assert list(settings.series_labels(cells[cells["cell_key"].isin(["b", "c1", "c2"])])) == ["none", "ltmp", "ltmp"]


def test_fits_of_other_budgets_are_separate_series() -> None:
    """A config that changed the fit's budget between runs into one store: the two budgets' LTMP cells are two series,
    named by the fit setting that differs; a cell stored before the fit was kept joins no variant by guess, and
    methods that do not train carry no fit."""
    cells = pd.DataFrame({"label": ["none", "ltmp", "ltmp", "ltmp", "ltmp", "tome"],
                          "method": ["none", "ltmp", "ltmp", "ltmp", "ltmp", "tome"],
                          "knobs": ["{}", '{"r_target": 0.8}', '{"r_target": 0.5}', '{"r_target": 0.8}',
                                    '{"r_target": 0.8}', '{"r": 8}'],
                          "fit": [None, '{"budget_images": 384, "batch_size": 64}',
                                  '{"budget_images": 384, "batch_size": 64}',
                                  '{"budget_images": 1536, "batch_size": 64}', None, None]})
    assert list(settings.series_labels(cells)) == [
        "none", "ltmp (fit.budget_images=384)", "ltmp (fit.budget_images=384)", "ltmp (fit.budget_images=1536)",
        "ltmp", "tome"]
    assert list(settings.series_labels(cells.iloc[[0, 1, 2, 5]])) == ["none", "ltmp", "ltmp", "tome"]


def test_one_label_on_two_methods_is_two_series() -> None:
    """Two configs run into one store, each calling a different method ``x``: the method tells the series apart."""
    cells = pd.DataFrame({"label": ["x", "x", "x", "y"], "method": ["tome", "topk", "tome", "ltp"],
                          "knobs": ['{"r": 8}', '{"keep_rate": 0.5}', '{"r": 16}', '{"r_target": 0.7}']})
    assert list(settings.series_labels(cells)) == ["x (tome)", "x (topk)", "x (tome)", "y"]


def test_token_maps_show_each_variant_of_a_label() -> None:
    """Two unlabelled LTMP entries of one config (clip_grad 0 and 1) get a token-map column each, not one."""
    from bench import tokenviz

    rows = [{**fake_row(key, "ltmp", 0.9, gmacs), "knobs": json.dumps(knobs)}
            for key, gmacs, knobs in [("a", 1.0, {"r_target": 0.7, "clip_grad": 0.0}),
                                      ("b", 1.2, {"r_target": 0.7, "clip_grad": 1.0}),
                                      ("c", 0.7, {"r_target": 0.5, "clip_grad": 1.0})]]
    chosen = tokenviz.pick_cells(pd.DataFrame([*rows, fake_row("base", "none", 0.95, 2.0)]))  # the baseline: no column
    assert sorted(chosen["label"]) == ["ltmp (clip_grad=0.0)", "ltmp (clip_grad=1.0)"]
    assert sorted(chosen["cell_key"]) == ["a", "b"]  # each variant's cell nearest the median GMACs, 1.0


def test_plot_and_export_methods_show_those_labels_and_the_baseline(tmp_path: Path, capsys) -> None:
    """``plot --methods ltmp`` / ``export --methods ltmp``: a paper's figure of some methods; the baseline stays, as
    every drop, ratio and speedup is measured against it; a label the store lacks is a one-line error."""
    from bench import cli

    store = small_store(tmp_path / "s.sqlite")
    args = cli.make_parser().parse_args(["plot", "--store", str(store), "--methods", "ltmp"])
    cells, timings, stored = cli.stored_results(args)
    assert sorted(cells["label"]) == ["ltmp", "ltmp", "ltmp", "none"] and len(stored) == 6
    assert set(timings["cell_key"]) == set(cells["cell_key"])
    assert cli.main(["export", "--store", str(store), "--reports", str(tmp_path / "t"), "--methods", " ltmp "]) == 0
    assert sorted(pd.read_csv(tmp_path / "t" / "results.csv")["method"]) == ["ltmp", "ltmp", "ltmp", "none"]
    assert cli.main(["plot", "--store", str(store), "--reports", str(tmp_path / "f"), "--methods", "ltmp"]) == 0
    assert (tmp_path / "f" / "frontier_m__d.svg").is_file()  # named as a run names the whole store's setting
    db = Store(store)  # a 1,000-image evaluation of ToMe alone: the 100-image one is now the smaller
    db.write_cell({**fake_row("full", "tome", 0.8, 1.0), "eval_images": 1000}, [fake_timing()])
    db.close()
    assert cli.main(["plot", "--store", str(store), "--reports", str(tmp_path / "g"), "--methods", "ltmp"]) == 0
    assert (tmp_path / "g" / "frontier_m__d__100img.svg").is_file()
    capsys.readouterr()
    assert cli.main(["plot", "--store", str(store), "--reports", str(tmp_path / "f"), "--methods", "ltmp,tomme"]) == 2
    assert capsys.readouterr().err == ("error: --methods names ['tomme'], which the store holds no cells of: choose "
                                       "from ['ltmp', 'none', 'tome']\n")


def test_error_bars_and_shading_span_what_they_name(tmp_path: Path) -> None:
    """Hand values: a ToMe cell at 1.0 GMACs with top-1 80 % and a Wilson interval 75-82 % draws its bar from 75 to 82
    (not mirrored); its timings at fp32 and bf16 are dotted and solid lines; in the tokens figure only LTMP, whose
    block-2 count ranges over 120-180 tokens, is shaded, exactly over that range (the baseline's row, stored without
    a range, reads NaN there under pandas 3 and is left unshaded: its `is not None` check let NaN through to
    json.loads); the seeds figure's bars are one sd of GMACs (x: 1.0-1.4) and of top-1 (y: 50-100)."""
    store = Store(tmp_path / "s.sqlite")
    store.write_cell(fake_row("b", "none", 0.9, 2.0), [fake_timing()])
    store.write_cell({**fake_row("t", "tome", 0.8, 1.0), "top1_low": 0.75, "top1_high": 0.82,
                      "tokens_attn_min": [197, 150], "tokens_attn_max": [197, 150]},
                     [fake_timing(), {**fake_timing(), "precision": "fp32"}])
    store.write_cell({**fake_row("l", "ltmp", 0.85, 1.2), "tokens_attn": [197, 150], "tokens_attn_min": [197, 120],
                      "tokens_attn_max": [197, 180]}, [fake_timing()])
    store.close()
    db = Store(tmp_path / "s.sqlite")
    cells, timings = db.cells(), db.timings()
    frontier = plots.frontier(cells).axes[0]
    tome_bar = next(c for c in frontier.containers if c.get_label() == "tome").lines[2][0].get_segments()
    assert np.allclose(tome_bar, [[[1.0, 75.0], [1.0, 82.0]]])
    realisation = plots.realisation(cells, timings).axes[0]
    styles = {line.get_label(): line.get_linestyle() for line in realisation.get_lines()}
    assert (styles["tome (bf16)"], styles["tome (fp32)"]) == ("-", ":")
    tokens = plots.tokens_per_layer(cells).axes[0]
    (shade,) = tokens.collections  # ToMe's range is a single count: no shade
    assert tokens.get_title().endswith("shaded: range over images")
    corners = shade.get_paths()[0].vertices
    assert corners[:, 1].min() == 120 and corners[corners[:, 0] == 1, 1].max() == 180
    spread = pd.DataFrame({"method": ["ltmp"], "gmacs_mean": [1.2], "gmacs_sd": [0.2], "top1_mean": [75.0],
                           "top1_sd": [25.0], "seeds": ["0, 1, 2"]})
    (container,) = plots.seed_frontier(spread, "m on d").axes[0].containers
    bars = sorted(segment.tolist() for bars in container.lines[2] for segment in bars.get_segments())
    assert np.allclose(bars, [[[1.0, 75.0], [1.4, 75.0]], [[1.2, 50.0], [1.2, 100.0]]])


def test_a_label_at_the_axes_edge_moves_inside(tmp_path: Path) -> None:
    """The rightmost point's label, at its preferred spot right of the point, would stick out of the axes (their
    margin is 5 % of the data's range): it is placed on the left instead."""
    store = Store(tmp_path / "s.sqlite")
    for key, top1, gmacs in (("l1", 0.80, 1.0), ("l2", 0.85, 1.5), ("l3", 0.90, 2.0)):
        store.write_cell({**fake_row(key, "ltmp", top1, gmacs), "knobs": {"r_target": gmacs / 2}}, [])
    store.close()
    fig = plots.frontier(Store(tmp_path / "s.sqlite").cells())
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    rightmost = next(text for text in ax.texts if text.xy == (2.0, 90.0))
    box = rightmost.get_window_extent(renderer)
    assert rightmost.get_text() == "1.0" and rightmost.get_horizontalalignment() == "right"
    assert frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
