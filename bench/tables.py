"""Comparison tables from the store: one per evaluation setting (:mod:`bench.settings`), as Markdown, LaTeX (booktabs)
and CSV."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from bench import matched, published
from bench.accuracy import interval_texts, paired_difference, unpack_hits
from bench.errors import BenchError
from bench.settings import SETTING_COLUMNS, series_labels, split_by_setting


def knob_summary(method: str, knobs_json: str) -> str:
    """``r_target=0.7, lr_merge=0.05``: the knobs the plug-in sweeps (at any value, its default included) and the
    others where they differ from its declared defaults; every knob for plug-ins not loaded; ``-`` for none."""
    import methods

    values = json.loads(knobs_json)
    if method in methods.REGISTRY:
        return methods.REGISTRY[method].summarise(values)
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "-"


def require_results(cells: pd.DataFrame) -> None:
    """Raise :class:`BenchError` naming the fix when there is no cell to report."""
    if cells.empty:
        raise BenchError("the store holds no results yet: run `python run_bench.py` first")


def paired_to_baseline(cells: pd.DataFrame) -> pd.DataFrame:
    """Per cell (index ``cell_key``): ``top1_drop``, the baseline's top-1 minus the cell's in points, measured paired
    on the same images (:func:`bench.accuracy.paired_difference`), ``top1_drop_pm`` the half-width of its 95 %
    interval, and ``p_paired`` McNemar's p. Empty (NaN) for the baseline itself, for cells stored without per-image
    hits, and where the cell's setting (:data:`bench.settings.SETTING_COLUMNS`) has no baseline cell."""
    columns = ["top1_drop", "top1_drop_pm", "p_paired"]
    out = pd.DataFrame(index=cells["cell_key"], columns=columns, dtype=float)
    hits = cell_hits(cells)
    for _, group in cells.groupby(list(SETTING_COLUMNS)):
        baselines = group[(group["method"] == "none") & group["cell_key"].isin(hits)]
        if baselines.empty:
            continue
        base = baselines["cell_key"].iloc[0]
        for key in group["cell_key"][(group["cell_key"] != base) & group["cell_key"].isin(hits)]:
            drop, half, p_value = paired_difference(hits[base], hits[key])
            out.loc[key] = [100 * drop, 100 * half, p_value]
    return out


def cell_hits(cells: pd.DataFrame) -> dict[str, np.ndarray]:
    """``cell_key`` -> ``(images,)`` bool top-1 hits of every cell stored with them (none from older stores)."""
    stored = cells[cells["top1_hits"].notna()] if "top1_hits" in cells else cells.iloc[0:0]
    return {row.cell_key: unpack_hits(row.top1_hits, int(row.eval_images)) for row in stored.itertuples()}


