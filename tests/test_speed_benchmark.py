"""The arithmetic of ``benchmarks/speed.py`` (what issue #5's bars are read from), on fixed times and tiny models."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import methods
from bench.flops import counted_macs
from bench.latency import Timing
from methods import ragged
from tests.conftest import image_batch, load_script, tiny_vit
from tests.test_ltmp import peaked_vit, with_thresholds


def fixed_timings(monkeypatch, speed, base_ms: list[float], method_ms: list[float]) -> None:
    """Make ``speed``'s interleaved timing return these rounds (ms) for the baseline and the method."""
    monkeypatch.setattr(speed, "time_interleaved", lambda fns, **kwargs: {
        "base": Timing(base_ms), "method": Timing(method_ms)})


def test_speedup_and_realisation_of_fixed_times(monkeypatch, tmp_path: Path) -> None:
    """Baseline 30 ms, method 10, 12, 10, 15 ms a round: speedup 30 / 11 (medians), per-round quartiles 2.125 and
    3.0; at a GMACs ratio of 2.5 the realisation is 1.0909 and its per-round interval 0.85-1.2. The row is appended
    to the report as printed."""
    speed = load_script("speed")
    monkeypatch.setattr(speed, "REPORT", tmp_path / "speed.jsonl")
    fixed_timings(monkeypatch, speed, [30.0] * 4, [10.0, 12.0, 10.0, 15.0])
    result = speed.compare(torch.nn.Identity(), torch.nn.Identity(), torch.zeros(4, 1), "fp32", 0.0)
    assert (result["base_ms"], result["method_ms"], result["batch"], result["rounds"]) == (30.0, 11.0, 4, 4)
    assert result["speedup"] == pytest.approx(30 / 11)
    assert (result["speedup_paired_q1"], result["speedup_paired_q3"]) == (2.125, 3.0)
    out = speed.row("fixed", result, 2.5)
    assert out["realisation"] == pytest.approx(30 / 11 / 2.5)
    assert (out["realisation_paired_q1"], out["realisation_paired_q3"]) == pytest.approx((0.85, 1.2))
    stored = json.loads((tmp_path / "speed.jsonl").read_text())
    assert stored["benchmark"] == "fixed" and stored["realisation"] == out["realisation"] and stored["env"]["threads"]


def test_batching_gains_hand_values() -> None:
    """Batch 1: method 7 ms, baseline 4.6 ms; batch 32: method 45 ms, baseline 94 ms; GMACs ratio 2.99. Per image the
    method gains 7 * 32 / 45 = 4.978x, the baseline 4.6 * 32 / 94 = 1.566x, and at realisation 1 (32 images in
    94 / 2.99 ms) the method would gain 7 * 32 * 2.99 / 94 = 7.125x."""
    gains = load_script("speed").batching_gains({"method_ms": 7.0, "base_ms": 4.6}, {"method_ms": 45.0, "base_ms": 94.0},
                                                32, 2.99)
    assert gains == pytest.approx({"per_image_gain_vs_b1": 4.978, "base_per_image_gain_vs_b1": 1.566,
                                   "per_image_gain_at_full_realisation": 7.125}, abs=1e-3)


def test_gmacs_ratio_agrees_with_the_flop_counter() -> None:
    """The ratio the realisation divides by: dense over reduced analytic GMACs, within 1 % of ``FlopCounterMode``'s
    count of the two models on the same image (ToMe r=8 on the tiny ViT)."""
    base = tiny_vit()
    model = methods.create("tome", r=8).apply(tiny_vit())
    x = image_batch(base, batch=1)
    counted = counted_macs(base, x) / counted_macs(model, x)
    assert counted > 1.3 and load_script("speed").gmacs_ratio(model, x) == pytest.approx(counted, rel=0.01)


def test_gmacs_ratio_of_images_with_different_counts_is_over_their_mean() -> None:
    """LTMP leaves four images different counts: the ratio is the unreduced model's MACs over the images' mean MACs,
    each image counted alone by ``FlopCounterMode`` (over their largest, it would be 5 % lower here)."""
    model, _, x = with_thresholds("ltmp", 4)
    alone = [counted_macs(model, x[i:i + 1]) for i in range(len(x))]
    assert max(alone) / (sum(alone) / len(alone)) > 1.03
    expected = counted_macs(tiny_vit(), x[:1]) / (sum(alone) / len(alone))
    assert load_script("speed").gmacs_ratio(model, x) == pytest.approx(expected, rel=0.01)


