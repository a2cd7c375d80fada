"""The run's config from YAML and flags: which base config a command starts from, and what --methods selects."""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import methods
from bench import cli, config, runner
from bench.cli import build_config, make_parser
from bench.errors import BenchError
from methods.base import Knob, KnobValueError


def config_of(*argv: str, subset: bool = True) -> dict[str, Any]:
    return build_config(make_parser().parse_args(["run", *argv]), subset=subset)


def sweeps(config: dict[str, Any]) -> dict[str, Any]:
    return {entry.get("label") or entry["method"]: entry.get("sweep") for entry in config["methods"]}


def test_a_model_named_without_a_config_gets_the_papers_sweeps_not_the_embedded_models() -> None:
    """The default config's ToMe r 16/24/32 and scaled learning rates are for the 6-block embedded model; on a
    12-block DeiT, r 32 leaves a few tokens after four blocks. The embedded model named by ``--model`` keeps the
    default config; another model without ``--config`` needs ``--data``."""
    embedded = config_of()
    assert embedded["model"] == "vit_fmnist_convstem" and sweeps(embedded)["tome"] == {"r": [16, 24, 32]}
    deit = config_of("--model", "deit_tiny_patch16_224", "--data", "/images")
    assert deit["model"] == "deit_tiny_patch16_224" and deit["data"] == "/images"
    assert sweeps(deit)["tome"] == {"r": [8, 13, 16]} and sweeps(deit)["ltmp"] == {"r_target": [0.9, 0.8, 0.7, 0.6, 0.5]}
    assert not deit["pretrained"]  # the ImageNet config's pretrained weights only with --pretrained
    assert config_of("--model", "deit_tiny_patch16_224", "--data", "/images", "--pretrained")["pretrained"]
    chosen = config_of("--model", "deit_tiny_patch16_224", "--data", "/images", "--config", "fmnist_default")
    assert sweeps(chosen)["tome"] == {"r": [16, 24, 32]}  # an explicit --config is taken as it is
    named = config_of("--model", "vit_fmnist_convstem")  # the embedded model by name: its own config, its own data
    assert sweeps(named)["tome"] == {"r": [16, 24, 32]} and named["dataset"] == "fashion-mnist"
    with pytest.raises(BenchError, match=r"^model 'deit_tiny_patch16_224' needs its data: pass --data PATH"):
        config_of("--model", "deit_tiny_patch16_224")


def test_methods_selects_from_the_config_and_adds_registered_ones_at_their_declared_sweep() -> None:
    chosen = config_of("--methods", "none,ltm,pm-ft")
    assert sweeps(chosen) == {"none": None, "pm-ft": {"keep_rate": [0.6]}, "ltm": None}
    whole = config_of("--methods", "none,ltm", subset=False)
    assert list(sweeps(whole)) == ["none", "tome", "topk", "ltmp", "ltp", "pm", "pm-ft", "ltm"]


def test_each_run_flag_sets_its_config_key() -> None:
    """Flags win over the config: each sets its key, ``--data`` makes the dataset an ImageFolder, ``--precisions`` and
    ``--batch-sizes`` set the latency lists, ``--quick`` applies the config's quick overlay, and each of ``--seed``'s
    seeds (in order, repeats dropped) gets its own config."""
    flagged = config_of("--checkpoint", "w.pt", "--data", "/val", "--train-data", "/train", "--limit", "7",
                        "--device", "cpu", "--threads", "3", "--eval-precision", "bf16", "--precisions", "fp32,bf16",
                        "--batch-sizes", "1,8", "--pretrained")
    assert {key: flagged[key] for key in ("checkpoint", "data", "train_data", "limit", "device", "threads",
                                          "eval_precision", "dataset", "pretrained")} == {
        "checkpoint": "w.pt", "data": "/val", "train_data": "/train", "limit": 7, "device": "cpu", "threads": 3,
        "eval_precision": "bf16", "dataset": "imagefolder", "pretrained": True}
    assert (flagged["latency"]["precisions"], flagged["latency"]["batch_sizes"]) == (["fp32", "bf16"], [1, 8])
    fmnist = config_of("--data-dir", "/f")
    assert (fmnist["data_dir"], fmnist["dataset"]) == ("/f", "fashion-mnist")
    assert config_of("--quick") == config.apply_quick(config.load(None)) != config.load(None)
    assert cli.run_seeds("2,0,2") == [2, 0] and cli.run_seeds(None) == [None]
    args = make_parser().parse_args(["run", "--seed", "2,0"])
    assert [build_config(args, seed=seed)["seed"] for seed in cli.run_seeds(args.seed)] == [2, 0]


