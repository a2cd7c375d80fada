"""Which of timm's ViTs the suite runs (a script, not a test: it builds ~130 models, ~11 minutes on 2 cores).

    python benchmarks/timm_coverage.py                      # vit_*, deit*, flexivit* up to 100 M parameters
    python benchmarks/timm_coverage.py --pattern 'deit*' --max-params 30e6 --methods none,tome,ltmp

For every matching model (random weights, one image at its default size) it checks what the conformance suite
checks on its six families: the model is a timm ``VisionTransformer`` the reducers can patch, the analytic dense
GMACs equal ``FlopCounterMode``'s count (within ``--rtol``), and each method at its ``off`` setting reproduces the
unpatched logits (atol 1e-4). Each model's status is one line; the summary counts them. A model refused with a
one-line error (parallel blocks, attention pooling, another attention) is ``refused``, which is correct behaviour;
``FAILED`` lines are defects.
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import sys
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import methods  # noqa: E402
from bench import models  # noqa: E402,F401  (registers the embedded model)
from bench.errors import BenchError  # noqa: E402
from bench.flops import counted_macs, dense_macs, embed_macs  # noqa: E402
from methods.blocks import ModelDims, check_supported, unpatch_model  # noqa: E402


def parameter_count(name: str) -> int:
    """Parameters of timm model ``name``, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())


def check(name: str, plugins: list[str], rtol: float) -> tuple[str, str]:
    """(status, detail) of one model: ``ok``, ``refused`` (one-line BenchError), ``not a VisionTransformer`` or
    ``FAILED``."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    if not isinstance(model, VisionTransformer):
        return "not a VisionTransformer", type(model).__name__
    try:
        check_supported(model)
        dims = ModelDims.of(model)
    except BenchError as exc:
        return "refused", str(exc)
    image = torch.randn(1, *dims.image_shape, generator=torch.Generator().manual_seed(0))
    counted, analytic = counted_macs(model, image), dense_macs(dims, embed_macs(model, dims))
    if abs(analytic - counted) > rtol * counted:
        return "FAILED", f"dense GMACs {analytic / 1e9:.4f} != FlopCounterMode's {counted / 1e9:.4f}"
    with torch.no_grad():
        reference = model(image)
    for plugin in plugins:
        reducer = methods.create(plugin, **methods.REGISTRY[plugin].off)
        reducer.apply(model)
        reducer.prepare_for_test(model)
        with torch.no_grad():
            logits = model(image)
        unpatch_model(model)
        if not torch.allclose(logits, reference, atol=1e-4):
            return "FAILED", f"{plugin} at its off setting moves the logits by {float((logits - reference).abs().max()):.2e}"
    return "ok", f"{dims.tokens} tokens, {analytic / 1e9:.3f} GMACs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="vit_*,deit*,flexivit*", help="timm model-name patterns, comma-separated")
    parser.add_argument("--max-params", type=float, default=100e6, help="skip larger models (their size, not their kind)")
    parser.add_argument("--methods", default=",".join(sorted(methods.REGISTRY)), help="plug-ins to check, comma-separated")
    parser.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance of the dense GMACs")
    args = parser.parse_args(argv)
    plugins = [name for name in args.methods.split(",") if name]
    unknown = [name for name in plugins if name not in methods.REGISTRY]
    if unknown:
        print(f"error: unknown method {unknown[0]!r}: pick from {', '.join(sorted(methods.REGISTRY))}", file=sys.stderr)
        return 2
    names = sorted({name for pattern in args.pattern.split(",") for name in timm.list_models()
                    if fnmatch.fnmatch(name, pattern)})
    summary: collections.Counter[str] = collections.Counter()
    for name in names:
        if parameter_count(name) > args.max_params:
            summary["larger than --max-params"] += 1
            continue
        try:
            status, detail = check(name, plugins, args.rtol)
        except Exception as exc:  # a defect to report, not to stop the sweep on
            status, detail = "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        summary[status] += 1
        print(f"{status:<24} {name:<48} {detail}", flush=True)
    print(f"\n{len(names)} models match {args.pattern!r} in timm {timm.__version__}: "
          + ", ".join(f"{count} {status}" for status, count in summary.most_common()))
    return 1 if summary["FAILED"] else 0


if __name__ == "__main__":
    sys.exit(main())