def comparison(cells: pd.DataFrame, timings: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: method, knobs, top-1 ± interval, its drop from the baseline measured paired on the same
    images (± interval, McNemar's p), GMACs (mean, min and max per image), the FLOPs kept (GMACs fraction, and the
    paper's r_FLOPs beside the knobs' r_target), speedup per device/precision/batch, fine-tune cost."""
    require_results(cells)
    paired = paired_to_baseline(cells).loc[cells["cell_key"]]
    table = pd.DataFrame({
        "model": cells["model"], "dataset": cells["dataset"], "method": cells["label"],
        "knobs": [knob_summary(m, k) for m, k in zip(cells["method"], cells["knobs"])],
        "top1": 100 * cells["top1"], "top1_pm": 100 * (cells["top1_high"] - cells["top1_low"]) / 2,
        **{column: paired[column].to_numpy(float) for column in paired.columns},
        "images": cells["eval_images"], "gmacs": cells["gmacs"], "gmacs_min": cells["gmacs_min"],
        "gmacs_max": cells["gmacs_max"], "gmacs_ratio": cells["gmacs_ratio"],
        "flops_kept": cells["gmacs"] / cells["gmacs_dense"],
        "r_flops": cells["r_flops"],  # the paper's measure, beside r_target (empty for cells stored before it)
        "ft_images": cells["ft_images"].fillna(0).astype(int), "ft_wall_s": cells["ft_wall_s"].fillna(0.0),
        "cell_key": cells["cell_key"],
    })
    if not timings.empty:
        merged = timings.merge(cells[["cell_key", "device"]], on="cell_key")
        merged["column"] = ("speedup " + merged["device"] + " " + merged["precision"] + " b" + merged["batch"].astype(str))
        wide = merged.pivot_table(index="cell_key", columns="column", values="speedup")
        table = table.merge(wide, left_on="cell_key", right_index=True, how="left")
    return table.sort_values(["model", "dataset", "gmacs"], ascending=[True, True, False]).reset_index(drop=True)


def swept_text(method: str, knobs_json: str) -> str:
    """A cell's setting as a paper names it: the knobs its plug-in sweeps, ``r_target 0.8`` (``–`` for none); every
    knob for plug-ins not loaded."""
    from methods.base import swept_values

    return ", ".join(f"{k} {v}" for k, v in swept_values(method, json.loads(knobs_json)).items()) or "–"


PAPER_NOTE = ("top-1: ± half the width of its 95 % Wilson interval; drop: the baseline's top-1 minus the method's "
              "in points, measured paired on the same images, ± its 95 % interval; GMACs: multiply-adds per image "
              "(mean over the evaluation set); speedup: against the unreduced model timed interleaved in the same "
              "process (device, precision, batch); fine-tune images: what the method's fit saw.")


def paper_table(table: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """:func:`comparison`'s rows (one setting) condensed to what a paper prints, as text: method, its swept knobs,
    top-1 and its paired drop from the baseline (each ± its 95 % interval), GMACs per image (mean), how many times
    fewer than the baseline's, each measured speedup, and the images its fit saw. Nothing is bold: which method is
    best depends on the cost, and :mod:`bench.matched` reads that off."""
    by_key = cells.set_index("cell_key")
    speedups = [c for c in table.columns if c.startswith("speedup ")]
    paper = pd.DataFrame({
        "method": table["method"],
        "setting": [swept_text(by_key.at[k, "method"], by_key.at[k, "knobs"]) for k in table["cell_key"]],
        "top-1 (%)": interval_texts(table["top1"], table["top1_pm"]),
        "drop (points)": interval_texts(table["top1_drop"], table["top1_drop_pm"]),
        "GMACs": [f"{g:.3f}" for g in table["gmacs"]],
        "×fewer": [f"{r:.2f}" for r in table["gmacs_ratio"]],
        **{f"speedup ({c.removeprefix('speedup ')})": ["–" if pd.isna(v) else f"{v:.2f}" for v in table[c]]
           for c in speedups},
        "fine-tune images": [fit_text(n, by_key.at[k, "ft_extra"] if "ft_extra" in by_key else None)
                             for n, k in zip(table["ft_images"], table["cell_key"])],
    })
    return paper


def fit_text(images: int, extra_json: str | None) -> str:
    """The images a cell's fit saw, ``512 (calibration)`` where it took no optimiser step (forward passes only, as
    Prune-and-Merge's calibrated regime), ``–`` for none."""
    if images == 0:
        return "–"
    extra = json.loads(extra_json) if isinstance(extra_json, str) else {}
    return f"{images:,} (calibration)" if extra.get("steps") == 0 else f"{images:,}"


def to_markdown(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["cell_key", "top1_pm", "top1_drop_pm"]).copy()
    shown["top1"] = interval_texts(table["top1"], table["top1_pm"])
    shown["top1_drop"] = interval_texts(table["top1_drop"], table["top1_drop_pm"])
    shown["p_paired"] = ["–" if pd.isna(p) else f"{p:.3g}" for p in table["p_paired"]]
    return shown.to_markdown(index=False, floatfmt=".3f")


def to_latex(table: pd.DataFrame) -> str:
    """booktabs table; the best value of each numeric column (top-1, GMACs, speedups) in bold."""
    shown = table.drop(columns=["cell_key", "model", "dataset"]).copy()
    best = {"top1": shown["top1"].max(), "gmacs": shown["gmacs"].min()}
    for column in shown.columns:
        if column.startswith("speedup"):
            best[column] = shown[column].max()

    def fmt(column: str, value: object) -> str:
        if isinstance(value, float) and pd.isna(value):
            return "--"
        if isinstance(value, float):
            text = (f"{value:.3g}" if column == "p_paired" else
                    f"{value:.3f}" if column.startswith("gmacs") and column != "gmacs_ratio" else f"{value:.2f}")
            return f"\\textbf{{{text}}}" if column in best and value == best[column] else text
        return latex_escape(str(value))

    rows = [[fmt(c, v) for c, v in zip(shown.columns, row)] for row in shown.itertuples(index=False)]
    return booktabs([latex_escape(c) for c in shown.columns], rows, text_columns=2)


def booktabs(header: list[str], rows: list[list[str]], text_columns: int) -> str:
    """A booktabs ``tabular`` of already-escaped cells: the first ``text_columns`` left-aligned, the rest right."""
    lines = [" & ".join(row) + " \\\\" for row in rows]
    spec = "l" * text_columns + "r" * (len(header) - text_columns)
    return "\n".join([f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(header) + " \\\\", "\\midrule",
                      *lines, "\\bottomrule", "\\end{tabular}"]) + "\n"


def matched_markdown(long: pd.DataFrame) -> str:
    """The matched-cost table (:mod:`bench.matched`) under its note, then the paired gaps to the best under theirs
    (where per-image hits were stored); empty when no level is reached by two methods."""
    if long.empty:
        return ""
    text = f"{matched.NOTE}\n\n{matched.wide(long).to_markdown(index=False)}\n"
    if long["gap"].notna().any():
        gaps = matched.wide(long, matched.gap_text).to_markdown(index=False, disable_numparse=True)
        text += f"\n{matched.GAP_NOTE}\n\n{gaps}\n"
    return text


#: LaTeX's special characters in text, and how a table writes each (labels and knob values are the user's own text)
LATEX_SPECIALS = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                  "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}", "<": "\\textless{}",
                  ">": "\\textgreater{}", "|": "\\textbar{}"}