MALFORMED = {  # YAML text -> the one-line error's telling part (each raised a TypeError/AttributeError, ran nothing
    # and blamed an empty store, ran with the key ignored, or let the sweep silently override the fixed knob)
    "methods: tome": "config key methods must be a list (got 'tome')",
    "methods:": "config key methods must be a list (got None)",
    "methods: [tome]": "config methods[0] must be a mapping with a method name",
    "methods: [{method: tome, sweep: r}]": "config key methods[tome].sweep must be a mapping (got 'r')",
    "methods: [{method: tome, sweep: {r: []}}]": "methods[tome].sweep.r must be a non-empty list of values",
    "methods: [{method: tome, knobs: {r: 8}, sweep: {r: [4]}}]": "methods[tome] both fixes and sweeps 'r'",
    "methods: [{method: ltmp, label: short, fit: {budget: 3}}]": "unknown config key methods[short].fit.'budget'",
    "methods: [{method: ltmp, fit: {batch_size: 8.5}}]": "methods[ltmp].fit.batch_size must be a whole number",
    "latency: {batch_sizes: 32}": "config key latency.batch_sizes must be a list (got 32)",
    "latency: 5": "config key latency must be a mapping (got 5)",
    "fit: {budget_images: 1e4}": "config key fit.budget_images must be a whole number (got '1e4')",  # YAML 1.1: text
    "seed: true": "config key seed must be a whole number (got True)",
    "seed: 3\nmodel: [unclosed": "is not valid YAML at line 3, column 1 (expected ',' or ']', but got '<stream end>')",
}


@pytest.mark.parametrize("text", list(MALFORMED))
def test_malformed_configs_are_one_line_errors_before_anything_runs(tmp_path: Path, text: str) -> None:
    (tmp_path / "bad.yaml").write_text(text + "\n")
    with pytest.raises(BenchError, match=re.escape(MALFORMED[text])):
        config.load(str(tmp_path / "bad.yaml"))


def test_well_formed_values_of_related_kinds_pass() -> None:
    """A whole number where a number is expected, and None where the default is None, are fine."""
    for key, default, value in [("latency.warmup_s", 2.0, 1), ("fit.budget_epochs", None, 0.5), ("limit", None, 10)]:
        config.check_kind(key, default, value)
    for name in ("fmnist_default", "fmnist_full", "imagenet_deit_small"):  # the shipped configs and their quick runs
        quick = config.apply_quick(config.load(name))
    assert quick["fit"]["budget_epochs"] is None  # null over the config's 1: a kind the defaults allow


def test_quick_thins_each_sweep_to_evenly_spaced_values() -> None:
    """``quick.sweep_points: k`` keeps k values of a longer sweep, evenly spaced and both ends included (index
    round(i * (n - 1) / (k - 1))); a sweep of k or fewer values stays whole; k = 1 keeps the first."""
    base = config.load("fmnist_default")
    base["methods"] = [{"method": "tome", "sweep": {"r": [4, 8, 12, 16, 20]}},
                       {"method": "ltmp", "sweep": {"r_target": [0.9, 0.7, 0.5]}},
                       {"method": "topk", "sweep": {"keep_rate": [0.9, 0.5]}}]
    expected = {3: [[4, 12, 20], [0.9, 0.7, 0.5], [0.9, 0.5]], 2: [[4, 20], [0.9, 0.5], [0.9, 0.5]],
                1: [[4], [0.9], [0.9]]}
    for points, sweeps in expected.items():
        quick = config.apply_quick({**copy.deepcopy(base), "quick": {"sweep_points": points}})
        assert [next(iter(entry["sweep"].values())) for entry in quick["methods"]] == sweeps, points


def test_every_swept_value_is_checked_before_anything_runs() -> None:
    """A sweep whose last value is impossible is refused while its cells are planned, before its first value's cell
    would be measured."""
    with pytest.raises(BenchError, match=r"^knob tome.r=-3 is outside \[0, None\]"):
        config.expand({"method": "tome", "sweep": {"r": [8, -3]}}, methods.REGISTRY)
    assert config.expand({"method": "tome", "knobs": {"trace_source": True}, "sweep": {"r": [8, 16]}},
                         methods.REGISTRY) == [{"trace_source": True, "r": 8}, {"trace_source": True, "r": 16}]


def test_a_config_without_methods_runs_nothing_and_says_so(tmp_path: Path) -> None:
    """``methods: []`` used to run nothing and then blame an empty store; with ``--methods`` it has cells."""
    (tmp_path / "none.yaml").write_text("methods: []\n")
    with pytest.raises(BenchError, match=r"^the config lists no methods: add entries under `methods:`"):
        runner.planned_cells(config_of("--config", str(tmp_path / "none.yaml")))
    cells = runner.planned_cells(config_of("--config", str(tmp_path / "none.yaml"), "--methods", "none,tome"))
    assert [(entry["method"], knobs) for entry, knobs in cells] == [("none", {}), ("tome", {"r": 8}), ("tome", {"r": 13}),
                                                                     ("tome", {"r": 16})]