def test_quantile_thresholds_of_the_first_block_by_hand() -> None:
    """Block 0 sees every token of every image, so its thresholds can be recomputed from the plain timm block: the merge
    threshold is the 0.6 quantile of the A tokens' best key cosine to a B token (keys averaged over heads), the prune
    threshold the 0.9 quantile of the attention each patch receives (mean over heads and queries); CLS is in neither.
    (So aggressive that later blocks are left without a pair to match or a patch to score: they keep their thresholds
    rather than fail on an empty quantile.)"""
    plain = peaked_vit()
    model = copy.deepcopy(plain)
    reducer = methods.create("ltmp")
    reducer.apply(model)
    x = image_batch(model, batch=4)
    load_script("speed").set_thresholds_by_quantile(model, reducer, x, merge_q=0.6, prune_q=0.9)
    block = plain.blocks[0]
    with torch.no_grad():
        tokens = block.norm1(plain.norm_pre(plain._pos_embed(plain.patch_embed(x))))  # (B, N, C)
        batch, n, channels = tokens.shape
        heads = block.attn.num_heads
        q, k, _ = block.attn.qkv(tokens).reshape(batch, n, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        keys = F.normalize(k.mean(1), dim=-1)  # (B, N, d)
        best = (keys[:, 2::2] @ keys[:, 1::2].transpose(1, 2)).max(-1).values  # A = positions 2, 4, ..; B = 1, 3, ..
        received = (q @ k.transpose(-2, -1) * block.attn.scale).softmax(-1).mean(dim=(1, 2))[:, 1:]  # (B, N - 1)
    assert float(reducer.theta_merge.detach()[0]) == pytest.approx(float(torch.quantile(best.flatten(), 0.6)), abs=1e-5)
    assert float(reducer.theta_prune.detach()[0]) == pytest.approx(float(torch.quantile(received.flatten(), 0.9)), rel=1e-4)


def test_padding_overhead_of_plain_and_ragged_batches(monkeypatch) -> None:
    """LTMP at thresholds that leave the four images different counts. A batch padded to its largest count would run
    more MACs than the images' own. The ragged batch runs less than that (its token-wise layers see only the images'
    own tokens) but still more than the images' own: on this tiny model the CPU's plan puts each block's images in one
    attention group padded to the largest count, a group costing more than its padding. With no price on a group,
    every group holds images of one count and the ragged batch runs exactly the images' own MACs."""
    model, _, x = with_thresholds("ltmp", 4)
    speed = load_script("speed")
    padded, executed = speed.padding_overhead(model, x)
    assert len(set(model._reduction_ctx.counts()[:, -1, 1].tolist())) > 1
    assert 1.0 < executed < padded
    # the ragged batch's overhead is what FlopCounterMode counts for it over the four images alone
    alone = [counted_macs(model, x[i:i + 1]) for i in range(len(x))]
    assert executed == pytest.approx(counted_macs(model, x) / sum(alone), rel=2e-3)
    # padding every image to each block's largest count costs more than padding each to the largest image, as no
    # image holds the largest count of every block here
    counts = model._reduction_ctx.counts()
    assert not any(bool((image == counts.max(0).values).all()) for image in counts)
    assert padded > len(x) * max(alone) / sum(alone) * (1 + 1e-3)
    monkeypatch.setitem(ragged.GROUP_OVERHEAD_MACS, "cpu", 0.0)
    assert speed.padding_overhead(model, x) == (padded, 1.0)


def test_a_model_or_input_off_the_measuring_device_is_refused_before_it_runs(monkeypatch) -> None:
    """Every model and input is built on ``--device``: measuring on ``cuda``, a CPU model or input is refused, named,
    before it is timed or counted (moving it there would time the copies, or fail half-way through a GPU run)."""
    speed = load_script("speed")
    monkeypatch.setattr(speed, "DEVICE", "cuda")
    monkeypatch.setattr(speed, "time_interleaved", lambda *args, **kwargs: pytest.fail("timed"))
    with pytest.raises(RuntimeError, match="a Linear on cpu was to be measured on cuda"):
        speed.compare(torch.nn.Identity(), torch.nn.Linear(2, 2), torch.zeros(1, 2), "fp32", 0.0)
    with pytest.raises(RuntimeError, match="a Tensor on cpu was to be measured on cuda"):
        speed.compare(torch.nn.Identity(), torch.nn.Identity(), torch.zeros(1, 2), "fp32", 0.0)
    model, _, x = with_thresholds("ltmp", 4)
    for measure in (speed.gmacs_ratio, speed.padding_overhead):
        with pytest.raises(RuntimeError, match="a ReducedVisionTransformer on cpu"):
            measure(model, x)


def test_rows_go_to_the_report_file_named(monkeypatch, tmp_path: Path) -> None:
    """``pm --report FILE`` appends its row to FILE (its folders made), not to reports/speed.jsonl (fixed times)."""
    speed = load_script("speed")
    monkeypatch.setattr(speed, "REPORT", tmp_path / "default.jsonl")
    fixed_timings(monkeypatch, speed, [30.0] * 5, [20.0] * 5)
    named = tmp_path / "gpu" / "rows.jsonl"
    assert speed.main(["pm", "--batch", "1", "--report", str(named)]) == 0
    (stored,) = [json.loads(line) for line in named.read_text().splitlines()]
    assert stored["benchmark"] == "pm keep_rate=0.6 b1" and stored["speedup"] == 1.5
    assert not (tmp_path / "default.jsonl").exists()
