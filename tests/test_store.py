"""The SQLite store: round trip, refusal of foreign/corrupt files, resume after kill -9, export."""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import settings, tables
from bench.errors import BenchError
from bench.store import Store, cell_key, pack_state, read_results
from tests.conftest import ROOT, run_cli


FAKE_KNOBS = {"none": {}, "ltmp": {"r_target": 0.7}, "ltp": {"r_target": 0.7}}  # others: ToMe's {"r": 8}


def fake_row(key: str, method: str = "tome", top1: float = 0.9, gmacs: float = 1.0) -> dict:
    return {"cell_key": key, "model": "m", "checkpoint_sha": "abc", "dataset": "d", "eval_images": 100,
            "method": method, "knobs": FAKE_KNOBS.get(method, {"r": 8}), "label": method, "device": "cpu",
            "eval_precision": "fp32",
            "top1": top1, "top1_low": top1 - 0.05, "top1_high": top1 + 0.05, "top5": 1.0, "top1_correct": int(top1 * 100),
            "gmacs": gmacs, "gmacs_min": gmacs, "gmacs_max": gmacs, "gmacs_dense": 2.0, "gmacs_ratio": 2.0 / gmacs,
            "r_flops": gmacs / 2.0,
            "tokens_attn": [197, 189], "tokens_mlp": [189, 181], "ft_images": 0, "ft_epochs": 0.0, "ft_wall_s": 0.0,
            "learned_state": pack_state({"theta": torch.tensor([0.5, 0.25])}), "created": "2026-01-01T00:00:00"}


def fake_timing(batch: int = 32) -> dict:
    return {"precision": "bf16", "batch": batch, "median_ms": 10.0, "iqr_ms": 1.0, "images_per_s": 3200.0,
            "baseline_median_ms": 15.0, "baseline_iqr_ms": 1.0, "speedup": 1.5, "realisation": 0.75, "iterations": 20}


