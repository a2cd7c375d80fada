"""Speed benchmarks of the issues' performance bars (a script, not a timed unit test).

    python benchmarks/speed.py tome   # DeiT-S random weights, batch 32: ToMe r=8/13/16 realisation >= 0.9,
                                      # and the patched model at r=0 within 3 % of the unpatched one
    python benchmarks/speed.py ltmp   # LTMP batched inference, embedded model (learned and quantile thresholds)
                                      # and DeiT-S, batch 32: realisation >= 0.8, >= 5x faster per image than batch 1;
                                      # then the embedded model with nothing reduced (LTMP's fixed machinery cost)
    python benchmarks/speed.py pm     # Prune-and-Merge keep_rate 0.6, batch 32: realisation >= 0.9
    python benchmarks/speed.py all --device cuda --precision fp16 --batch 256   # the GPU table (issue #8)

Every ratio is measured with the baseline and the method interleaved (A B A B ...) in one process. The speedup
is the ratio of the medians; the spread printed beside the realisation is the inter-quartile range of the
per-round ratios (round i of the baseline over round i of the method), i.e. how much one pair of runs can
differ on this machine. Results are printed as a table and appended as JSON lines to reports/speed.jsonl or
``--report FILE`` (with the CPU or GPU name and threads). Every model and input is built on ``--device``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import methods  # noqa: E402
from bench import config as bench_config  # noqa: E402
from bench import models  # noqa: E402
from bench.flops import dense_macs, embed_macs, image_macs  # noqa: E402
from bench.latency import paired_ratio, time_interleaved  # noqa: E402
from bench.precision import autocast  # noqa: E402
from bench.errors import BenchError  # noqa: E402
from bench.runner import environment, resolve_device  # noqa: E402
from methods.ragged import Packing  # noqa: E402

REPORT = Path(__file__).resolve().parent.parent / "reports" / "speed.jsonl"


def gmacs_ratio(model: torch.nn.Module, x: torch.Tensor) -> float:
    check_placed(model, x)
    ctx = model._reduction_ctx
    with torch.inference_mode():
        model(x)
    embed = embed_macs(model, ctx.dims)
    return dense_macs(ctx.dims, embed) / float(image_macs(ctx.counts(), ctx.dims, ctx.reducer, embed).mean())


def padding_overhead(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """MACs executed / MACs of the images themselves, for (a) a plain padded batch (every image at the batch's
    largest count in every block) and (b) this suite's ragged execution (token-wise layers on the alive tokens,
    attention in image groups each padded to its own largest count: the groups of DEVICE's plan)."""
    check_placed(model, x)
    ctx = model._reduction_ctx
    attention_excess = []  # per attention call: group-padded minus own (query, key) pair MACs
    original = Packing.groups

    def recording(self, pair_macs: float, *rest):
        groups = original(self, pair_macs, *rest)
        padded_pairs = sum((end - start) * width ** 2 for start, end, width in groups.spans)
        attention_excess.append((padded_pairs - float((self.counts.double() ** 2).sum())) * pair_macs)  # q@k + p@v
        return groups

    Packing.groups = recording
    try:
        with torch.inference_mode():
            model(x)
    finally:
        Packing.groups = original
    counts = ctx.counts()
    embed = embed_macs(model, ctx.dims)
    own = image_macs(counts, ctx.dims, ctx.reducer, embed).sum()
    padded = image_macs(counts.max(0).values.expand_as(counts), ctx.dims, ctx.reducer, embed).sum()
    return float(padded / own), float((own + sum(attention_excess)) / own)


DEVICE = "cpu"  # set from --device: every model and input is built there, and nothing moves while it is measured


