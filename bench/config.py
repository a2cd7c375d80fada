"""Benchmark configs: YAML files (``bench/configs/*.yaml``) with command-line flags on top.

Every key is declared in :data:`DEFAULTS`; an unknown key is a one-line error naming it. ``methods`` is a
list of entries ``{method, label?, knobs?, sweep?, fit?}``: ``sweep`` maps knob -> list of values (cartesian
product); without ``sweep`` the plug-in's declared default sweep is used.
"""
from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import yaml

from bench.errors import BenchError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULTS: dict[str, Any] = {
    "name": "custom",
    "model": "vit_fmnist_convstem",
    "checkpoint": None,
    "pretrained": False,
    "dataset": "fashion-mnist",  # or "imagefolder"
    "data": None,  # ImageFolder evaluation folder
    "train_data": None,  # ImageFolder training folder (for methods that fit)
    "data_dir": None,  # Fashion-MNIST IDX folder
    "limit": None,
    "seed": 0,
    "device": "cpu",
    "threads": None,
    "workers": 2,
    "eval_precision": "bf16",
    # the heap kept for timing fragments under large evaluation batches on a CPU: at 250 and 500 the evaluations'
    # peak memory grew from cell to cell, at 100 it did not (fmnist_default.yaml); a GPU config may set more
    "eval_batch_size": 100,
    "latency": {"precisions": ["fp32", "bf16"], "batch_sizes": [1, 32], "warmup_iters": 20, "warmup_s": 2.0,
                "min_iters": 10, "min_time_s": 2.0},
    # a fit's budget: budget_images, or budget_epochs passes over the training set where set (it wins)
    "fit": {"budget_images": 4096, "budget_epochs": None, "batch_size": 64, "precision": "bf16"},
    "methods": [{"method": "none"}],
    "quick": {},
}
ENTRY_KEYS = {"method", "label", "knobs", "sweep", "fit"}


#: (type of a default, types a value may have, how the error names them), most specific first.
KINDS = ((bool, (bool,), "true or false"), (dict, (dict,), "a mapping"), (list, (list,), "a list"),
         (int, (int,), "a whole number"), (float, (int, float), "a number"), (str, (str,), "text"))


def check_kind(where: str, default: Any, value: Any) -> None:
    """Raise :class:`BenchError` unless ``value`` is of ``default``'s kind (a mapping, a list, a whole number, a
    number, text, true/false). A key whose default is None takes anything (its use checks it)."""
    if default is None:
        return
    for default_type, accepted, text in KINDS:
        if isinstance(default, default_type):
            if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
                raise BenchError(f"config key {where} must be {text} (got {value!r}): fix the config")
            return


