"""Top-1 at matched cost: hand-derived interpolations on hand-made sweeps, and the export's files."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bench import matched, tables
from bench.store import Store
from tests.test_store import fake_row, fake_timing


def test_read_at_interpolates_inside_the_range_only() -> None:
    assert matched.read_at([1.0, 2.0], [90.0, 88.0], 1.5) == pytest.approx(89.0)
    assert matched.read_at([2.0, 1.0], [88.0, 90.0], 1.25) == pytest.approx(89.5)  # any order
    assert matched.read_at([1.0, 2.0], [90.0, 88.0], 2.0) == pytest.approx(88.0)  # the ends are measured
    assert matched.read_at([1.0, 2.0], [90.0, 88.0], 2.01) is None  # never extrapolated
    assert matched.read_at([1.0, 2.0], [90.0, 88.0], 0.99) is None
    assert matched.read_at([1.0, 1.0, 2.0], [90.0, 89.0, 88.0], 1.0) == pytest.approx(89.5)  # equal costs averaged


def sweep_table() -> pd.DataFrame:
    """Four methods and the baseline, as :func:`bench.tables.comparison` lays them out."""
    rows = [("none", 1.0, 91.0, 0.4),
            ("a", 1.2, 90.0, 0.5), ("a", 1.4, 88.0, 0.9), ("a", 1.6, 89.0, 0.7),  # a's 1.4 is beaten by its 1.6
            ("b", 1.5, 89.5, 0.6), ("b", 2.0, 88.5, 0.6),
            ("d", 1.3, 88.0, 0.8), ("d", 1.7, 89.0, 0.9),  # d's 1.7 beats its 1.3: its only Pareto cell
            ("c", 3.0, 80.0, 1.0)]
    return pd.DataFrame(rows, columns=["method", "gmacs_ratio", "top1", "top1_pm"])


def test_matched_reads_each_methods_pareto_cells_at_levels_two_methods_reach() -> None:
    long = matched.matched(sweep_table(), "gmacs_ratio", levels=(1.25, 1.5, 1.75, 3.0))
    got = {(row.level, row.method): (row.top1, row.top1_pm, row.cells) for row in long.itertuples()}
    # 1.25: only a reaches it (b starts at 1.5, d at 1.3); 1.75: only b (a ends at 1.6, d at 1.7); 3.0: only c.
    assert set(got) == {(1.5, "a"), (1.5, "b"), (1.5, "d")}
    # a at 1.5, between its Pareto cells (1.2, 90.0 ± 0.5) and (1.6, 89.0 ± 0.7), skipping the dominated (1.4, 88.0):
    # 90 - (0.3 / 0.4) * 1 = 89.25, and 0.5 + 0.75 * 0.2 = 0.65
    assert got[(1.5, "a")] == (pytest.approx(89.25), pytest.approx(0.65), "interpolated")
    assert got[(1.5, "b")] == (pytest.approx(89.5), pytest.approx(0.6), "measured")
    # d measured only its dominated 1.3 at or below 1.5: its 1.7 cell (saves more, more accurate) stands in
    assert got[(1.5, "d")] == (pytest.approx(89.0), pytest.approx(0.9), "cheaper")


def test_wide_marks_the_best_measured_and_unreached() -> None:
    long = matched.matched(sweep_table(), "gmacs_ratio", levels=(1.5, 1.6))
    long = long[long["method"] != "d"]
    # 1.6: a measured 89.0; b interpolated between (1.5, 89.5) and (2.0, 88.5): 89.5 - 0.2 = 89.3
    table = matched.wide(long).set_index("cost")
    assert table.loc["×1.50 fewer GMACs", "a"] == "89.25 ± 0.65"
    assert table.loc["×1.50 fewer GMACs", "b"] == "**89.50 ± 0.60 =**"
    assert table.loc["×1.60 fewer GMACs", "a"] == "89.00 ± 0.70 ="
    assert table.loc["×1.60 fewer GMACs", "b"] == "**89.30 ± 0.60**"
    without = matched.wide(long[~((long["level"] == 1.6) & (long["method"] == "a"))]).set_index("cost")
    assert without.loc["×1.60 fewer GMACs", "a"] == "–"


def test_export_writes_the_matched_cost_table_for_gmacs_and_each_speedup(tmp_path: Path) -> None:
    """Two sweeps in a store: GMACs ratios (2 / gmacs) 1.0 for the baseline, tome 1.25 and 2.0, ltmp 1.6 and 2.5;
    at ×2.00 tome is measured (80.0) and ltmp reads 88 - (0.4 / 0.9) * 6 = 85.33 (top-1 85-91 with ± 5)."""
    store = Store(tmp_path / "s.sqlite")
    for key, method, top1, gmacs, speedup in [("n", "none", 0.92, 2.0, 1.0), ("t1", "tome", 0.91, 1.6, 1.2),
                                              ("t2", "tome", 0.80, 1.0, 1.8), ("l1", "ltmp", 0.88, 1.25, 1.4),
                                              ("l2", "ltmp", 0.82, 0.8, 2.2)]:
        store.write_cell(fake_row(key, method, top1, gmacs), [{**fake_timing(32), "speedup": speedup}])
    paths = tables.export(store.cells(), store.timings(), tmp_path / "out")
    store.close()
    long = pd.read_csv(tmp_path / "out" / "results_matched.csv")
    at_two = long[(long["axis"] == "gmacs_ratio") & (long["level"] == 2.0)].set_index("method")
    assert at_two.loc["tome", "top1"] == pytest.approx(80.0) and at_two.loc["tome", "cells"] == "measured"
    assert at_two.loc["ltmp", "top1"] == pytest.approx(88 - 6 * 0.4 / 0.9)
    # measured speedups: tome 1.2-1.8, ltmp 1.4-2.2; at ×1.5 ltmp reads 88 - (0.1 / 0.8) * 6 = 87.25
    at_speed = long[long["axis"] == "speedup cpu bf16 b32"].set_index(["level", "method"])
    assert sorted(at_speed.index) == [(1.5, "ltmp"), (1.5, "tome"), (1.75, "ltmp"), (1.75, "tome")]
    assert at_speed.loc[(1.5, "ltmp"), "top1"] == pytest.approx(87.25)
    markdown, latex = paths[1].read_text(), paths[2].read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| ×2.00 fewer GMACs"))
    assert [cell.strip() for cell in row.strip("|").split("|")] == ["×2.00 fewer GMACs", "**85.33 ± 5.00**",
                                                                     "80.00 ± 5.00 ="]  # ltmp, tome
    costs = [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ×")]
    assert costs == ["×1.75 fewer GMACs", "×2.00 fewer GMACs", "×1.50 speedup cpu bf16 b32",
                     "×1.75 speedup cpu bf16 b32"]  # axes as cost_axes orders them, each by level
    assert "top-1 at matched cost" in markdown and "\\textbf{85.33 $\\pm$ 5.00}" in latex


def test_a_cell_standing_in_is_marked() -> None:
    long = matched.matched(sweep_table(), "gmacs_ratio", levels=(1.5,))
    assert matched.wide(long).set_index("cost").loc["×1.50 fewer GMACs", "d"] == "89.00 ± 0.90 ≥"
    assert "89.00 $\\pm$ 0.90 $\\geq$" in tables.matched_latex(long)


def test_wide_rows_follow_the_axes_then_the_levels() -> None:
    """Rows by axis (in the order the readings list them) and by level within an axis, whichever method comes first."""
    long = pd.DataFrame([("gmacs_ratio", 2.0, "a"), ("gmacs_ratio", 1.5, "b"), ("gmacs_ratio", 2.0, "b"),
                         ("speedup cpu fp32 b32", 1.25, "a"), ("speedup cpu fp32 b32", 1.25, "b")],
                        columns=["axis", "level", "method"]).assign(top1=90.0, top1_pm=0.5, cells="interpolated")
    assert list(matched.wide(long)["cost"]) == ["×1.50 fewer GMACs", "×2.00 fewer GMACs", "×1.25 speedup cpu fp32 b32"]


def hits_table() -> tuple[pd.DataFrame, dict]:
    """a: (saving 1.2, hits 1110 = 75 %) and (1.8, 1000 = 25 %); b: (1.5, 1110 = 75 %), on the same 4 images."""
    import numpy as np

    hits = {"a1": np.array([1, 1, 1, 0], bool), "a2": np.array([1, 0, 0, 0], bool), "b1": np.array([1, 1, 1, 0], bool)}
    rows = [("a1", "a", 1.2, 75.0), ("a2", "a", 1.8, 25.0), ("b1", "b", 1.5, 75.0)]
    return pd.DataFrame(rows, columns=["cell_key", "method", "gmacs_ratio", "top1"]).assign(top1_pm=1.0), hits


def test_paired_gap_of_an_interpolated_reading_by_hand() -> None:
    """At 1.5, a reads 0.5 * 75 + 0.5 * 25 = 50, b (measured) 75 is the best. Per image a's interpolated hits are
    (1, .5, .5, 0) against b's (1, 1, 1, 0): differences (0, -.5, -.5, 0), mean -0.25, mean square 0.125, so the
    standard error is sqrt((0.125 - 0.0625) / 4) = 0.125 and the gap -25.00 ± 1.96 * 12.5 = ± 24.50 points."""
    table, hits = hits_table()
    long = matched.matched(table, "gmacs_ratio", levels=(1.5,), hits=hits).set_index("method")
    assert long.loc["a", "top1"] == pytest.approx(50.0)
    assert (long.loc["a", "gap"], long.loc["a", "gap_pm"]) == (pytest.approx(-25.0), pytest.approx(24.4995, abs=1e-4))
    assert (long.loc["b", "gap"], long.loc["b", "gap_pm"]) == (0.0, 0.0)
    gaps = matched.wide(long.reset_index(), matched.gap_text).set_index("cost")
    assert list(gaps.loc["×1.50 fewer GMACs"]) == ["-25.00 ± 24.50", "best"]
    assert matched.gap_text(pd.Series({"gap": -0.0034, "gap_pm": 0.18}), best=False) == "+0.00 ± 0.18"
    without = matched.matched(table, "gmacs_ratio", levels=(1.5,), hits={"a1": hits["a1"]})  # a2, b1 not stored
    assert without["gap"].isna().all()


def test_paired_gap_of_measured_cells_is_the_paired_difference() -> None:
    import numpy as np

    from bench.accuracy import paired_difference

    rng = np.random.default_rng(0)
    hits = {"x": rng.random(1000) < 0.9, "y": rng.random(1000) < 0.8}
    table = pd.DataFrame({"cell_key": ["x", "y"], "method": ["p", "q"], "gmacs_ratio": [1.5, 1.5],
                          "top1": [100 * hits["x"].mean(), 100 * hits["y"].mean()], "top1_pm": [1.0, 1.0]})
    gap = matched.matched(table, "gmacs_ratio", levels=(1.5,), hits=hits).set_index("method").loc["q"]
    difference, half, _ = paired_difference(hits["y"], hits["x"])
    assert (gap["gap"], gap["gap_pm"]) == (pytest.approx(100 * difference), pytest.approx(100 * half))


def test_export_adds_the_paired_gaps_where_hits_are_stored(tmp_path: Path) -> None:
    import torch

    from bench.accuracy import pack_hits

    store = Store(tmp_path / "s.sqlite")
    generator = torch.Generator().manual_seed(0)
    for key, method, gmacs in [("n", "none", 2.0), ("t", "tome", 1.0), ("l", "ltmp", 1.0)]:
        hits = torch.rand(100, generator=generator) < 0.85
        row = {**fake_row(key, method, float(hits.float().mean()), gmacs), "top1_hits": pack_hits(hits)}
        store.write_cell(row, [fake_timing(32)])
    paths = tables.export(store.cells(), store.timings(), tmp_path / "out")
    store.close()
    long = pd.read_csv(tmp_path / "out" / "results_matched.csv")
    at_two = long[(long["axis"] == "gmacs_ratio") & (long["level"] == 2.0)].set_index("method")
    assert at_two["gap"].notna().all() and (at_two["gap"] <= 0).all() and (at_two["gap"] == 0).sum() == 1
    assert matched.GAP_NOTE in paths[1].read_text() and "% paired gaps" in paths[2].read_text()