def check_placed(*items: torch.nn.Module | torch.Tensor) -> None:
    """Raise unless every module's parameters and every tensor are on DEVICE: a model counted or timed off it would
    fail half-way through a GPU run, or time its copies."""
    for item in items:
        tensor = next(item.parameters(), None) if isinstance(item, torch.nn.Module) else item
        if tensor is not None and tensor.device.type != torch.device(DEVICE).type:
            raise RuntimeError(f"a {type(item).__name__} on {tensor.device} was to be measured on {DEVICE}: build every "
                               "model and input on DEVICE")


def compare(base: torch.nn.Module, reduced: torch.nn.Module, x: torch.Tensor, precision: str, min_time: float) -> dict:
    check_placed(base, reduced, x)
    with autocast(DEVICE, precision):
        # DeiT-S at batch 32 takes ~2 s a forward on 2 cores: 5 warm-up rounds (>= 2 s) and >= 5 timed rounds
        timing = time_interleaved({"base": lambda: base(x), "method": lambda: reduced(x)}, device=DEVICE,
                                  warmup_iters=5, warmup_s=2.0, min_iters=5, min_time_s=min_time)
    low, paired, high = paired_ratio(timing["base"], timing["method"])
    return {"precision": precision, "batch": len(x),
            "base_ms": timing["base"].median_ms, "method_ms": timing["method"].median_ms,
            "base_iqr_ms": timing["base"].iqr_ms, "method_iqr_ms": timing["method"].iqr_ms,
            "speedup": timing["base"].median_ms / timing["method"].median_ms,
            "speedup_paired_median": paired, "speedup_paired_q1": low, "speedup_paired_q3": high,
            "rounds": len(timing["base"].times_ms), "base_page_faults_per_call": timing["base"].page_faults_per_call,
            "method_page_faults_per_call": timing["method"].page_faults_per_call}


def set_thresholds_by_quantile(model: torch.nn.Module, reducer, x: torch.Tensor, merge_q: float, prune_q: float) -> None:
    """Random weights have no trained thresholds: pick each block's thresholds as quantiles of its scores on x,
    layer by layer, so the benchmark exercises real, image-dependent token counts."""
    original = reducer._decide_packed

    def calibrating(layer, ctx_, packing):
        rest = packing.alive.clone()  # the alive non-prefix tokens (the padding holds no scores)
        rest[:, :ctx_.num_prefix] = False
        with torch.no_grad():  # a block left without scores (too few tokens) keeps its thresholds
            if "keys" in ctx_.needs:
                best, _ = reducer._matches(ctx_, rest)
                matched = best[best > -2]  # the A tokens' best cosines (-2: no candidate)
                if matched.numel():
                    reducer.theta_merge[layer] = torch.quantile(matched.float(), merge_q)
            if "importance" in ctx_.needs and bool(rest.any()):
                reducer.theta_prune[layer] = torch.quantile(ctx_.stats["importance"][rest].float(), prune_q)
        return original(layer, ctx_, packing)

    reducer._decide_packed = calibrating
    with torch.no_grad():  # every block active while calibrating, so each computes both statistics
        reducer.theta_merge.fill_(0.5)
        reducer.theta_prune.fill_(0.5)
    with torch.inference_mode():
        model(x)
    del reducer._decide_packed


def row(name: str, result: dict, ratio: float, extra: dict | None = None) -> dict:
    out = {"benchmark": name, **result, "gmacs_ratio": ratio, "realisation": result["speedup"] / ratio,
           "realisation_paired_q1": result["speedup_paired_q1"] / ratio,
           "realisation_paired_q3": result["speedup_paired_q3"] / ratio, **(extra or {}),
           "device": DEVICE, "env": environment(DEVICE)}
    print(f"{name:<34} base {result['base_ms']:8.1f} ms  method {result['method_ms']:8.1f} ms  "
          f"speedup {result['speedup']:.3f}  GMACs x{ratio:.3f}  realisation {out['realisation']:.3f} "
          f"(per-round IQR {out['realisation_paired_q1']:.3f}-{out['realisation_paired_q3']:.3f}, "
          f"{result['rounds']} rounds)")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a") as handle:
        handle.write(json.dumps(out) + "\n")
    return out


