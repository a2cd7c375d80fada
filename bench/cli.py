"""``run_bench.py``: the command line of the suite.

    python run_bench.py                      # the full benchmark on the embedded default (run, default config)
    python run_bench.py run --quick          # a smaller version of the same (about 2 minutes)
    python run_bench.py run --config imagenet_deit_small --data /imagenet/val --train-data /imagenet/train
    python run_bench.py list                 # methods (knobs, ranges, sweeps), configs, models
    python run_bench.py export               # results.{csv,md,tex} from the store
    python run_bench.py plot --methods ltmp,tome   # figures of those methods (and the baseline) from the store
    python run_bench.py train-base           # retrain the embedded Fashion-MNIST ViT

Every user error ends in one line on stderr naming the fix, and exit code 2; the store is never damaged.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bench import plugins
from bench.errors import BenchError

DEFAULT_STORE = Path("reports") / "results.sqlite"
DEFAULT_REPORTS = Path("reports")
#: the base config of ``--model NAME`` without ``--config``: the papers' sweeps and budgets for 12-block ViTs at 197
#: tokens (the default config's sweeps and learning rates are scaled for the embedded 6-block model)
TIMM_CONFIG = "imagenet_deit_small"
RUN_FLAGS = {  # flag -> config key
    "model": "model", "checkpoint": "checkpoint", "data": "data", "train_data": "train_data", "data_dir": "data_dir",
    "limit": "limit", "device": "device", "threads": "threads", "eval_precision": "eval_precision",
}


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="config name in bench/configs or a YAML path (default "
                        f"fmnist_default; {TIMM_CONFIG} with --model naming another ViT)")
    parser.add_argument("--model", help="timm model name (a ViT)")
    parser.add_argument("--checkpoint", help="local checkpoint file: a state dict or timm-style .pth, .safetensors, "
                        "or a JAX ViT .npz")
    parser.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs the hub or its cache)")
    parser.add_argument("--data", help="ImageFolder with evaluation images (sets dataset to imagefolder)")
    parser.add_argument("--train-data", help="ImageFolder with training images (for methods that fit)")
    parser.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--limit", type=int, help="evaluate a seeded subset of N images")
    parser.add_argument("--methods", help="comma-separated method labels: a subset of the config's, or any registered "
                        "method (at its declared default sweep)")
    parser.add_argument("--device", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--seed", help="draws the --limit subset, orders the images fits train on and seeds random "
                        "weights; each seed is its own setting (baseline, figures, table section); several, "
                        "comma-separated (0,1,2), run one after the other and are reported side by side")
    parser.add_argument("--eval-precision", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--precisions", help="latency precisions, comma-separated (fp32,bf16,fp16)")
    parser.add_argument("--batch-sizes", help="latency batch sizes, comma-separated (e.g. 1,32)")
    parser.add_argument("--quick", action="store_true", help="the config's quick variant")
    parser.add_argument("--force", action="store_true", help="re-measure cells already in the store")
    parser.add_argument("--store", default=str(DEFAULT_STORE), help="SQLite results file")
    parser.add_argument("--reports", default=str(DEFAULT_REPORTS), help="folder for tables and figures")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--plugins", help="your own reducers or timm models to load: modules on PYTHONPATH or .py "
                        "files, comma-separated")


def run_seeds(text: str | None) -> list[int | None]:
    """``--seed``'s seeds in order, duplicates dropped; ``[None]`` (the config's seed) where it is not given."""
    if text is None:
        return [None]
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise BenchError(f"--seed {text!r} is not a whole number or a comma-separated list of them, e.g. --seed 0 or "
                         "--seed 0,1,2") from None
    if any(seed < 0 for seed in seeds):
        raise BenchError(f"--seed {text!r} holds a negative seed: seeds are whole numbers from 0, e.g. --seed 0,1,2")
    return list(dict.fromkeys(seeds))


def build_config(args: argparse.Namespace, subset: bool = True, seed: int | None = None) -> dict[str, Any]:
    """The run's config: the YAML (``--config``; without it the default, or :data:`TIMM_CONFIG` for ``--model``
    naming another ViT), its ``quick`` overlay with ``--quick``, then the flags and ``seed`` (one of ``--seed``'s,
    :func:`run_seeds`). ``--methods`` adds registered methods the config lacks (declared default sweep) and, with
    ``subset``, runs only those named."""
    from bench import config as config_mod

    other_model = args.model is not None and args.model != config_mod.DEFAULTS["model"]
    timm_base = other_model and not args.config
    config = config_mod.load(TIMM_CONFIG if timm_base else args.config)
    if timm_base:
        config["pretrained"] = False  # weights as the flags say: --pretrained, --checkpoint, or random with a warning
    if args.quick:
        config = config_mod.apply_quick(config)
    for flag, key in RUN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            config[key] = value
    if seed is not None:
        config["seed"] = seed
    if args.pretrained:
        config["pretrained"] = True
    if args.data:
        config["dataset"] = "imagefolder"
    if timm_base and not args.data:
        raise BenchError(f"model {args.model!r} needs its data: pass --data PATH (ImageFolder) or --config")
    if args.precisions:
        config["latency"]["precisions"] = args.precisions.split(",")
    if args.batch_sizes:
        try:
            config["latency"]["batch_sizes"] = [int(b) for b in args.batch_sizes.split(",")]
        except ValueError:
            raise BenchError(f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of whole numbers, "
                             "e.g. --batch-sizes 1,32") from None
    if args.methods is not None:
        wanted = config_mod.named_labels(args.methods, ", e.g. --methods none,tome")
        config["methods"] += config_mod.registered_entries(wanted - {config_mod.entry_label(e) for e in config["methods"]})
        if subset:
            config["methods"] = [e for e in config["methods"] if config_mod.entry_label(e) in wanted]
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from bench import distributed, plots, runner, tables, tokenviz
    from bench.store import Store

    seeds = run_seeds(args.seed)
    configs = [build_config(args, seed=seed) for seed in seeds]
    for config in configs:
        runner.planned_cells(config)  # validate every knob before opening anything
    device = runner.resolve_device(configs[0]["device"])
    for config in configs:
        runner.check_settings(config, device)
    tables.reports_dir(args.reports)
    process = distributed.init(device)
    store = None
    try:
        runs, counts = [], {"done": 0, "skipped": 0}  # (work, its keys) of each seed
        for seed, config in zip(seeds, configs):
            work = runner.prepare(config)  # data and model first: bad input creates no store file
            store = store or (Store(args.store) if process.main else None)  # one writer: rank 0
            done, keys = runner.run(work, store, force=args.force, progress=not args.quiet)
            counts = {name: counts[name] + done[name] for name in counts}
            if args.methods:  # report the whole config's cells in the store: a subset rerun keeps the other rows and maps
                keys = runner.planned_keys(work, build_config(args, subset=False, seed=seed))
            runs.append((work, keys))
        if store is None:
            distributed.barrier()
            return 0
        keys = [key for _, run_keys in runs for key in run_keys]
        stored, timings = store.cells(), store.timings()
        cells, timings = stored[stored["cell_key"].isin(keys)], timings[timings["cell_key"].isin(keys)]
        # this config's cells (`export` writes the whole store), with the file names `plot` gives them in this store
        paths = tables.export(cells, timings, args.reports, naming=stored)
        for work, run_keys in runs:
            paths += tokenviz.token_maps_from_run(work, cells[cells["cell_key"].isin(run_keys)], store, args.reports,
                                                  naming=stored)
        paths += plots.plot_cells(cells, timings, args.reports, naming=stored)
        distributed.barrier()
    finally:
        if store is not None:
            store.close()
        distributed.shutdown()
    for seed, group in cells.groupby("seed"):  # one table per seed (its own setting)
        if len(runs) > 1:
            print(f"seed {seed}:")
        print(tables.to_markdown(tables.comparison(group, timings[timings["cell_key"].isin(group["cell_key"])])))
    print(f"{counts['done']} cells measured, {counts['skipped']} already in {args.store}; written: "
          + ", ".join(str(p) for p in paths))
    return 0


def knob_line(knob) -> str:
    """A knob as ``list`` shows it: ``name: type = default``, its allowed values, default sweep and help."""
    if knob.choices:
        allowed = "one of " + ", ".join(map(str, knob.choices))
    elif knob.low is not None and knob.high is not None:
        allowed = f"in [{knob.low}, {knob.high}]"
    elif knob.low is not None or knob.high is not None:
        allowed = f">= {knob.low}" if knob.low is not None else f"<= {knob.high}"
    else:
        allowed = ""
    parts = [f"{knob.name}: {knob.type.__name__} = {knob.default}", allowed,
             f"sweep {list(knob.sweep)}" if knob.sweep else "", knob.help]
    return "  ".join(part for part in parts if part)


def cmd_list(args: argparse.Namespace) -> int:
    import methods
    from bench import config as config_mod
    from bench import models

    print("methods:")
    for name, cls in methods.list_reducers().items():
        print(f"  {name}{'  (trains)' if cls.trains else ''}")
        for knob in cls.knobs:
            print(f"    {knob_line(knob)}")
    print("configs: " + ", ".join(sorted(p.stem for p in config_mod.CONFIG_DIR.glob("*.yaml"))))
    print("datasets: fashion-mnist (embedded default), imagefolder (--data PATH)")
    print(f"models: {models.EMBEDDED_MODEL} (embedded) or any timm ViT, e.g. deit_small_patch16_224")
    return 0


def stored_results(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``export`` and ``plot``: the store's cells and timings, only those of ``--methods`` where given, and every
    cell (which names the settings' files as a run names them)."""
    from bench.settings import select_labels
    from bench.store import read_results

    stored, timings = read_results(args.store)
    cells, timings = select_labels(stored, timings, args.methods) if args.methods is not None else (stored, timings)
    return cells, timings, stored


