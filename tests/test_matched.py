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
