"""The results store: an SQLite file (standard library), one transaction per cell.

Tables: ``meta`` (marks the file as ours + schema version), ``cells`` (one row per model + checkpoint +
dataset + method + knobs + device: accuracy with each image's top-1 hit (packed bits, for paired comparisons),
GMACs, token counts, fine-tune cost, learned state, environment)
and ``timings`` (per cell, precision and batch: latency of the method and of the baseline timed interleaved,
the speedup as the ratio of their medians with the quartiles of the per-round ratios).
A cell and its timings are committed together, so ``kill -9`` loses at most the cell in flight; a finished
cell is found by its key and skipped on rerun. A file that is not SQLite, or SQLite without our ``meta``
row, is refused and left untouched.
"""
from __future__ import annotations

import hashlib
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bench.errors import BenchError

APP, SCHEMA = "tokenbench", "1"
SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    cell_key TEXT PRIMARY KEY,
    model TEXT NOT NULL, checkpoint_sha TEXT NOT NULL, dataset TEXT NOT NULL, eval_images INTEGER NOT NULL,
    method TEXT NOT NULL, knobs TEXT NOT NULL, label TEXT NOT NULL, device TEXT NOT NULL, eval_precision TEXT NOT NULL,
    seed INTEGER, fit TEXT,
    top1 REAL, top1_low REAL, top1_high REAL, top5 REAL, top1_correct INTEGER, top1_hits BLOB,
    gmacs REAL, gmacs_min REAL, gmacs_max REAL, gmacs_dense REAL, gmacs_ratio REAL, r_flops REAL,
    tokens_attn TEXT, tokens_mlp TEXT, tokens_attn_min TEXT, tokens_attn_max TEXT,
    ft_images INTEGER, ft_epochs REAL, ft_wall_s REAL, ft_device TEXT, ft_extra TEXT,
    learned_state BLOB, env TEXT, git_commit TEXT, created TEXT
);
CREATE TABLE IF NOT EXISTS timings (
    cell_key TEXT NOT NULL REFERENCES cells(cell_key) ON DELETE CASCADE,
    precision TEXT NOT NULL, batch INTEGER NOT NULL, threads INTEGER,
    median_ms REAL, iqr_ms REAL, images_per_s REAL,
    baseline_median_ms REAL, baseline_iqr_ms REAL, speedup REAL, realisation REAL, iterations INTEGER,
    tf32 TEXT, speedup_q1 REAL, speedup_q3 REAL, page_faults_per_call REAL, baseline_page_faults_per_call REAL,
    PRIMARY KEY (cell_key, precision, batch)
);
"""

#: Columns added to schema 1 after its first release: stores written before get them (empty) when opened.
ADDED_COLUMNS = {"timings": {"speedup_q1": "REAL", "speedup_q3": "REAL", "page_faults_per_call": "REAL",
                             "baseline_page_faults_per_call": "REAL"},
                 "cells": {"r_flops": "REAL", "top1_hits": "BLOB", "seed": "INTEGER", "fit": "TEXT"}}


def cell_key(identity: dict[str, Any]) -> str:
    """A stable key of a cell's identity fields."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Store:
    """Open (or create) ``path``; refuse anything that is not a tokenbench store."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        exists = self.path.exists() and self.path.stat().st_size > 0
        if not exists:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.touch()
            except OSError as exc:
                raise BenchError(f"cannot create store {self.path} ({exc.strerror}): pass --store to a writable path") from exc
        try:
            self.conn = sqlite3.connect(self.path, timeout=30)
            self.conn.execute("PRAGMA foreign_keys = ON")
            tables = {row[0] for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise BenchError(f"store {self.path} is not an SQLite database ({exc}): pass another --store; the file was left untouched") from exc
        if exists:
            app = None
            if "meta" in tables:
                row = self.conn.execute("SELECT value FROM meta WHERE key='app'").fetchone()
                app = row[0] if row else None
            if app != APP:
                self.conn.close()
                raise BenchError(f"store {self.path} is an SQLite file of another program: pass another --store; the file was left untouched")
            version = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
            if version != SCHEMA:
                self.conn.close()
                raise BenchError(f"store {self.path} has schema {version}, this suite writes {SCHEMA}: pass another --store")
        try:
            with self.conn:
                self.conn.executescript(SCHEMA_SQL)
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('app', ?), ('schema', ?)", (APP, SCHEMA))
                for table, columns in ADDED_COLUMNS.items():
                    present = {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}
                    for column, kind in columns.items():
                        if column not in present:
                            self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as exc:
            raise BenchError(f"cannot write store {self.path} ({exc}): pass --store to a writable path") from exc

    def close(self) -> None:
        self.conn.close()

    def has(self, key: str) -> bool:
        return self.conn.execute("SELECT 1 FROM cells WHERE cell_key=?", (key,)).fetchone() is not None

    def write_cell(self, row: dict[str, Any], timings: list[dict[str, Any]]) -> None:
        """Insert (or replace) one cell and its timings in a single transaction."""
        row = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()}
        with self.conn:
            self.conn.execute("DELETE FROM cells WHERE cell_key=?", (row["cell_key"],))
            columns = ", ".join(row)
            self.conn.execute(f"INSERT INTO cells ({columns}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
            for timing in timings:
                timing = {"cell_key": row["cell_key"], **timing}
                self.conn.execute(f"INSERT INTO timings ({', '.join(timing)}) VALUES ({', '.join('?' * len(timing))})",
                                  tuple(timing.values()))

    def cells(self) -> pd.DataFrame:
        """Every cell, oldest first. A cell stored before the ``seed`` column existed reads as seed 0, the default
        (its seed was hashed into its key but not kept)."""
        cells = pd.read_sql_query("SELECT * FROM cells ORDER BY created", self.conn)
        cells["seed"] = cells["seed"].fillna(0).astype("int64")
        return cells

    def timings(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM timings", self.conn)

    def learned_state(self, key: str) -> dict[str, torch.Tensor]:
        row = self.conn.execute("SELECT learned_state FROM cells WHERE cell_key=?", (key,)).fetchone()
        if row is None or row[0] is None:
            return {}
        return torch.load(io.BytesIO(row[0]), weights_only=True)


def read_results(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cells and timings of the store at ``path``, for ``export`` and ``plot``; :class:`BenchError` naming the fix
    where it does not exist or holds no cell."""
    if not Path(path).is_file():
        raise BenchError(f"store {path} does not exist: run `python run_bench.py` first or pass --store")
    store = Store(path)
    try:
        cells, timings = store.cells(), store.timings()
    finally:
        store.close()
    if cells.empty:
        raise BenchError(f"store {path} holds no results yet: run `python run_bench.py` first")
    return cells, timings


def pack_state(state: dict[str, torch.Tensor]) -> bytes | None:
    if not state:
        return None
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    return buffer.getvalue()