def test_list_shows_each_knobs_allowed_values() -> None:
    """``list`` printed ``[0.0, None]`` for a knob bounded below only and nothing for a knob of fixed choices."""
    from bench.cli import knob_line

    assert knob_line(Knob("r", int, default=8, low=0, sweep=(8, 16), help="tokens merged")) == \
        "r: int = 8  >= 0  sweep [8, 16]  tokens merged"
    assert knob_line(Knob("t", float, default=0.5, low=0.0, high=1.0)) == "t: float = 0.5  in [0.0, 1.0]"
    assert knob_line(Knob("c", float, default=-1.0, high=0.0)) == "c: float = -1.0  <= 0.0"
    assert knob_line(Knob("regime", str, default="a", choices=("a", "b"), help="which")) == \
        "regime: str = a  one of a, b  which"
    assert knob_line(Knob("flag", bool, default=False)) == "flag: bool = False"


def test_help_without_a_command_is_the_suites_not_runs(capsys) -> None:
    """``run_bench.py --help`` lists the commands; flags without a command are ``run``'s (``run_bench.py --quick``)."""
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as exited:
            cli.main([flag])
        assert exited.value.code == 0
        assert capsys.readouterr().out.startswith("usage: run_bench.py [-h] {run,list,export,plot,train-base} ...")
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--help"])
    assert capsys.readouterr().out.startswith("usage: run_bench.py run [-h]")


def test_list_marks_the_methods_that_train(capsys) -> None:
    """``list`` names each registered method, those that fit before they are measured marked ``(trains)``."""
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    names = {line.split()[0]: line.strip() for line in listed if line.startswith("  ") and not line.startswith("    ")}
    assert set(names) == set(methods.list_reducers())
    assert {name for name, line in names.items() if line.endswith("(trains)")} == \
        {name for name, cls in methods.list_reducers().items() if cls.trains} >= {"ltmp", "ltp", "ltm", "pm"}


def test_knob_values_are_converted_and_checked_against_range_and_choices() -> None:
    """Both ends of the closed range are allowed and nothing beyond them; a choice outside the list and a value of
    the wrong type are refused in one line; booleans read from text (a command line, an environment variable)."""
    ranged = Knob("rate", float, default=0.5, low=0.1, high=0.9)
    assert ranged.check("m", "0.1") == 0.1 and ranged.check("m", 0.9) == 0.9
    assert ranged.check("m", [0.2, "0.3"]) == [0.2, 0.3]  # a sweep: each value checked
    for bad, message in ((0.09, r"knob m.rate=0.09 is outside \[0.1, 0.9\]"), (0.91, r"is outside \[0.1, 0.9\]"),
                         ("x", r"knob m.rate='x' is not a float")):
        with pytest.raises(KnobValueError, match=message):
            ranged.check("m", bad)
    chosen = Knob("schedule", str, default="constant", choices=("constant", "cosine"))
    with pytest.raises(KnobValueError, match=r"is not one of \['constant', 'cosine'\]"):
        chosen.check("m", "linear")
    flag = Knob("fuse", bool, default=True)
    assert [flag.check("m", text) for text in ("true", "Yes", "1", "on", "false", "0", "no")] == [True] * 4 + [False] * 3


def test_every_identity_field_of_a_cell_changes_its_store_key() -> None:
    """A cell is re-measured, never reused, when its model, weights, data, image count, seed, knobs, device,
    evaluation precision or fit budget differ: each such change gives another key; naming a knob at its default
    does not."""
    config_base = {"model": "m", "seed": 0, "eval_precision": "fp32", "fit": {"budget_images": 64, "batch_size": 16}}
    work = runner.Workload(config_base, torch.nn.Identity(), "sha", "d", 100, None, None, "cpu", train_images=1000)
    entry = {"method": "ltmp", "knobs": {"r_target": 0.7}}

    def key(work=work, entry=entry) -> str:
        return runner.cell_store_key(work, entry, methods.create(entry["method"], **entry.get("knobs", {})))

    variants = [key(), key(entry={"method": "ltmp", "knobs": {"r_target": 0.6}}), key(entry={"method": "ltp",
                "knobs": {"r_target": 0.7}}), key(entry={**entry, "label": "ltmp-b"})]
    for field, value in (("checkpoint_sha", "other"), ("dataset", "e"), ("eval_images", 50), ("device", "cuda")):
        variants.append(key(work=dataclasses.replace(work, **{field: value})))
    for field, value in (("model", "n"), ("seed", 1), ("eval_precision", "bf16"),
                         ("fit", {"budget_images": 128, "batch_size": 16})):
        variants.append(key(work=dataclasses.replace(work, config={**config_base, field: value})))
    assert len(set(variants)) == len(variants) == 12
    assert key(entry={"method": "ltmp", "knobs": {"r_target": 0.7, "lr_schedule": "constant"}}) == variants[0]  # a default