def _merge(base: dict[str, Any], override: dict[str, Any], where: str,
           kinds: dict[str, Any] | None = None) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``, key by key into nested mappings; each value checked against the
    kind of its key in ``kinds`` (default ``base``; the ``quick`` overlay of a loaded config passes
    :data:`DEFAULTS`, where e.g. ``fit.budget_epochs`` may be None)."""
    kinds = base if kinds is None else kinds
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise BenchError(f"unknown config key {where}{key!r}: allowed keys are {sorted(base)}")
        check_kind(f"{where}{key}", kinds[key], value)
        if isinstance(base[key], dict) and isinstance(value, dict) and key != "quick":
            out[key] = _merge(base[key], value, f"{where}{key}.", kinds[key])
        else:
            out[key] = value
    return out


def load(name_or_path: str | None) -> dict[str, Any]:
    """Load a config by name (``fmnist_default``) or path, merged over :data:`DEFAULTS`."""
    if name_or_path is None:
        name_or_path = "fmnist_default"
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise BenchError(f"config {name_or_path!r} not found: use a YAML path or one of {known}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BenchError(f"config {path} is not valid YAML{where} ({problem}): fix the file") from exc
    if not isinstance(raw, dict):
        raise BenchError(f"config {path} must be a mapping of keys to values")
    config = _merge(DEFAULTS, raw, "")
    for index, entry in enumerate(config["methods"]):
        check_entry(entry, index)
    check_labels(config["methods"])
    return config


def entry_label(entry: dict[str, Any]) -> Any:
    """The label of a ``methods`` entry: its ``label``, else its method name (what figures, tables, ``--methods`` and
    error messages call it)."""
    return entry.get("label") or entry["method"]


def named_labels(methods: str, hint: str) -> set[str]:
    """The labels ``--methods`` names (comma-separated, blanks dropped); :class:`BenchError` ending in ``hint`` (what to
    pass) where it names none."""
    wanted = {name.strip() for name in methods.split(",")} - {""}
    if not wanted:
        raise BenchError(f"--methods {methods!r} names no method: pass comma-separated labels{hint}")
    return wanted


#: Characters a label may not hold, and why
LABEL_SEPARATORS = {",": "--methods separates labels by commas", "|": "Markdown tables separate cells by '|'"}


def check_labels(entries: list[dict[str, Any]]) -> None:
    """Raise :class:`BenchError` where an entry's label (its ``label``, else its method) holds a separator
    (:data:`LABEL_SEPARATORS`) or names entries of two methods: figures, tables and ``--methods`` know a series by its
    label, so two methods under one label would be drawn as one line and read off as one method."""
    owner: dict[str, str] = {}
    for entry in entries:
        label = str(entry_label(entry))
        for separator, why in LABEL_SEPARATORS.items():
            if separator in label:
                raise BenchError(f"config methods[{label}].label holds {separator!r} ({why}): choose a label without it")
        if owner.setdefault(label, entry["method"]) != entry["method"]:
            raise BenchError(f"config label {label!r} names entries of two methods ({owner[label]} and "
                             f"{entry['method']}): give each entry its own `label:`")


def check_entry(entry: Any, index: int) -> None:
    """Raise :class:`BenchError` naming the fix for a malformed ``methods`` entry: not a mapping with a method name,
    unknown keys, ``knobs``/``sweep``/``fit`` that are not mappings, a knob swept over no values or both fixed and
    swept, and ``fit`` keys or values the config's ``fit`` does not take."""
    if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
        raise BenchError(f"config methods[{index}] must be a mapping with a method name (got {entry!r}): "
                         "write e.g. `- method: tome`")
    where = f"methods[{entry_label(entry)}]"
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise BenchError(f"unknown config key {where}.{sorted(unknown)[0]!r}: allowed {sorted(ENTRY_KEYS)}")
    for key in ("knobs", "sweep", "fit"):
        check_kind(f"{where}.{key}", {}, {} if entry.get(key) is None else entry[key])
    sweep, knobs = entry.get("sweep") or {}, entry.get("knobs") or {}
    for knob, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise BenchError(f"config key {where}.sweep.{knob} must be a non-empty list of values (got {values!r}): "
                             f"write e.g. `sweep: {{{knob}: [...]}}`")
    both = sorted(set(sweep) & set(knobs))
    if both:
        raise BenchError(f"config {where} both fixes and sweeps {both[0]!r}: keep it in `knobs` or in `sweep`, not both")
    _merge(DEFAULTS["fit"], entry.get("fit") or {}, f"{where}.fit.")


def apply_quick(config: dict[str, Any]) -> dict[str, Any]:
    """Overlay the config's ``quick`` section (smaller subset, fewer knob values, shorter budgets)."""
    quick = dict(config["quick"])
    points = quick.pop("sweep_points", None)
    out = _merge(config, quick, "quick.", DEFAULTS)
    if points:
        for entry in out["methods"]:
            for knob, values in (entry.get("sweep") or {}).items():
                if len(values) > points:
                    step = (len(values) - 1) / (points - 1) if points > 1 else 0
                    entry["sweep"][knob] = [values[round(i * step)] for i in range(points)]
    return out


def registered_entries(names: set[str]) -> list[dict[str, Any]]:
    """Config entries (declared default sweep) for registered methods that a config does not list."""
    from methods import REGISTRY

    unknown = sorted(names - set(REGISTRY))
    if unknown:
        raise BenchError(f"--methods names {unknown}, neither a method of the config nor a registered one: choose from "
                         f"{sorted(REGISTRY)}, or load your plug-in with --plugins MODULE")
    return [{"method": name} for name in sorted(names)]


def expand(entry: dict[str, Any], registry: dict[str, Any]) -> list[dict[str, Any]]:
    """Knob settings of one ``methods`` entry: the cartesian product of its sweep over its fixed knobs."""
    from methods import create

    method = entry["method"]
    reducer_cls = type(create(method))  # validates the name
    sweep = entry.get("sweep")
    if sweep is None:
        sweep = {k.name: list(k.sweep) for k in reducer_cls.knobs if k.sweep}
    fixed = dict(entry.get("knobs") or {})
    names = list(sweep)
    settings = []
    for values in itertools.product(*(sweep[n] for n in names)) if names else [()]:
        knobs = {**fixed, **dict(zip(names, values))}
        create(method, **knobs)  # reject impossible values before anything runs
        settings.append(knobs)
    return settings