def cmd_export(args: argparse.Namespace) -> int:
    from bench import tables

    cells, timings, stored = stored_results(args)
    for path in tables.export(cells, timings, args.reports, naming=stored):
        print(path)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from bench import plots

    cells, timings, stored = stored_results(args)
    for path in plots.plot_cells(cells, timings, args.reports, naming=stored):
        print(path)
    return 0


def cmd_train_base(args: argparse.Namespace, rest: list[str]) -> int:
    from bench import train_base

    train_base.main(rest)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_bench.py", description="Token-reduction benchmark for vision transformers")
    sub = parser.add_subparsers(dest="command")
    _add_run_arguments(sub.add_parser("run", help="measure a config's cells (default)"))
    sub.add_parser("list", help="methods, knobs, configs").add_argument("--plugins")
    for name, what in (("export", "tables (results*.{csv,md,tex})"), ("plot", "figures (*.{pdf,svg,png})")):
        p = sub.add_parser(name, help=f"{what} of the cells in the store (nothing is measured)")
        p.add_argument("--store", default=str(DEFAULT_STORE), help="SQLite results file")
        p.add_argument("--reports", default=str(DEFAULT_REPORTS), help=f"folder for the {what.split(' ')[0]}")
        p.add_argument("--methods", help="comma-separated labels to show (the baseline is always shown: every drop, "
                       "ratio and speedup is measured against it)")
        p.add_argument("--plugins", help="the plug-ins the store's methods came from (to name their swept knobs)")
    sub.add_parser("train-base", help="train the embedded Fashion-MNIST ViT (see --help there)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    try:
        if argv[0] == "train-base":
            return cmd_train_base(argparse.Namespace(), argv[1:])
        args = make_parser().parse_args(argv)
        plugins.load_plugins(getattr(args, "plugins", None))

        status = {"run": cmd_run, "list": cmd_list, "export": cmd_export, "plot": cmd_plot}[args.command](args)
        sys.stdout.flush()  # a closed pipe (`list | head`) raises here, not at interpreter exit
        return status
    except BrokenPipeError:  # the reader left: stop quietly, as `ls | head` does (the store is written per cell)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished cells are kept in the store, rerun to continue", file=sys.stderr)
        return 130