def test_round_trip_and_learned_state(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    store.write_cell(fake_row("k1"), [fake_timing(1), fake_timing(32)])
    assert store.has("k1") and not store.has("k2")
    cells, timings = store.cells(), store.timings()
    assert len(cells) == 1 and len(timings) == 2
    assert json.loads(cells.loc[0, "tokens_attn"]) == [197, 189]
    assert torch.equal(store.learned_state("k1")["theta"], torch.tensor([0.5, 0.25]))
    store.write_cell(fake_row("k1", top1=0.8), [fake_timing()])  # replace, not duplicate
    assert len(store.cells()) == 1 and len(store.timings()) == 1
    store.close()


def test_cells_read_oldest_first_and_a_cell_without_learned_state_stores_none(tmp_path: Path) -> None:
    """Cells come back in the order they were created, not written; a method that learns nothing stores NULL and
    reads back an empty state."""
    store = Store(tmp_path / "s.sqlite")
    store.write_cell({**fake_row("later"), "created": "2026-01-02T00:00:00"}, [])
    store.write_cell({**fake_row("earlier"), "created": "2026-01-01T00:00:00", "learned_state": pack_state({})}, [])
    assert store.cells()["cell_key"].tolist() == ["earlier", "later"]
    assert pack_state({}) is None and store.learned_state("earlier") == {}
    store.close()


def test_a_new_store_goes_where_asked_even_into_new_folders_or_an_empty_file(tmp_path: Path) -> None:
    """A store path in folders that do not exist yet creates them; an empty file (``touch``, ``mktemp``) becomes a
    store rather than being refused as another program's."""
    Store(tmp_path / "a" / "b" / "s.sqlite").close()
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    Store(empty).close()
    store = Store(empty)  # reopened: now a store of ours
    assert store.cells().empty
    store.close()


def test_reading_results_needs_a_store_that_exists_and_holds_cells(tmp_path: Path) -> None:
    """A missing store is named and not created; an empty one is named too (each with its fix)."""
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(BenchError, match="does not exist: run `python run_bench.py` first or pass --store"):
        read_results(missing)
    assert not missing.exists()
    Store(tmp_path / "empty.sqlite").close()
    with pytest.raises(BenchError, match="holds no results yet: run `python run_bench.py` first"):
        read_results(tmp_path / "empty.sqlite")


def test_cell_key_is_order_independent() -> None:
    assert cell_key({"a": 1, "b": [1, 2]}) == cell_key({"b": [1, 2], "a": 1})
    assert cell_key({"a": 1}) != cell_key({"a": 2})


@pytest.mark.parametrize("content", [b"this is not a database at all" * 10, None, "meta"])
def test_foreign_or_corrupt_files_are_refused_and_untouched(tmp_path: Path, content: bytes | str | None) -> None:
    path = tmp_path / "x.sqlite"
    if not isinstance(content, bytes):  # an SQLite file of another program ("meta": one with a meta table of its own)
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE other (x)")
        if content == "meta":
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("INSERT INTO meta VALUES ('app', 'otherprogram'), ('schema', '1')")
        conn.commit()
        conn.close()
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(BenchError, match="left untouched"):
        Store(path)
    assert path.read_bytes() == before


def test_a_store_of_another_schema_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value='2' WHERE key='schema'")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(BenchError, match="has schema 2, this suite writes 1: pass another --store"):
        Store(path)
    assert path.read_bytes() == before


def test_export_round_trips(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    store.write_cell(fake_row("k1", "none", 0.91, 2.0), [fake_timing()])
    store.write_cell({**fake_row("k2", "tome", 0.88, 1.0), "ft_extra": {"steps": 24, "max_grad_norm": 3.0e3},
                      "ft_images": 64, "ft_wall_s": 12.5}, [fake_timing()])
    paths = tables.export(store.cells(), store.timings(), tmp_path / "out")
    csv = pd.read_csv(paths[0])
    assert sorted(csv["cell_key"]) == ["k1", "k2"]
    assert csv.set_index("cell_key").loc["k2", "top1"] == pytest.approx(88.0)
    assert csv.set_index("cell_key").loc["k2", "speedup cpu bf16 b32"] == pytest.approx(1.5)
    assert csv.set_index("cell_key").loc["k2", "gmacs_max"] == pytest.approx(1.0)  # per-image range beside the mean
    assert csv.set_index("cell_key").loc["k2", "r_flops"] == pytest.approx(0.5)
    assert json.loads(csv.set_index("cell_key").loc["k2", "ft_extra"]) == {"steps": 24, "max_grad_norm": 3.0e3}
    assert csv.set_index("cell_key").loc["k2", ["ft_images", "ft_wall_s"]].tolist() == [64, 12.5]  # the fit's cost
    markdown, latex = paths[1].read_text(), paths[2].read_text()
    assert markdown.count("| tome") == 1 and markdown.count("| none") == 1
    assert "\\toprule" in latex and "\\textbf{91.00}" in latex and "\\textbf{1.000}" in latex
    store.close()


def test_empty_store_export_is_a_one_line_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    with pytest.raises(BenchError, match="no results"):
        tables.export(store.cells(), store.timings(), tmp_path / "out")


RESUME_SCRIPT = """
import sys, time
from bench import runner
from bench.store import Store
calls = []
real = runner.measure_cell
def slow(work, entry, knobs, store, progress):
    row = real(work, entry, knobs, store, progress)
    print('cell', flush=True)
    time.sleep(float(sys.argv[2]))
    return row
runner.measure_cell = slow
from bench.cli import main
sys.exit(main(['run', '--config', sys.argv[1], '--store', sys.argv[3], '--reports', sys.argv[4], '--quiet']))
"""


def tiny_config(folder: Path, images: Path, tome_r: list[int]) -> Path:
    """A config file in ``folder``: the tiny test ViT on the ImageFolder ``images``, the baseline and ToMe at each r."""
    config = folder / "c.yaml"
    config.write_text(f"""
model: test_tiny_vit
dataset: imagefolder
data: {images}
eval_precision: fp32
eval_batch_size: 8
latency: {{precisions: [fp32], batch_sizes: [2], warmup_iters: 1, warmup_s: 0.0, min_iters: 2, min_time_s: 0.0}}
methods:
  - method: none
  - method: tome
    sweep: {{r: {tome_r}}}
""")
    return config


@pytest.mark.slow
def test_resume_after_kill_recomputes_nothing(tmp_path: Path, tiny_imagefolder: Path) -> None:
    config = tiny_config(tmp_path, tiny_imagefolder, [2, 4, 6])
    store, reports = tmp_path / "s.sqlite", tmp_path / "r"
    script = tmp_path / "resume.py"
    script.write_text("import tests.tiny_model\n" + RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, str(script), str(config), "30", str(store), str(reports)],
                          stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env) as proc:
        assert proc.stdout.readline().strip() == "cell"  # first cell committed, then sleeping
        os.kill(proc.pid, signal.SIGKILL)
    assert len(Store(store).cells()) == 1
    done = subprocess.run([sys.executable, str(script), str(config), "0", str(store), str(reports)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("cell") - done.stdout.count("cells") == 3  # 4 planned, 1 kept: 3 recomputed
    again = subprocess.run([sys.executable, str(script), str(config), "0", str(store), str(reports)],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert "0 cells measured, 4 already" in again.stdout
    assert len(Store(store).cells()) == 4


def test_a_methods_subset_rerun_reports_the_whole_configs_cells(tmp_path: Path, tiny_imagefolder: Path) -> None:
    """``run --methods X --force`` re-measures X only, and its tables still hold the config's other cells; a
    registered method the config lacks (a plug-in of one's own) runs at its declared default sweep beside them."""
    config = tiny_config(tmp_path, tiny_imagefolder, [2, 4])
    store, reports = tmp_path / "s.sqlite", tmp_path / "r"
    common = ("run", "--config", str(config), "--store", str(store), "--reports", str(reports), "--quiet")
    env = {"TOKENBENCH_PLUGINS": "tests.tiny_model"}
    first = run_cli(*common, "--limit", "50", env=env)  # more than the folder's 18 images: the same cells
    assert first.returncode == 0, first.stderr[-2000:]
    assert "warning: test_tiny_vit has random weights" in first.stderr  # no --pretrained, no --checkpoint
    assert "note: --limit 50 is more than the 18 images of imagefolder:" in first.stderr
    before = pd.read_csv(reports / "results.csv")
    subset = run_cli(*common, "--methods", "tome", "--force", env=env)
    assert subset.returncode == 0, subset.stderr[-2000:]
    assert "2 cells measured, 0 already" in subset.stdout
    after = pd.read_csv(reports / "results.csv")
    assert sorted(after["method"]) == sorted(before["method"]) == ["none", "tome", "tome"]
    assert len(Store(store).cells()) == 3
    added = run_cli(*common, "--methods", "none,topk", env=env)
    assert added.returncode == 0, added.stderr[-2000:]
    assert "3 cells measured, 1 already" in added.stdout  # topk's declared sweep: keep_rate 0.9, 0.7, 0.5
    rows = pd.read_csv(reports / "results.csv")
    assert sorted(rows["method"]) == ["none", "tome", "tome", "topk", "topk", "topk"]
    assert sorted(rows.loc[rows["method"] == "topk", "knobs"]) == [f"keep_rate={k}" for k in ("0.5", "0.7", "0.9")]


def test_stores_written_before_the_speedup_quartiles_gain_the_columns(tmp_path: Path) -> None:
    """A schema-1 store from before ``speedup_q1/q3``, the page-fault counts, ``r_flops``, ``seed`` and ``fit`` existed opens,
    keeps its rows, and takes new rows with them; its cells read as seed 0, the default."""
    from bench.store import APP, SCHEMA, SCHEMA_SQL
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    old_schema = SCHEMA_SQL.replace(" speedup_q1 REAL, speedup_q3 REAL,", "").replace(" r_flops REAL,", "").replace(
        " page_faults_per_call REAL, baseline_page_faults_per_call REAL,", "").replace("    seed INTEGER, fit TEXT,\n", "")
    assert old_schema.count("REAL") == SCHEMA_SQL.count("REAL") - 5 and "seed" not in old_schema and "fit " not in old_schema
    conn.executescript(old_schema)
    conn.execute("INSERT INTO meta VALUES ('app', ?), ('schema', ?)", (APP, SCHEMA))
    conn.commit()
    conn.close()
    store = Store(path)
    old_row = {k: v for k, v in fake_row("old").items() if k != "r_flops"}
    store.write_cell(old_row, [fake_timing()])  # a writer that does not know the quartiles or r_flops
    store.write_cell({**fake_row("new"), "seed": 1}, [{**fake_timing(), "speedup_q1": 1.4, "speedup_q3": 1.7,
                                        "page_faults_per_call": 0.0, "baseline_page_faults_per_call": 3.0}])
    store.close()
    timings = Store(path).timings().set_index("cell_key")
    assert pd.isna(timings.loc["old", "speedup_q1"]) and timings.loc["old", "speedup"] == 1.5
    assert (timings.loc["new", "speedup_q1"], timings.loc["new", "speedup_q3"]) == (1.4, 1.7)
    assert pd.isna(timings.loc["old", "page_faults_per_call"]) and timings.loc["new", "baseline_page_faults_per_call"] == 3.0
    cells = Store(path).cells().set_index("cell_key")
    assert pd.isna(cells.loc["old", "r_flops"]) and cells.loc["new", "r_flops"] == 0.5
    assert (cells.loc["old", "seed"], cells.loc["new", "seed"]) == (0, 1) and cells["fit"].isna().all()


def test_a_fit_budget_in_epochs_is_passes_over_the_training_set(tmp_path: Path, tiny_imagefolder: Path) -> None:
    """``fit.budget_epochs: 2`` on the 18 training images of the tiny ImageFolder fits on 36 images (batches of 6),
    records 2 epochs, and keys the cell by those 36 images: the same budget given as ``budget_images: 36`` is the
    same cell, and 1 epoch another one."""
    store, reports = tmp_path / "s.sqlite", tmp_path / "r"
    common = ("--store", str(store), "--reports", str(reports), "--quiet", "--train-data", str(tiny_imagefolder))

    def run_with(fit: str) -> subprocess.CompletedProcess:
        config = tiny_config(tmp_path, tiny_imagefolder, [2])
        config.write_text(config.read_text().replace("  - method: tome\n    sweep: {r: [2]}", "  - method: ltp\n"
                                                     "    sweep: {r_target: [0.7]}") + f"fit: {fit}\n")
        return run_cli("run", "--config", str(config), *common, env={"TOKENBENCH_PLUGINS": "tests.tiny_model"})

    first = run_with("{budget_epochs: 2, batch_size: 6, precision: fp32}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "2 cells measured, 0 already" in first.stdout
    cells = Store(store).cells()
    (cell,) = cells[cells["method"] == "ltp"].itertuples()
    assert cell.ft_images == 36 and cell.ft_epochs == 2.0
    same = run_with("{budget_images: 36, batch_size: 6, precision: fp32}")
    assert "0 cells measured, 2 already" in same.stdout, same.stdout[-2000:]
    other = run_with("{budget_epochs: 1, batch_size: 6, precision: fp32}")
    assert "1 cells measured, 1 already" in other.stdout, other.stdout[-2000:]
    cells = Store(store).cells()  # the store keeps each fit's settings and the run's seed; two budgets, two series
    fitted = cells["method"] == "ltp"
    assert sorted(json.loads(fit)["budget_images"] for fit in cells.loc[fitted, "fit"]) == [18, 36]
    assert cells.loc[~fitted, "fit"].isna().all() and (cells["seed"] == 0).all()
    assert sorted(settings.series_labels(cells)[fitted]) == ["ltp (fit.budget_images=18)", "ltp (fit.budget_images=36)"]


def test_a_run_of_several_seeds_reports_them_side_by_side(tmp_path: Path, tiny_imagefolder: Path) -> None:
    """``--seed 0,1`` with ``--limit 12`` of the 18 images: each seed draws its own 12 images and is its own setting
    (the baseline and ToMe measured under both), and the run's report sets the two side by side; the same seeds in
    another order measure nothing again."""
    store, reports = tmp_path / "s.sqlite", tmp_path / "r"
    config = tiny_config(tmp_path, tiny_imagefolder, [2])
    args = ("run", "--config", str(config), "--store", str(store), "--reports", str(reports), "--quiet", "--limit", "12")
    first = run_cli(*args, "--seed", "0,1", env={"TOKENBENCH_PLUGINS": "tests.tiny_model"})
    assert first.returncode == 0, first.stderr[-2000:]
    assert "4 cells measured, 0 already" in first.stdout and str(reports / "results_seeds.csv") in first.stdout
    assert first.stdout.index("seed 0:\n") < first.stdout.index("seed 1:\n")  # a table under each seed's name
    cells = Store(store).cells()
    assert sorted(zip(cells["seed"], cells["method"])) == [(0, "none"), (0, "tome"), (1, "none"), (1, "tome")]
    from bench.data import seeded_subset_indices
    assert not torch.equal(seeded_subset_indices(18, 12, 0), seeded_subset_indices(18, 12, 1))  # two subsets
    markdown = (reports / "results.md").read_text()
    assert "(random weights (seed1), seed 1)\n" in markdown and ": across seeds\n" in markdown
    spread = pd.read_csv(reports / "results_seeds.csv")
    assert sorted(spread["method"]) == ["none", "tome"] and set(spread["seeds"]) == {"0, 1"}
    again = run_cli(*args, "--seed", "1,0,1", env={"TOKENBENCH_PLUGINS": "tests.tiny_model"})
    assert "0 cells measured, 4 already" in again.stdout, again.stdout[-2000:]


def test_tables_give_each_cells_paired_drop_from_the_baseline(tmp_path: Path) -> None:
    """Per-image hits stored with each cell give its top-1 drop from the baseline on the same images: the baseline
    right on images 0-2 and 4, ToMe only on image 4 (drop 60 points, 1.96 * sqrt(0.24 / 5) = 42.94, McNemar
    p = 0.25); a cell stored without hits (an older store) and the baseline itself get none, and no cell gets one
    where the baseline was stored without them."""
    from bench.accuracy import pack_hits

    store = Store(tmp_path / "s.sqlite")
    base, tome = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool), torch.tensor([0, 0, 0, 0, 1], dtype=torch.bool)
    store.write_cell({**fake_row("k1", "none", 0.8, 2.0), "eval_images": 5, "top1_hits": pack_hits(base)}, [])
    store.write_cell({**fake_row("k2", "tome", 0.2, 1.0), "eval_images": 5, "top1_hits": pack_hits(tome)}, [])
    store.write_cell({**fake_row("k3", "tome", 0.4, 1.5), "eval_images": 5, "knobs": {"r": 4}, "ft_images": None}, [])
    table = tables.comparison(store.cells(), store.timings()).set_index("cell_key")
    assert table.loc["k3", "ft_images"] == 0  # no fit recorded: no fine-tuning images
    assert table.loc["k2", "top1_drop"] == pytest.approx(60.0)
    assert table.loc["k2", "top1_drop_pm"] == pytest.approx(42.94, abs=5e-3)
    assert table.loc["k2", "p_paired"] == pytest.approx(0.25)
    assert table.loc[["k1", "k3"], "top1_drop"].isna().all()
    assert table.loc[["k2", "k3"], "flops_kept"].tolist() == [0.5, 0.75]  # GMACs 1.0 and 1.5 of the dense 2.0
    markdown = tables.export(store.cells(), store.timings(), tmp_path / "out")[1].read_text()
    assert "| 60.00 ± 42.94 |" in markdown and "| 0.25 " in markdown
    store.write_cell({**fake_row("k1", "none", 0.8, 2.0), "eval_images": 5}, [])  # the baseline, stored without hits
    assert tables.comparison(store.cells(), store.timings())["top1_drop"].isna().all()
    store.close()


def test_the_paper_table_condenses_each_cell_to_what_a_paper_prints(tmp_path: Path) -> None:
    """``results_paper.{md,tex}``: method, swept knobs, top-1 and paired drop with their intervals, GMACs, ×fewer,
    speedups and the fit's images (a fit with no optimiser step is a calibration), hand-checked on fake cells."""
    from bench.accuracy import pack_hits

    store = Store(tmp_path / "s.sqlite")
    base, tome = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool), torch.tensor([0, 0, 0, 0, 1], dtype=torch.bool)
    store.write_cell({**fake_row("k1", "none", 0.8, 2.0), "eval_images": 5, "top1_hits": pack_hits(base)}, [fake_timing()])
    store.write_cell({**fake_row("k2", "tome", 0.2, 1.0), "eval_images": 5, "top1_hits": pack_hits(tome)}, [fake_timing()])
    store.write_cell({**fake_row("k3", "ltmp", 0.4, 1.6), "eval_images": 5, "ft_images": 1536, "ft_extra": {"steps": 24}}, [])
    store.write_cell({**fake_row("k4", "ltp", 0.4, 1.25), "eval_images": 5, "ft_images": 512, "ft_extra": {"steps": 0}}, [])
    paths = tables.export(store.cells(), store.timings(), tmp_path / "out")
    assert [p.name for p in paths[4:]] == ["results_paper.md", "results_paper.tex"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in paths[4].read_text().splitlines()
            if line.startswith("| ")]
    assert rows[0] == ["method", "setting", "top-1 (%)", "drop (points)", "GMACs", "×fewer", "speedup (cpu bf16 b32)",
                       "fine-tune images"]
    assert rows[1:] == [["none", "–", "80.00 ± 5.00", "–", "2.000", "1.00", "1.50", "–"],
                        ["ltmp", "r_target 0.7", "40.00 ± 5.00", "–", "1.600", "1.25", "–", "1,536"],
                        ["ltp", "r_target 0.7", "40.00 ± 5.00", "–", "1.250", "1.60", "–", "512 (calibration)"],
                        ["tome", "r 8", "20.00 ± 5.00", "60.00 ± 42.94", "1.000", "2.00", "1.50", "–"]]
    latex = paths[5].read_text()
    assert "tome & r 8 & 20.00 $\\pm$ 5.00 & 60.00 $\\pm$ 42.94 & 1.000 & 2.00 & 1.50 & -- \\\\" in latex
    assert "ltmp & r\\_target 0.7 &" in latex and "\\textbf" not in latex
    store.close()


#: A label of every LaTeX special character and report mark, and how LaTeX must be given it (derived by hand)
SPECIAL_LABEL = "a&b%c$d#e_f{g}h~i^j\\k<l>m|n±×–≥"
SPECIAL_LABEL_LATEX = ("a\\&b\\%c\\$d\\#e\\_f\\{g\\}h\\textasciitilde{}i\\textasciicircum{}j\\textbackslash{}k"
                       "\\textless{}l\\textgreater{}m\\textbar{}n$\\pm$$\\times$--$\\geq$")


def test_latex_escapes_every_special_character() -> None:
    assert tables.latex_escape(SPECIAL_LABEL) == SPECIAL_LABEL_LATEX
    assert tables.latex_cell(f"**{SPECIAL_LABEL}**") == f"\\textbf{{{SPECIAL_LABEL_LATEX}}}"


def test_latex_comparison_table_by_hand() -> None:
    """Method and knobs left-aligned, numbers right-aligned; bold: the highest top-1, the fewest GMACs and the highest
    speedup of each column (here in different rows); p-values to 3 significant digits, a missing one as ``--``."""
    table = pd.DataFrame({"model": ["m", "m"], "dataset": ["d", "d"], "method": ["none", "tome"], "knobs": ["-", "r=8"],
                          "top1": [91.0, 88.0], "gmacs": [2.0, 1.0], "gmacs_ratio": [1.0, 2.0],
                          "p_paired": [float("nan"), 0.012345], "speedup cpu fp32 b32": [0.98, 1.7],
                          "cell_key": ["a", "b"]})
    assert tables.to_latex(table).splitlines() == [
        "\\begin{tabular}{llrrrrr}", "\\toprule",
        "method & knobs & top1 & gmacs & gmacs\\_ratio & p\\_paired & speedup cpu fp32 b32 \\\\", "\\midrule",
        "none & - & \\textbf{91.00} & 2.000 & 1.00 & -- & 0.98 \\\\",
        "tome & r=8 & 88.00 & \\textbf{1.000} & 2.00 & 0.0123 & \\textbf{1.70} \\\\", "\\bottomrule", "\\end{tabular}"]
    # only a whole ``**...**`` is bold
    assert [tables.latex_cell(text) for text in ("**x**", "**x", "x**", "****")] == ["\\textbf{x}", "**x", "x**", "****"]


def test_latex_tables_escape_headers_and_users_labels(tmp_path: Path) -> None:
    """The paper table's header ``top-1 (%)`` began a LaTeX comment that swallowed the rest of the header row; a
    config ``label:`` holding %, #, $, {, } or ~ broke every table it appeared in."""
    store = Store(tmp_path / "s.sqlite")
    store.write_cell(fake_row("k1", "none", 0.9, 2.0), [fake_timing()])
    store.write_cell({**fake_row("k2", "tome", 0.8, 1.0), "label": SPECIAL_LABEL}, [fake_timing()])
    paths = tables.export(store.cells(), store.timings(), tmp_path / "out")
    store.close()
    comparison, paper = paths[2].read_text(), paths[5].read_text()
    assert "method & setting & top-1 (\\%) & drop (points) &" in paper
    assert f"\n{SPECIAL_LABEL_LATEX} & r 8 & 80.00 $\\pm$ 5.00 &" in paper
    assert f"\n{SPECIAL_LABEL_LATEX} & r=8 & 80.00 & 5.00 &" in comparison
    for text in (comparison, paper):  # outside comment lines, no % that is not escaped
        assert not [line for line in text.splitlines() if not line.startswith("%") and re.search(r"(?<!\\)%", line)]
