"""``benchmarks/timm_coverage.py``: the script behind the README's count of timm ViTs the suite runs."""
from __future__ import annotations

import pytest
import timm

from tests.conftest import load_script

#: one model of each outcome, all small: a DeiT that runs, a ViT whose DiffAttention is refused in one line, and an
#: Eva (rotary embeddings) that is not a timm VisionTransformer
MODELS = "deit_tiny_patch16_224,vit_dwee_patch16_reg1_gap_256,vit_pe_core_tiny_patch16_384"


def test_each_outcome_is_reported_and_counted(capsys) -> None:
    missing = sorted(set(MODELS.split(",")) - set(timm.list_models()))
    if missing:
        pytest.skip(f"this timm {timm.__version__} has no {', '.join(missing)} (added in later versions)")
    coverage = load_script("timm_coverage")
    assert coverage.main(["--pattern", MODELS, "--methods", "none,tome,ltmp"]) == 0
    output = capsys.readouterr().out.splitlines()
    lines = {name: next(line for line in output if f" {name} " in line) for name in MODELS.split(",")}
    statuses = {name: line[:24].strip() for name, line in lines.items()}  # the script's status column
    assert statuses == {"deit_tiny_patch16_224": "ok", "vit_dwee_patch16_reg1_gap_256": "refused",
                        "vit_pe_core_tiny_patch16_384": "not a VisionTransformer"}, lines
    assert "197 tokens, 1.254 GMACs" in lines["deit_tiny_patch16_224"]  # DeiT-T (checked equal to FlopCounterMode's count)
    assert "DiffAttention" in lines["vit_dwee_patch16_reg1_gap_256"]
    summary = output[-1]
    assert summary.startswith("3 models match") and all(f"1 {status}" in summary for status in statuses.values())


def test_a_gmacs_mismatch_fails_the_run(capsys, monkeypatch) -> None:
    """An analytic count that disagrees with FlopCounterMode is a defect: FAILED, exit code 1."""
    coverage = load_script("timm_coverage")
    monkeypatch.setattr(coverage, "dense_macs", lambda dims, embed: 1)
    assert coverage.main(["--pattern", "deit_tiny_patch16_224", "--methods", "none"]) == 1
    assert capsys.readouterr().out.startswith("FAILED")


def test_unknown_method_is_one_line_and_exit_2(capsys) -> None:
    assert load_script("timm_coverage").main(["--methods", "none,nope"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unknown method 'nope'" in lines[0], lines
