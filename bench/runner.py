"""Turns a config into measured cells: data + model + reducer -> fit -> top-1/GMACs -> latency -> store."""
from __future__ import annotations

import copy
import datetime as dt
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import timm
import torch
from tqdm import tqdm

import methods
from bench import config as config_mod
from bench import distributed
from bench import data as data_mod
from bench import models
from bench.accuracy import evaluate, pack_hits
from bench.config import entry_label
from bench.errors import BenchError
from bench.flops import dense_macs, embed_macs
from bench.latency import heap_policy, paired_ratio, release_heap, steady_heap, time_interleaved
from bench.precision import autocast, check as check_precision, emulation_warning, native_bf16
from bench.store import Store, cell_key, pack_state
from methods.blocks import ModelDims, check_supported
from methods.ltmp import flops_ratio

Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Workload:
    """Everything shared by the cells of one run."""

    config: dict[str, Any]
    model: torch.nn.Module  # the unpatched, loaded model (eval mode)
    checkpoint_sha: str
    dataset: str
    eval_images: int
    eval_batches: Batches
    train_batches: Batches
    device: str
    train_images: int = 0  # size of the training set the fitting methods draw from (0: none is used)
    _latency_inputs: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    #: (precision, batch) settings at which ``model`` was warmed up for timing in this process (it is every cell's
    #: baseline, on the same cached inputs, so later cells need not warm it up again: :func:`time_interleaved`'s ``warm``)
    baseline_warmed: set[tuple[str, int]] = field(default_factory=set, repr=False)

    def latency_inputs(self, batch: int) -> torch.Tensor:
        """The first ``batch`` evaluation images (the set repeated if it is smaller), on the device, cached. Latency is
        timed on real images because input-dependent reducers (LTMP, LTP) keep as many tokens as the image gives: on
        noise their token counts, and so their speed, would not be those their GMACs are counted on."""
        if batch not in self._latency_inputs:
            images, total = [], 0
            while total < batch:
                seen = total
                for x, _ in self.eval_batches():
                    images.append(x)
                    total += len(x)
                    if total >= batch:
                        break
                if total == seen:
                    raise BenchError("the evaluation set is empty: check the dataset path and split")
            self._latency_inputs[batch] = torch.cat(images)[:batch].to(self.device)
        return self._latency_inputs[batch]


def resolve_device(name: str) -> str:
    """cpu, cuda (this rank's GPU under torchrun) or auto."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise BenchError(f"unknown device {name!r}: use cpu, cuda or auto")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(torch.device(name))
    return name


def cpu_identity(cpuinfo: str) -> tuple[str, str | None]:
    """The CPU's model name and its ``vendor family F model M stepping S`` from ``/proc/cpuinfo``'s first processor.

    A virtual machine often shows a bare name ("AMD EPYC"), which hides the generation that sets a CPU's speed
    ratios (family 25 is Zen 3/4, family 26 Zen 5): the numbers tell them apart. ``(name, None)`` where they lack.
    """
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block only
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if not {"cpu family", "model"} <= fields.keys():
        return name, None
    return name, (f"{fields.get('vendor_id', '?')} family {fields['cpu family']} model {fields['model']} "
                  f"stepping {fields.get('stepping', '?')}")


def environment(device: str) -> dict[str, Any]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: cpu_identity falls back to platform's name
        cpuinfo = ""
    cpu, cpu_id = cpu_identity(cpuinfo)
    return {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(), "cpu": cpu,
            "cpu_id": cpu_id, "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "threads": torch.get_num_threads(), "heap": heap_policy(),
            "cpu_isa": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": native_bf16()}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _tensor_batches(split: data_mod.TensorSplit, indices: torch.Tensor, batch_size: int) -> Batches:
    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(indices), batch_size):
            index = indices[start:start + batch_size]
            yield split.normalized(index), split.labels[index]
    return batches


def _loader_batches(dataset: torch.utils.data.Dataset, indices: torch.Tensor, batch_size: int, workers: int,
                    device: str, shuffle_seed: int | None = None) -> Batches:
    """Batches of an ImageFolder subset; ``workers`` decoding processes, at most one per CPU this process may use
    (the ImageNet config's 8 on a 2-core machine would only add memory and DataLoader warnings)."""
    subset = torch.utils.data.Subset(dataset, indices.tolist())
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(workers, cpus)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers, shuffle=generator is not None,
                                             generator=generator, pin_memory=device.startswith("cuda"))
        try:
            yield from loader
        except data_mod.UnreadableImage as exc:  # from a worker, its message is the worker's whole traceback
            raise BenchError(exc.one_line()) from None
    return batches