#: The reports' non-ASCII marks, as LaTeX writes them
LATEX_MARKS = {"±": "$\\pm$", "×": "$\\times$", "–": "--", "≥": "$\\geq$"}


def latex_escape(text: str) -> str:
    """``text`` as LaTeX typesets it literally: its special characters escaped, the reports' marks (±, ×, –, ≥) as
    LaTeX writes them."""
    return "".join(LATEX_SPECIALS.get(char) or LATEX_MARKS.get(char, char) for char in text)


def latex_cell(text: str) -> str:
    """A report cell's text in LaTeX (:func:`latex_escape`), ``**bold**`` as ``\\textbf``."""
    bold = text.startswith("**") and text.endswith("**") and len(text) > 4
    text = latex_escape(text[2:-2] if bold else text)
    return f"\\textbf{{{text}}}" if bold else text


def text_latex(table: pd.DataFrame, text_columns: int) -> str:
    """A table of text cells as booktabs (:func:`latex_cell` on every cell and header)."""
    return booktabs([latex_cell(c) for c in table.columns],
                    [[latex_cell(str(v)) for v in row] for row in table.itertuples(index=False)], text_columns)


def matched_latex(long: pd.DataFrame) -> str:
    """The matched-cost table as booktabs, the best of each row in bold, then the paired gaps' table; empty like
    :func:`matched_markdown`."""
    if long.empty:
        return ""
    text = text_latex(matched.wide(long), text_columns=1)
    if long["gap"].notna().any():
        text += f"% paired gaps to the best at each cost\n{text_latex(matched.wide(long, matched.gap_text), text_columns=1)}"
    return text


def published_markdown(compared: pd.DataFrame) -> str:
    """The papers' numbers beside this setting's (:mod:`bench.published`) under its note."""
    return f"{published.NOTE}\n\n{published.shown(compared).to_markdown(index=False, disable_numparse=True)}\n"


