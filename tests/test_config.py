"""The run's config from YAML and flags: which base config a command starts from, and what --methods selects."""
from __future__ import annotations

from typing import Any

from bench.cli import build_config, make_parser


def config_of(*argv: str, subset: bool = True) -> dict[str, Any]:
    return build_config(make_parser().parse_args(["run", *argv]), subset=subset)


def sweeps(config: dict[str, Any]) -> dict[str, Any]:
    return {entry.get("label") or entry["method"]: entry.get("sweep") for entry in config["methods"]}


def test_a_model_named_without_a_config_gets_the_papers_sweeps_not_the_embedded_models() -> None:
    """The default config's ToMe r 16/24/32 and scaled learning rates are for the 6-block embedded model; on a
    12-block DeiT, r 32 leaves a few tokens after four blocks."""
    embedded = config_of()
    assert embedded["model"] == "vit_fmnist_convstem" and sweeps(embedded)["tome"] == {"r": [16, 24, 32]}
    deit = config_of("--model", "deit_tiny_patch16_224", "--data", "/images")
    assert deit["model"] == "deit_tiny_patch16_224" and deit["data"] == "/images"
    assert sweeps(deit)["tome"] == {"r": [8, 13, 16]} and sweeps(deit)["ltmp"] == {"r_target": [0.9, 0.8, 0.7, 0.6, 0.5]}
    assert not deit["pretrained"]  # the ImageNet config's pretrained weights only with --pretrained
    assert config_of("--model", "deit_tiny_patch16_224", "--data", "/images", "--pretrained")["pretrained"]
    chosen = config_of("--model", "deit_tiny_patch16_224", "--data", "/images", "--config", "fmnist_default")
    assert sweeps(chosen)["tome"] == {"r": [16, 24, 32]}  # an explicit --config is taken as it is


def test_methods_selects_from_the_config_and_adds_registered_ones_at_their_declared_sweep() -> None:
    chosen = config_of("--methods", "none,ltm,pm-ft")
    assert sweeps(chosen) == {"none": None, "pm-ft": {"keep_rate": [0.6]}, "ltm": None}
    whole = config_of("--methods", "none,ltm", subset=False)
    assert list(sweeps(whole)) == ["none", "tome", "topk", "ltmp", "ltp", "pm", "pm-ft", "ltm"]