def _train_order(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))


def prepare(config: dict[str, Any]) -> Workload:
    """Load model and data named by ``config`` (raising one-line errors for bad input)."""
    device = resolve_device(config["device"])
    if config["dataset"] not in ("fashion-mnist", "imagefolder"):
        raise BenchError(f"unknown dataset {config['dataset']!r}: use fashion-mnist or imagefolder (with --data)")
    if config["dataset"] == "fashion-mnist":
        data_mod.resolve_fmnist_dir(config["data_dir"])  # fail on missing data before loading any model
    if config["threads"] is not None:
        torch.set_num_threads(int(config["threads"]))
    model = models.create(config["model"], pretrained=config["pretrained"], checkpoint=config["checkpoint"])
    check_cells_fit(config, model)
    if config["checkpoint"]:
        sha = models.sha256_file(config["checkpoint"])
    elif config["model"] == models.EMBEDDED_MODEL:
        sha = models.verify_embedded_checkpoint()
    else:
        sha = "pretrained" if config["pretrained"] else f"random-seed{config['seed']}"
    model = model.to(device)
    fit_batch = config["fit"]["batch_size"]
    learners = learning_methods(config)
    train_images = 0  # the training set's size, for the epochs a fit took (0: no method fits)
    if config["dataset"] == "fashion-mnist":
        test = data_mod.load_fmnist("test", config["data_dir"])
        indices = data_mod.seeded_subset_indices(len(test), config["limit"], config["seed"])
        eval_batches = _tensor_batches(test, distributed.shard(indices), config["eval_batch_size"])
        if learners:  # the training split is read once, and only where some method fits
            train = data_mod.load_fmnist("train", config["data_dir"])
            train_images = len(train)
            train_batches = _tensor_batches(train, distributed.shard(_train_order(len(train), config["seed"])), fit_batch)
        else:
            train_batches = _no_training_data
        dataset, n_images = "fashion-mnist-test", len(indices)
    else:
        if not config["data"]:
            raise BenchError("dataset imagefolder needs --data PATH (an ImageFolder of evaluation images)")
        folder = data_mod.image_folder(config["data"], model)
        indices = data_mod.seeded_subset_indices(len(folder), config["limit"], config["seed"])
        if len(folder) == 0:
            raise BenchError(f"{config['data']} holds no images: pass --data to an ImageFolder with images")
        eval_batches = _loader_batches(folder, distributed.shard(indices), config["eval_batch_size"], config["workers"], device)
        if config["train_data"]:
            train_folder = data_mod.image_folder(config["train_data"], model)
            train_images = len(train_folder)
            train_batches = _loader_batches(train_folder, distributed.shard(_train_order(len(train_folder), config["seed"])),
                                            fit_batch, config["workers"], device, shuffle_seed=config["seed"] + 1)
        elif learners:  # never fit on the evaluation images: the learned parameters would have seen the test set
            raise BenchError(f"{', '.join(learners)} learn from training images: pass --train-data PATH (an ImageFolder of "
                             "training images, e.g. ImageNet's train split), or --methods without them")
        else:
            train_batches = _no_training_data
        dataset, n_images = f"imagefolder:{Path(config['data']).resolve()}", len(indices)
    if n_images == 0:
        raise BenchError("the evaluation set is empty after --limit: pass a larger --limit")
    if len(distributed.shard(indices)) == 0:
        raise BenchError(f"{n_images} images cannot be shared by more ranks: use fewer processes or a larger --limit")
    if sha.startswith("random-") and distributed.rank() == 0:  # said once the run is sure to start
        print(f"warning: {config['model']} has random weights (neither --pretrained nor --checkpoint): its top-1 is "
              "chance level; GMACs and latency are still measured", file=sys.stderr)
    if config["limit"] is not None and config["limit"] > n_images and distributed.rank() == 0:
        print(f"note: --limit {config['limit']} is more than the {n_images:,} images of {dataset}: all of them are "
              "evaluated", file=sys.stderr)
    return Workload(config, model, sha, dataset, n_images, eval_batches, train_batches, device, train_images=train_images)


