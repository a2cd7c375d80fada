"""The papers' numbers beside a run of the same model (bench/published.py): which settings get them, how they are
read off the run's cells, and where they appear (tables and frontier)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import methods
from bench import plots, published, tables
from bench.store import Store
from tests.test_store import fake_row, fake_timing


def test_shipped_numbers_load_and_name_registered_methods() -> None:
    """A typo in a method name would silently never be shown: every row must name a registered plug-in."""
    points = published.load()
    assert set(points["method"]) <= set(methods.REGISTRY)
    base = points[(points["model"] == "deit_small_patch16_224") & (points["method"] == "none")].iloc[0]
    assert (base["top1"], base["gmacs"]) == (79.8, 4.6)
    assert (points["gmacs"] > 0).all() and points["top1"].between(0, 100).all()


def test_read_here_on_the_pareto_cells_by_hand() -> None:
    """Cells (GMACs, top-1): (4.0, 80), (3.5, 78) dominated by (3.0, 79), (2.0, 77). At 2.5: 77 + 0.5 * 2 = 78.0
    with half-width 0.45; at 3.5 the dominated cell is skipped: 79.5; at 3.04 the 3.0 cell counts as measured;
    at 1.5 there is no reading."""
    gmacs, top1, half = np.array([4.0, 3.5, 3.0, 2.0]), np.array([80.0, 78.0, 79.0, 77.0]), np.array([0.3, 0.9, 0.4, 0.5])
    assert published.read_here(gmacs, top1, half, 2.5) == pytest.approx((78.0, 0.45, "interpolated"))
    assert published.read_here(gmacs, top1, half, 3.5)[0] == pytest.approx(79.5)
    assert published.read_here(gmacs, top1, half, 3.04) == (79.0, 0.4, "measured")
    assert published.read_here(gmacs, top1, half, 1.5) is None


def deit_cells(dataset: str = "imagefolder:/data/imagenet/val", sha: str = "abc") -> pd.DataFrame:
    rows = [fake_row(key, method, top1, gmacs) for key, method, top1, gmacs in
            [("n", "none", 0.799, 4.599), ("t8", "tome", 0.796, 3.42), ("t16", "tome", 0.788, 2.28)]]
    cells = pd.DataFrame(rows).assign(model="deit_small_patch16_224", dataset=dataset, checkpoint_sha=sha)
    return cells.assign(gmacs_dense=4.599, gmacs_ratio=4.599 / cells["gmacs"])


def test_only_imagefolder_settings_with_real_weights_of_a_listed_model_get_them() -> None:
    points = published.points_for(deit_cells())
    assert sorted(points["method"].unique()) == ["none", "tome"]  # ltmp and pm were not measured
    assert published.points_for(deit_cells(dataset="fashion-mnist-test")).empty
    assert published.points_for(deit_cells(sha="random-seed0")).empty
    assert published.points_for(deit_cells().assign(model="vit_fmnist_convstem")).empty


def test_export_and_frontier_show_them_beside_the_run(tmp_path: Path) -> None:
    """ToMe here: 79.6 at 3.42 and 78.8 at 2.28 GMACs (± 5). Published r=8 at 3.4: the 3.42 cell is within 0.05,
    measured, 79.60 - 79.7 = -0.10; r=13 at 2.7: 78.8 + (0.42 / 1.14) * 0.8 = 79.09, -0.31; r=16 at 2.3: measured
    78.80, -0.30. The baseline 79.90 at 4.599 against 79.8: +0.10."""
    store = Store(tmp_path / "s.sqlite")
    for row in deit_cells().to_dict("records"):
        store.write_cell(row, [fake_timing(32)])
    cells, timings = store.cells(), store.timings()
    store.close()
    paths = tables.export(cells, timings, tmp_path / "out")
    markdown, latex = paths[1].read_text(), paths[2].read_text()
    assert "against the published numbers" in markdown
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[3:8]) for line in markdown.splitlines()
            if line.startswith("| tome") or line.startswith("| none")}
    assert rows == {("tome", "3.4", "79.7", "79.60 ± 5.00 =", "-0.10"), ("tome", "2.7", "79.4", "79.09 ± 5.00", "-0.31"),
                    ("tome", "2.3", "79.1", "78.80 ± 5.00 =", "-0.30"), ("none", "4.6", "79.8", "79.90 ± 5.00 =", "+0.10")}
    assert "Bonnaerens" not in markdown  # LTMP was not measured here
    assert "ToMe (Bolya et al., ICLR 2023)" in latex and "79.09 $\\pm$ 5.00" in latex

    fig = plots.frontier(cells, published=published.points_for(cells))
    lines = {line.get_gid(): list(line.get_xdata()) for line in fig.axes[0].get_lines()
             if (line.get_gid() or "").startswith("published")}
    assert lines == {"published:none": [4.6], "published:tome": [2.3, 2.7, 3.4]}
    colours = {line.get_gid(): line.get_color() for line in fig.axes[0].get_lines() if line.get_gid()}
    assert colours["published:tome"] == plots.METHOD_STYLE["tome"][0] == colours["pareto:tome"]  # the method's own
    assert colours["published:none"] == plots.METHOD_STYLE["none"][0]
    assert "published" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_a_fashion_mnist_store_gets_no_published_section(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    for row in deit_cells(dataset="fashion-mnist-test").to_dict("records"):
        store.write_cell(row, [fake_timing(32)])
    paths = tables.export(store.cells(), store.timings(), tmp_path / "out")
    store.close()
    assert "published" not in paths[1].read_text()


def test_a_point_without_knobs_reads_as_none_named(tmp_path: Path) -> None:
    """A point may leave out ``knobs`` (the paper names no setting in this suite's knobs): it reads as empty, and the
    reports show ``–``, not ``nan``."""
    (tmp_path / "published.yaml").write_text("m:\n  - {method: tome, top1: 79.7, gmacs: 3.4, source: paper}\n")
    points = published.load(tmp_path / "published.yaml")
    assert points.to_dict("records") == [{"model": "m", "method": "tome", "knobs": "", "top1": 79.7, "gmacs": 3.4,
                                          "source": "paper"}]


def test_a_broken_published_file_is_a_one_line_error(tmp_path: Path) -> None:
    from bench.errors import BenchError

    (tmp_path / "published.yaml").write_text("deit_small_patch16_224: 5\n")  # points not a list of rows
    with pytest.raises(BenchError, match="published numbers .* unreadable .*git checkout bench/assets"):
        published.load(tmp_path / "published.yaml")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="needs pdflatex (apt-get install texlive-latex-recommended)")
def test_every_latex_table_compiles(tmp_path: Path) -> None:
    """Every .tex the export writes, typeset by pdflatex with booktabs: the DeiT-S cells (comparison, matched-cost and
    published tables, and the spread over two seeds) and a cell whose label holds every LaTeX special character. The
    paper table's ``top-1 (%)`` header once commented out the end of its row (``Misplaced \\noalign``)."""
    from tests.test_store import SPECIAL_LABEL

    store = Store(tmp_path / "s.sqlite")
    for row in deit_cells().to_dict("records"):
        store.write_cell(row, [fake_timing(32)])
        store.write_cell({**row, "cell_key": f"{row['cell_key']}-seed1", "seed": 1, "top1": row["top1"] - 0.01},
                         [fake_timing(32)])
    store.write_cell({**fake_row("odd", "tome", 0.8, 1.0), "label": SPECIAL_LABEL}, [fake_timing(32)])
    paths = tables.export(store.cells(), store.timings(), tmp_path / "out")
    store.close()
    assert ": across seeds" in (tmp_path / "out" / "results.tex").read_text()
    for path in (p for p in paths if p.suffix == ".tex"):
        document = tmp_path / f"doc_{path.stem}.tex"
        document.write_text("\\documentclass{article}\\usepackage{booktabs}\\usepackage[landscape]{geometry}"
                            f"\\begin{{document}}\\tiny\\input{{{path}}}\\end{{document}}\n")
        result = subprocess.run(["pdflatex", "-halt-on-error", "-interaction=nonstopmode", document.name],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (path.name, result.stdout[-1500:])
