"""``benchmarks/timm_coverage.py``: the script behind the README's count of timm ViTs the suite runs."""
from __future__ import annotations

import pytest
import timm

import methods
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


def test_a_method_that_moves_the_logits_at_its_off_setting_fails_the_run(capsys, monkeypatch) -> None:
    """ToMe's ``off`` made r = 8: it merges, so its logits differ from the unpatched model's, and that is a defect."""
    monkeypatch.setattr(methods.REGISTRY["tome"], "off", {"r": 8})
    assert load_script("timm_coverage").main(["--pattern", "deit_tiny_patch16_224", "--methods", "none,tome"]) == 1
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("FAILED") and "tome at its off setting moves the logits by" in line


def test_a_model_that_raises_is_reported_and_the_sweep_goes_on(capsys, monkeypatch) -> None:
    """An exception in one model's check is a FAILED line with its type and first line; the other model is still checked."""
    coverage = load_script("timm_coverage")
    real_check = coverage.check

    def check(name: str, plugins: list[str], rtol: float) -> tuple[str, str]:
        if name == "deit_tiny_patch16_224":
            raise RuntimeError("broken\nsecond line")
        return real_check(name, plugins, rtol)

    monkeypatch.setattr(coverage, "check", check)
    assert coverage.main(["--pattern", "deit_tiny_patch16_224,deit_tiny_distilled_patch16_224", "--methods", "none"]) == 1
    output = capsys.readouterr().out.splitlines()
    assert output[0].split()[:2] == ["ok", "deit_tiny_distilled_patch16_224"]  # names in sorted order
    assert output[1].split() == ["FAILED", "deit_tiny_patch16_224", "RuntimeError:", "broken"]
    assert output[-1].endswith(": 1 ok, 1 FAILED")


def test_models_above_max_params_are_skipped_and_counted(capsys) -> None:
    """DeiT-T has 5.7 M parameters: with ``--max-params 5e6`` it is not built, only counted."""
    assert load_script("timm_coverage").main(["--pattern", "deit_tiny_patch16_224", "--max-params", "5e6"]) == 0
    output = capsys.readouterr().out.strip().splitlines()
    assert output == ["1 models match 'deit_tiny_patch16_224' in timm " + timm.__version__ + ": 1 larger than --max-params"]