def learning_entries(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The config's ``methods`` entries whose method fits on training images."""
    return [entry for entry in config["methods"] if methods.REGISTRY[entry["method"]].trains]


def learning_methods(config: dict[str, Any]) -> list[str]:
    """The config's methods that fit on training images (sorted names; empty when none does)."""
    return sorted({entry["method"] for entry in learning_entries(config)})


def _no_training_data() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    raise BenchError("this run has no training images: pass --train-data PATH")


def entry_fit(config: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The fit settings of one ``methods`` entry: the config's ``fit`` under the entry's own."""
    return {**config["fit"], **(entry.get("fit") or {})}


def fit_budget(work: Workload, entry: dict[str, Any]) -> dict[str, Any]:
    """:func:`entry_fit` with ``budget_epochs``, where set, turned into ``budget_images``: that many passes over the
    training set, rounded up to whole images."""
    fit = entry_fit(work.config, entry)
    epochs = fit.pop("budget_epochs", None)
    if epochs is not None:
        fit["budget_images"] = math.ceil(epochs * work.train_images)
    return fit


def cell_store_key(work: Workload, entry: dict[str, Any], reducer: methods.TokenReducer) -> str:
    """The store key of a cell: the hash of the fields that make it unique (the fit by the images it sees)."""
    config = work.config
    identity = {"model": config["model"], "checkpoint": work.checkpoint_sha, "dataset": work.dataset,
                "images": work.eval_images, "seed": config["seed"], "method": entry["method"], "label": entry_label(entry),
                "knobs": reducer.values, "device": work.device, "eval_precision": config["eval_precision"],
                "fit": fit_budget(work, entry) if reducer.trains else None}
    return cell_key(identity)


def entry_fits(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, fit) of the config's own ``fit`` and of every ``methods`` entry that sets its own (``where`` names it
    in error messages: ``fit`` or ``methods[LABEL].fit``, as :func:`bench.config.check_entry` names entries)."""
    return [("fit", entry_fit(config, {})),
            *((f"methods[{entry_label(entry)}].fit", entry_fit(config, entry)) for entry in config["methods"]
              if entry.get("fit"))]


def named_precisions(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, precision) of every precision the config sets, ``where`` naming the key and its flag for errors."""
    return [("eval_precision (--eval-precision)", config["eval_precision"]),
            *(("latency.precisions (--precisions)", precision) for precision in config["latency"]["precisions"]),
            *((f"{where}.precision", fit["precision"]) for where, fit in entry_fits(config))]


def run_precisions(config: dict[str, Any]) -> dict[str, list[str]]:
    """Every precision the run uses, by setting: evaluation, latency, and the fits of the methods that train (an
    entry's own ``fit.precision`` included)."""
    fitted = [entry_fit(config, entry)["precision"] for entry in learning_entries(config)]
    return {"eval_precision": [config["eval_precision"]], "latency.precisions": list(config["latency"]["precisions"]),
            "fit.precision": fitted}


def check_data_settings(config: dict[str, Any]) -> None:
    """Raise :class:`BenchError` for a data setting the run's dataset would silently ignore: Fashion-MNIST has its
    own training split and no ImageFolder, an ImageFolder run reads no Fashion-MNIST files."""
    if config["dataset"] == "fashion-mnist":
        if config["train_data"]:
            raise BenchError(f"train_data (--train-data) {config['train_data']} is for ImageFolder runs, but this run "
                             "evaluates Fashion-MNIST, whose methods fit on its own training split: drop --train-data, "
                             "or pass --data PATH too")
        if config["data"]:
            raise BenchError(f"data {config['data']} is set but the config's dataset is fashion-mnist: set "
                             "`dataset: imagefolder` in the config, or pass --data PATH")
    elif config["data_dir"]:
        raise BenchError(f"data_dir (--data-dir) {config['data_dir']} names Fashion-MNIST's files, but this run "
                         "evaluates an ImageFolder: drop --data-dir, or drop --data to evaluate Fashion-MNIST")


def check_settings(config: dict[str, Any], device: str) -> None:
    """Raise :class:`BenchError` naming the fix for a run setting that could only fail later, after cells were
    measured: precisions this device cannot run, and batch sizes, iteration counts, timing windows and fit budgets
    out of range (in the config's ``fit`` and in each entry's own)."""
    check_data_settings(config)
    for where, precision in named_precisions(config):
        check_precision(device, precision, where)  # unknown names, fp16 on the CPU
    counts = {"latency batch size": config["latency"]["batch_sizes"], "eval_batch_size": [config["eval_batch_size"]],
              "latency.min_iters": [config["latency"]["min_iters"]],
              "threads": [] if config["threads"] is None else [config["threads"]],
              **{f"{where}.batch_size": [fit["batch_size"]] for where, fit in entry_fits(config)}}
    for name, values in counts.items():
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BenchError(f"{name} must be a positive whole number (got {value!r}): fix the config or the flag")
    for name in ("warmup_s", "min_time_s"):
        if not isinstance(config["latency"][name], (int, float)) or config["latency"][name] < 0:
            raise BenchError(f"latency.{name} must be a number of seconds >= 0 (got {config['latency'][name]!r})")
    for where, fit in entry_fits(config):
        images, epochs = fit["budget_images"], fit["budget_epochs"]
        if isinstance(images, bool) or not isinstance(images, int) or images < 0:
            raise BenchError(f"{where}.budget_images must be a whole number of images >= 0 (got {images!r})")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0):
            raise BenchError(f"{where}.budget_epochs must be a number of passes over the training set > 0, or null for "
                             f"budget_images (got {epochs!r})")


def planned_cells(config: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(entry, knobs) pairs of the run, validated before anything is measured."""
    if not config["methods"]:
        raise BenchError("the config lists no methods: add entries under `methods:` (e.g. `- method: none`), or pass "
                         "--methods none,tome")
    cells = []
    for entry in config["methods"]:
        for knobs in config_mod.expand(entry, methods.REGISTRY):
            cells.append((entry, knobs))
    return cells


def check_cells_fit(config: dict[str, Any], model: torch.nn.Module) -> None:
    """Raise :class:`BenchError` where ``model`` cannot be token-reduced, or where a planned cell's knobs are
    impossible on it (e.g. ToMe merging more than half its tokens), before the first cell is measured."""
    check_supported(model)
    for entry, knobs in planned_cells(config):
        methods.create(entry["method"], **knobs).check_model(model)


def evaluation_r_flops(tokens_mean: torch.Tensor, dims: ModelDims) -> float:
    """The paper's r_FLOPs (:func:`methods.ltmp.flops_ratio`, what LTMP's budget loss drives toward r_target) on the
    evaluation set: ``tokens_mean: (depth, 2)`` mean tokens per image entering each block's attention and MLP, as
    fractions of the unreduced count."""
    fractions = tokens_mean.double() / dims.tokens
    return float(flops_ratio(list(fractions[:, 0]), list(fractions[:, 1]), dims.tokens, dims.dim))


def measure_cell(work: Workload, entry: dict[str, Any], knobs: dict[str, Any], store: Store | None,
                 progress: bool) -> dict[str, Any]:
    """Fit (if the method trains), evaluate, time, and write one cell in one transaction.

    Under torchrun every rank fits and evaluates its shard; rank 0 (``store`` given) times and writes."""
    config = work.config
    fit_config = fit_budget(work, entry)
    reducer = methods.create(entry["method"], **knobs)
    key = cell_store_key(work, entry, reducer)
    model = reducer.apply(copy.deepcopy(work.model))
    world = max(1, int(os.environ.get("WORLD_SIZE", "1"))) if distributed.active() else 1
    per_rank = {**fit_config, "budget_images": -(-int(fit_config["budget_images"]) // world)}  # the budget is global
    fit_report = reducer.fit(model, work.train_batches, per_rank, progress=progress)
    fit_report.images_seen = int(distributed.all_reduce(torch.tensor([fit_report.images_seen]))[0])
    fit_report.epochs = fit_report.images_seen / work.train_images if work.train_images else 0.0
    if reducer.trains:  # the fit's free pages, before the evaluation asks for blocks of other sizes (see release_heap)
        release_heap()
    model.eval()
    dims = model._reduction_ctx.dims
    embed = embed_macs(model, dims)
    dense = dense_macs(dims, embed)
    desc = f"{entry_label(entry)} {reducer.describe()}"
    result = evaluate(model, work.eval_batches(), embed, config["eval_precision"], work.device, work.eval_images,
                      progress, desc=desc)
    result.synchronise()
    macs_mean, macs_min, macs_max = result.macs_summary()
    low, high = result.interval()
    timings = []
    latency = config["latency"]
    for precision in latency["precisions"] if store is not None else []:  # latency: one device, rank 0
        for batch in latency["batch_sizes"]:
            x = work.latency_inputs(batch)
            with autocast(work.device, precision):
                measured = time_interleaved({"baseline": lambda: work.model(x), "method": lambda: model(x)},
                                            device=work.device, warmup_iters=latency["warmup_iters"],
                                            warmup_s=latency["warmup_s"], min_iters=latency["min_iters"],
                                            min_time_s=latency["min_time_s"],
                                            warm=("baseline",) if (precision, batch) in work.baseline_warmed else ())
            work.baseline_warmed.add((precision, batch))
            speedup = measured["baseline"].median_ms / measured["method"].median_ms
            speedup_q1, _, speedup_q3 = paired_ratio(measured["baseline"], measured["method"])
            timings.append({"precision": precision, "batch": batch, "threads": torch.get_num_threads(),
                            "median_ms": measured["method"].median_ms, "iqr_ms": measured["method"].iqr_ms,
                            "images_per_s": measured["method"].images_per_s(batch),
                            "baseline_median_ms": measured["baseline"].median_ms,
                            "baseline_iqr_ms": measured["baseline"].iqr_ms, "speedup": speedup,
                            "speedup_q1": speedup_q1, "speedup_q3": speedup_q3,
                            "realisation": speedup / (dense / macs_mean),
                            "iterations": len(measured["method"].times_ms),
                            "page_faults_per_call": measured["method"].page_faults_per_call,
                            "baseline_page_faults_per_call": measured["baseline"].page_faults_per_call,
                            "tf32": str(torch.backends.cuda.matmul.allow_tf32) if work.device.startswith("cuda") else None})
    tokens = result.tokens_mean()
    row = {"cell_key": key, "model": config["model"], "checkpoint_sha": work.checkpoint_sha, "dataset": work.dataset,
           "eval_images": result.images, "method": entry["method"], "knobs": reducer.values, "label": entry_label(entry),
           "device": work.device, "eval_precision": config["eval_precision"], "seed": config["seed"],
           "fit": fit_config if reducer.trains else None,
           "top1": result.top1, "top1_low": low, "top1_high": high, "top5": result.top5, "top1_correct": result.top1_correct,
           "top1_hits": pack_hits(result.image_hits()),
           "gmacs": macs_mean / 1e9, "gmacs_min": macs_min / 1e9, "gmacs_max": macs_max / 1e9,
           "gmacs_dense": dense / 1e9, "gmacs_ratio": dense / macs_mean, "r_flops": evaluation_r_flops(tokens, dims),
           "tokens_attn": tokens[:, 0].tolist(), "tokens_mlp": tokens[:, 1].tolist(),
           "tokens_attn_min": result.token_min[:, 0].tolist(), "tokens_attn_max": result.token_max[:, 0].tolist(),
           "ft_images": fit_report.images_seen, "ft_epochs": fit_report.epochs, "ft_wall_s": fit_report.wall_time_s,
           "ft_device": fit_report.device if reducer.trains else None,
           "ft_extra": {"steps": fit_report.steps, "skipped_steps": fit_report.skipped_steps, **fit_report.extra},
           "learned_state": pack_state(reducer.learned_state()), "env": environment(work.device), "git_commit": git_commit(),
           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if store is not None:
        store.write_cell(row, timings)
    return row


def planned_keys(work: Workload, config: dict[str, Any]) -> list[str]:
    """The store keys of every cell that ``config`` plans on ``work``'s model and data (``config`` may list more
    methods than ``work.config``, e.g. the whole config of a ``--methods`` subset run)."""
    return [cell_store_key(work, entry, methods.create(entry["method"], **knobs))
            for entry, knobs in planned_cells(config)]


def run(work: Workload, store: Store | None, force: bool = False, progress: bool = True,
        echo: Callable[[str], None] = print) -> tuple[dict[str, int], list[str]]:
    """Measure every planned cell of ``work.config`` that the store does not hold yet.
    Returns counts of done/skipped cells and the store keys of all planned cells."""
    plan = planned_cells(work.config)
    config = work.config
    emulated = emulation_warning(run_precisions(config), work.device)
    if emulated and store is not None:  # rank 0, once the store is open and the run sure to start
        print(emulated, file=sys.stderr)
    # Evaluations and fits too run on the kept heap that timing needs (bench.latency.steady_heap): on glibc's default
    # heap, the embedded model's first evaluation (batches of 500) faulted in fresh pages for its large activations on
    # every batch and ran at 150 images/s instead of 280; the cells after the first timing already ran on the kept heap.
    steady_heap()
    done = skipped = 0
    keys = []
    for entry, knobs in tqdm(plan, desc="cells", disable=not progress, leave=False):
        reducer = methods.create(entry["method"], **knobs)
        keys.append(cell_store_key(work, entry, reducer))
        finished = store is not None and store.has(keys[-1])
        if distributed.broadcast_flag(finished) and not force:  # rank 0 holds the store and decides
            skipped += 1
            continue
        tic = time.perf_counter()
        row = measure_cell(work, entry, knobs, store, progress and store is not None)
        release_heap()  # the kept heap's free pages would otherwise pile up from cell to cell
        done += 1
        if store is not None:
            echo(f"{row['label']:>8} {reducer.describe():<32} top-1 {100 * row['top1']:6.2f}%  "
                 f"{row['gmacs']:.4f} GMACs (x{row['gmacs_ratio']:.2f})  [{time.perf_counter() - tic:.0f} s]")
    return {"done": done, "skipped": skipped, "planned": len(plan)}, keys