def reports_dir(out_dir: str | Path) -> Path:
    """``out_dir``, created if missing; :class:`BenchError` naming the fix where it cannot be written (checked before
    a run measures anything, so that hours of measurement do not end in an unwritable folder)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot write to {out} ({exc.strerror}): pass --reports to a writable folder") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise BenchError(f"cannot write to {out} (permission denied): pass --reports to a writable folder")
    return out


def export(cells: pd.DataFrame, timings: pd.DataFrame, out_dir: str | Path,
           naming: pd.DataFrame | None = None) -> list[Path]:
    """Write ``results.csv``, ``results.md``, ``results.tex``: one section per evaluation setting (model, weights,
    dataset, image count, device, evaluation precision, seed; named among the cells of ``naming``, see
    :mod:`bench.settings`), each with its comparison table and its top-1 at matched cost (:mod:`bench.matched`).
    The CSV holds every row with the setting's weights, device, precision and seed, and the fit's own record
    (``ft_extra``, JSON: steps, skipped steps, LTMP's largest gradient norm, clipped steps and the mean and spread of
    its r_FLOPs over the fit's last quarter, ...); ``results_matched.csv`` the
    matched-cost readings in long form (one row per setting, cost, level and method); ``results_paper.{md,tex}`` the
    compact tables a paper prints (:func:`paper_table`); where a setting was run under several seeds, an "across
    seeds" section of ``results.md`` and ``results_seeds.csv`` (:func:`seed_sections`)."""
    out = reports_dir(out_dir)
    require_results(cells)  # before any file is written (the sections below would be empty)
    paths = [out / "results.csv", out / "results.md", out / "results.tex", out / "results_matched.csv",
             out / "results_paper.md", out / "results_paper.tex"]
    rows, readings, sections_md, sections_tex, paper_md, paper_tex = [], [], [], [], [], []
    for setting, group in split_by_setting(cells, naming):
        group = group.assign(label=series_labels(group))  # a label's variants: separate rows of the matched table
        table = comparison(group, timings[timings["cell_key"].isin(group["cell_key"])])
        at_cost = matched.matched_all(table, hits=cell_hits(group))
        sections_md.append(f"### {setting.title}\n\n{to_markdown(table)}\n")
        sections_tex.append(f"% {setting.title}\n{to_latex(table)}")
        paper = paper_table(table, group)
        paper_md.append(f"### {setting.title}\n\n{PAPER_NOTE}\n\n{paper.to_markdown(index=False, disable_numparse=True)}\n")
        paper_tex.append(f"% {setting.title}\n% {PAPER_NOTE}\n{text_latex(paper, text_columns=2)}")
        if not at_cost.empty:
            sections_md.append(f"#### {setting.title}: top-1 at matched cost\n\n{matched_markdown(at_cost)}")
            sections_tex.append(f"% {setting.title}: top-1 at matched cost\n{matched_latex(at_cost)}")
            readings.append(at_cost.assign(setting=setting.title))
        points = published.points_for(group)
        if not points.empty:
            compared = published.compare(table, group.drop_duplicates("label").set_index("label")["method"], points)
            sections_md.append(f"#### {setting.title}: against the published numbers\n\n{published_markdown(compared)}")
            sections_tex.append(f"% {setting.title}: against the published numbers\n"
                                f"{text_latex(published.shown(compared), text_columns=4)}")
        setting_columns = group.set_index("cell_key")[["checkpoint_sha", "device", "eval_precision", "seed", "ft_extra"]]
        rows.append(table.join(setting_columns, on="cell_key"))
    frame = pd.concat(rows, ignore_index=True)
    paths += seed_sections(cells, frame.set_index("cell_key")["top1_drop"], out, naming, sections_md, sections_tex)
    speedups = [c for c in frame.columns if c.startswith("speedup")]
    frame[[c for c in frame.columns if c not in speedups] + speedups].to_csv(paths[0], index=False)
    paths[1].write_text("\n".join(sections_md))
    paths[2].write_text("\n".join(sections_tex))
    long = pd.concat(readings, ignore_index=True) if readings else pd.DataFrame(columns=["setting", *MATCHED_COLUMNS])
    long[["setting", *MATCHED_COLUMNS]].to_csv(paths[3], index=False)
    paths[4].write_text("\n".join(paper_md))
    paths[5].write_text("\n".join(paper_tex))
    return paths


MATCHED_COLUMNS = ["axis", "level", "method", "top1", "top1_pm", "cells", "gap", "gap_pm"]
SEEDS_NOTE = ("The same setting run under several `--seed`s (each also has its own section above): per series and "
              "knobs, the mean ± sample standard deviation over the seeds. A fit's seed orders its training images, "
              "so a learned method's spread is that of its fit (with `--limit`, also that of the images each seed "
              "draws, which the baseline's spread shows); drop: against each seed's own baseline, paired.")


def seed_sections(cells: pd.DataFrame, drops: pd.Series, out: Path, naming: pd.DataFrame | None,
                  sections_md: list[str], sections_tex: list[str]) -> list[Path]:
    """Append an "across seeds" section to ``sections_md`` and ``sections_tex`` for every setting run under several
    seeds (:func:`bench.seeds.seed_spread`; ``drops``: each cell's paired drop, by ``cell_key``, as the comparison
    tables computed it) and write them to ``results_seeds.csv`` (returned); with none, no file (a stale one from an
    earlier export is removed)."""
    from bench import seeds

    spreads = seeds.seed_spread(cells, drops, naming)
    path = out / "results_seeds.csv"
    if not spreads:
        path.unlink(missing_ok=True)
        return []
    for setting, spread in spreads:
        shown = seeds.spread_text(spread)
        sections_md.append(f"### {setting.title}: across seeds\n\n{SEEDS_NOTE}\n\n"
                           f"{shown.to_markdown(index=False, disable_numparse=True)}\n")
        sections_tex.append(f"% {setting.title}: across seeds\n% {SEEDS_NOTE}\n{text_latex(shown, text_columns=3)}")
    pd.concat([spread.assign(setting=setting.title) for setting, spread in spreads], ignore_index=True)[
        ["setting", *seeds.SPREAD_COLUMNS]].to_csv(path, index=False)
    return [path]