def random_deit_small(batch: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """DeiT-S with seeded random weights and a seeded random batch ``(batch, 3, 224, 224)``, both on DEVICE (drawn
    on the CPU, so every device times the same weights and images)."""
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    return model.to(DEVICE), torch.randn(batch, 3, 224, 224).to(DEVICE)


def bench_tome(args: argparse.Namespace) -> None:
    base, x = random_deit_small(args.batch)
    patched = methods.create("tome", r=0).apply(copy.deepcopy(base))
    row(f"tome r=0 (patch overhead) b{args.batch}", compare(base, patched, x, args.precision, args.min_time), 1.0)
    for r in (8, 13, 16):
        model = methods.create("tome", r=r).apply(copy.deepcopy(base))
        row(f"tome r={r} b{args.batch}", compare(base, model, x, args.precision, args.min_time), gmacs_ratio(model, x[:1]))


def learned_thresholds(model: torch.nn.Module, reducer, r_target: float) -> None:
    """Fit the thresholds as the default benchmark does: config fmnist_default's LTMP knobs and fit budget."""
    from bench.data import load_fmnist
    default = bench_config.load("fmnist_default")
    fit = default["fit"]
    train = load_fmnist("train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:fit["budget_images"]]

    def batches():
        for start in range(0, fit["budget_images"], fit["batch_size"]):
            index = order[start:start + fit["batch_size"]]
            yield train.normalized(index), train.labels[index]

    knobs = next(entry.get("knobs", {}) for entry in default["methods"] if entry["method"] == "ltmp")
    reducer.values.update(r_target=r_target, **knobs)
    reducer.fit(model, batches, fit, progress=False)


def bench_ltmp(args: argparse.Namespace) -> None:
    """Batched LTMP inference: realisation at batch ``args.batch`` and the per-image gain over batch 1.

    Three threshold settings on the embedded model (real test images): thresholds learned by the suite's own
    fit at r_target 0.8 and 0.5, and per-block score quantiles (merge 0.6, prune 0.25, the aggressive case);
    DeiT-S with random weights has no meaningful training, so quantiles only.
    """
    from bench.data import load_fmnist
    embedded = models.create(models.EMBEDDED_MODEL).to(DEVICE)
    images = load_fmnist("test").normalized(slice(0, args.batch)).to(DEVICE)
    cases = [("embedded learned r_target=0.8", embedded, images, 0.8),
             ("embedded learned r_target=0.5", embedded, images, 0.5),
             ("embedded quantiles", embedded, images, None),
             ("deit_small quantiles", *random_deit_small(args.batch), None)]
    for name, base, x, r_target in cases:
        model = copy.deepcopy(base)
        reducer = methods.create("ltmp")
        reducer.apply(model)
        if r_target is None:
            set_thresholds_by_quantile(model, reducer, x, merge_q=0.6, prune_q=0.25)
        else:
            learned_thresholds(model, reducer, r_target)
        ratio = gmacs_ratio(model, x)
        padding, executed = padding_overhead(model, x)
        batched = compare(base, model, x, args.precision, args.min_time)
        single = compare(base, model, x[:1], args.precision, args.min_time)
        gains = batching_gains(single, batched, len(x), ratio)
        row(f"ltmp {name} b{args.batch}", batched, ratio,
            {"batch1_method_ms": single["method_ms"], "batch1_base_ms": single["base_ms"], **gains,
             "padded_batch_macs_overhead": padding, "executed_macs_overhead": executed})
        print(f"{'':<34} per image: batch {len(x)} is {gains['per_image_gain_vs_b1']:.1f}x faster than batch 1 (the "
              f"unreduced model: {gains['base_per_image_gain_vs_b1']:.1f}x; at realisation 1: "
              f"{gains['per_image_gain_at_full_realisation']:.1f}x); a plainly padded batch would execute "
              f"{100 * (padding - 1):.0f} % extra MACs, the ragged one executes {100 * (executed - 1):.1f} %")
    bench_ltmp_machinery(embedded, images, args)


def batching_gains(single: dict, batched: dict, batch: int, ratio: float) -> dict[str, float]:
    """How much faster per image a batch of ``batch`` runs than batch 1, from two :func:`compare` results: the method's
    gain, the unreduced model's, and the method's if the batch ran at exactly its GMACs ``ratio`` to the unreduced
    model (realisation 1: what batching can give on this device)."""
    return {"per_image_gain_vs_b1": single["method_ms"] * batch / batched["method_ms"],
            "base_per_image_gain_vs_b1": single["base_ms"] * batch / batched["base_ms"],
            "per_image_gain_at_full_realisation": single["method_ms"] * batch * ratio / batched["base_ms"]}


def bench_ltmp_machinery(base: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace) -> None:
    """What LTMP's machinery costs when it reduces nothing: both decisions active in every block (keys, importance,
    matching, compaction) with thresholds just inside their bounds, so no token is merged or pruned. The speedup
    is then the fixed cost alone (its GMACs ratio is below 1 only by the similarity and importance MACs)."""
    model = copy.deepcopy(base)
    reducer = methods.create("ltmp")
    reducer.apply(model)
    depth = len(model.blocks)
    reducer.load_learned_state({"theta_merge": torch.full((depth,), 1.0 - 1e-6, device=DEVICE),
                                "theta_prune": torch.full((depth,), 1e-30, device=DEVICE)})
    ratio = gmacs_ratio(model, x)
    counts = model._reduction_ctx.counts()
    if not bool((counts == model._reduction_ctx.dims.tokens).all()):
        raise RuntimeError("the machinery-cost case reduced tokens: its thresholds are not inert on these images")
    row(f"ltmp embedded machinery only (nothing reduced) b{len(x)}", compare(base, model, x, args.precision, args.min_time), ratio)


def bench_pm(args: argparse.Namespace) -> None:
    base, x = random_deit_small(args.batch)
    model = copy.deepcopy(base)
    reducer = methods.create("pm", keep_rate=0.6)
    reducer.apply(model)
    reducer.prepare_for_test(model)
    row(f"pm keep_rate=0.6 b{args.batch}", compare(base, model, x, args.precision, args.min_time), gmacs_ratio(model, x[:1]))


def check_args(args: argparse.Namespace) -> str:
    """The device to run on, once every option is known to be usable (before anything is built or timed);
    a bad option raises :class:`BenchError` naming the fix."""
    device = resolve_device(args.device)
    autocast(device, args.precision)  # fp16 only where CUDA autocast is
    for name, value in (("--batch", args.batch), ("--threads", args.threads), ("--min-time", args.min_time)):
        if value is not None and value <= 0:
            raise BenchError(f"{name} must be positive (got {value})")
    return device


def main(argv: list[str] | None = None) -> int:
    global DEVICE, REPORT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["tome", "ltmp", "pm", "all"], help="which method's bars to measure")
    parser.add_argument("--batch", type=int, default=32, help="images per timed forward pass (LTMP adds batch 1)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast precision of the timed passes (fp16: CUDA only)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU latency table: --batch 1 and --batch 256)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--min-time", type=float, default=10.0, help="seconds of timed rounds per comparison")
    parser.add_argument("--report", type=Path, default=REPORT, help=f"JSON-lines file the rows are appended to "
                        f"(default {REPORT.relative_to(REPORT.parent.parent)})")
    args = parser.parse_args(argv)
    REPORT = args.report
    try:
        DEVICE = check_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        for which in (["tome", "ltmp", "pm"] if args.which == "all" else [args.which]):
            {"tome": bench_tome, "ltmp": bench_ltmp, "pm": bench_pm}[which](args)
    except BenchError as exc:  # bad options, missing data or checkpoint; rows already measured stay in REPORT
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
