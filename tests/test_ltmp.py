"""LTMP / LTP / LTM: straight-through masks, the FLOPs ratio, masked == dropping, batch == single, training."""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable

import pytest
import timm
import torch
import torch.nn.functional as F

import methods
from bench.errors import BenchError
from bench.flops import block_macs, image_macs
from bench.models import EMBEDDED_MODEL
from bench.runner import evaluation_r_flops
from methods import ragged
from methods.base import FitReport, budgeted_batches
from methods.blocks import ReductionContext, masked_softmax
from methods.ltmp import flops_ratio, lr_factor, merge_into_kept
from methods.tokens import straight_through_step
from tests.conftest import hand_dims, tiny_vit

LEARNED = ("ltmp", "ltm", "ltp")


def peaked_vit(**kwargs):
    """Random weights give near-uniform attention; scaling qkv makes importance and similarity spread out."""
    model = tiny_vit(**kwargs)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(6)
    return model


def with_thresholds(name: str, seed: int, model_options: dict | None = None, **knobs):
    """The peaked tiny ViT (built with ``model_options``) patched by ``name`` at random thresholds that reduce tokens,
    and 4 random images."""
    model = peaked_vit(**(model_options or {}))
    reducer = methods.create(name, trace_source=True, **knobs)
    reducer.apply(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        reducer.theta_merge.copy_(torch.rand(4, generator=generator) * 0.4 + 0.4)
        reducer.theta_prune.copy_(torch.rand(4, generator=generator) * 0.01 + 0.008)
    return model, reducer, torch.randn(4, 3, 32, 32, generator=generator)


def hand_thresholds(name: str, depth: int, theta_prune: list[float] | None = None, **knobs):
    """``name``'s reducer with thresholds for ``depth`` blocks (``knobs``' initial values, or ``theta_prune``) and the
    inference form's per-block decisions set, for calling its decision rules on hand-built token sets."""
    reducer = methods.create(name, **knobs)
    reducer.check_model(SimpleNamespace(blocks=[None] * depth))
    if theta_prune is not None:
        reducer.theta_prune = torch.nn.Parameter(torch.tensor(theta_prune))
    reducer._active = reducer._active_layers()
    return reducer


def stub_fit_clock(monkeypatch, start: float, end: float) -> None:
    """LTMP's fit reads ``time.perf_counter`` when it starts and when it ends: make those ``start`` and ``end``."""
    clock = iter([start, end])
    monkeypatch.setattr("methods.ltmp.time", SimpleNamespace(perf_counter=lambda: next(clock)))


def test_straight_through_forward_is_exactly_binary_and_gradient_is_the_sigmoids() -> None:
    value = torch.linspace(-1, 1, 101, requires_grad=True)
    threshold = torch.tensor(0.013, requires_grad=True)
    out = straight_through_step(value, threshold, 0.5)
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(out, (value > threshold).float())
    assert torch.equal(1 - out, (value <= threshold).float())  # exact: no 1 - 6e-8 leftovers
    out.sum().backward()
    soft = torch.sigmoid((value.detach() - 0.013) / 0.5)
    assert torch.allclose(value.grad, soft * (1 - soft) / 0.5)
    assert threshold.grad == pytest.approx(-float((soft * (1 - soft) / 0.5).sum()), rel=1e-5)
    assert float(value.grad[50]) > 0.4  # near the threshold the gradient is large (0.5 at the threshold)


def test_flops_ratio_hand_values() -> None:
    ones = [torch.tensor(1.0)] * 3
    assert float(flops_ratio(ones, ones, tokens=10, dim=2)) == pytest.approx(1.0)
    # n=10, d=2, m0 = m1 = 0.5: (2*.5*10*4 + (5)^2*2 + 4*.5*10*4) / (6*10*4 + 100*2) = 170/440
    half = [torch.tensor(0.5)]
    assert float(flops_ratio(half, half, tokens=10, dim=2)) == pytest.approx(170 / 440)
    # two layers: (1, 0.5) -> (2*10*4 + 100*2 + 4*.5*10*4)/440 = 360/440; (0.5, 0.5) -> 170/440; mean
    value = flops_ratio([torch.tensor(1.0), torch.tensor(0.5)], [torch.tensor(0.5), torch.tensor(0.5)], 10, 2)
    assert float(value) == pytest.approx((360 / 440 + 170 / 440) / 2)


def test_evaluation_r_flops_is_the_papers_ratio_of_the_mean_token_fractions() -> None:
    """10 tokens, width 2: block 1 keeps 10 for attention and 5 for the MLP -> 360/440; block 2 sees 5 and 5 ->
    170/440 (see test_flops_ratio_hand_values); the mean of the two."""
    dims = SimpleNamespace(tokens=10, dim=2)
    tokens_mean = torch.tensor([[10.0, 5.0], [5.0, 5.0]])
    assert evaluation_r_flops(tokens_mean, dims) == pytest.approx((360 / 440 + 170 / 440) / 2)


@pytest.mark.parametrize("seed, model_options", [(0, {}), (1, {}), (2, {}), (0, {"qk_norm": True})])
@pytest.mark.parametrize("name", LEARNED)
def test_masked_training_form_equals_dropping_inference_form(name: str, seed: int, model_options: dict) -> None:
    """The two forms keep the same tokens and give the same logits; with qk-norm too (the dropping form's grouped
    attention normalises queries and keys itself)."""
    model, reducer, x = with_thresholds(name, seed, model_options)
    ctx = model._reduction_ctx
    with torch.no_grad():
        reducer.masked = False
        dropped, dropped_counts = model(x), ctx.counts()
        dropped_sources = [ctx.source[i][ctx.alive[i]] if ctx.alive is not None else ctx.source[i] for i in range(4)]
        reducer.masked = True
        masked, masked_counts = model(x), ctx.counts()
        masked_sources = [ctx.source[i][ctx.alive[i] > 0] for i in range(4)]
    assert torch.allclose(dropped, masked, atol=1e-4)
    assert torch.equal(dropped_counts, masked_counts)
    assert int(dropped_counts[:, -1, 1].min()) < 65  # the thresholds really reduced something
    for kept_drop, kept_mask in zip(dropped_sources, masked_sources):  # the same kept tokens, same members
        assert torch.equal(kept_drop, kept_mask)


@pytest.mark.parametrize("plan", ["groups", "gpu"])
@pytest.mark.parametrize("name", LEARNED)
def test_batched_inference_equals_batch_one(monkeypatch, name: str, plan: str) -> None:
    """Attention in several groups of images (no price on a group: one per distinct count), and as a GPU plans it
    (its grouping constants, on CPU tensors): one group a block padded to the largest count, the key mask
    carrying the difference."""
    overhead, cap = ((ragged.GROUP_OVERHEAD_MACS["cuda"], ragged.MAX_GROUP_PROBS["cuda"]) if plan == "gpu"
                     else (0.0, ragged.MAX_GROUP_PROBS["cpu"]))
    monkeypatch.setitem(ragged.GROUP_OVERHEAD_MACS, "cpu", overhead)
    monkeypatch.setitem(ragged.MAX_GROUP_PROBS, "cpu", cap)
    spans = []  # per attention call: its groups' (start, end, width)
    planned = ragged.Packing.groups

    def recording(self, *args):
        layout = planned(self, *args)
        spans.append(layout.spans)
        return layout
    monkeypatch.setattr(ragged.Packing, "groups", recording)
    model, reducer, x = with_thresholds(name, 3)
    with torch.no_grad():
        batched = model(x)
        counts = model._reduction_ctx.counts()
        groups = [len(call) for call in spans]  # of the batched pass
        single = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert len(set(counts[:, -1, 1].tolist())) > 1, "images should keep different token counts"
    distinct = [len(set(block.tolist())) for block in counts[:, :, 0].T][-len(groups):]  # per ragged block, its counts
    assert max(distinct) > 1 and groups == ([1] * len(groups) if plan == "gpu" else distinct)
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.equal(batched.argmax(-1), single.argmax(-1))


@pytest.mark.parametrize("name", ["ltmp", "ltp"])
def test_a_model_without_prefix_tokens_keeps_one_token_per_image(name: str) -> None:
    """With no CLS or register token and a prune threshold that no importance exceeds, each image keeps its first
    token rather than none (average pooling then reads that token)."""
    model = peaked_vit(class_token=False, global_pool="avg")
    reducer = methods.create(name, init_prune=1.0, **({"init_merge": 0.0} if name == "ltmp" else {}))
    reducer.apply(model)
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 32, 32))
    assert torch.isfinite(logits).all()
    assert model._reduction_ctx.counts()[:, :, 1].tolist() == [[1] * 4] * 3


def test_an_image_pruned_to_nothing_keeps_its_first_alive_token_in_a_padded_batch() -> None:
    """No prefix token; image 0 holds 4 tokens, image 1 only 2 (the rest of its row is padding). At theta_prune 0.9
    image 0 keeps its token of importance 0.95 and image 1 would keep none: it keeps its first token, not a padded
    position."""
    reducer = hand_thresholds("ltp", 1, init_prune=0.9)
    ctx = ReductionContext(reducer, hand_dims(4, num_prefix=0))
    packing = ctx.repack(ragged.Packing.of_counts(torch.tensor([4, 2]), [4, 2]))
    ctx.stats["importance"] = torch.tensor([[0.1, 0.95, 0.2, 0.3], [0.5, 0.4, 0.0, 0.0]])
    kept, kept_packing = reducer.reduce_packed(0, torch.arange(1.0, 7.0)[:, None], packing, ctx)
    assert kept[:, 0].tolist() == [2.0, 5.0]
    assert kept_packing.count_list == [1, 1]


@pytest.mark.parametrize("name", ["ltmp", "ltp"])
def test_only_prefix_tokens_left_does_not_crash(name: str) -> None:
    model = peaked_vit(reg_tokens=2)
    reducer = methods.create(name, init_prune=1.0, **({"init_merge": 0.0} if name == "ltmp" else {}))
    reducer.apply(model)
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 32, 32))
    counts = model._reduction_ctx.counts()
    assert torch.isfinite(logits).all()
    assert counts[:, 0, 1].tolist() == [3, 3, 3]  # CLS + 2 registers survive, everything else pruned


def test_training_moves_r_flops_toward_target_and_counts_nan_steps() -> None:
    model = peaked_vit()
    reducer = methods.create("ltmp", r_target=0.5, lr_merge=0.05, lr_prune=0.002)
    reducer.apply(model)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 3, 32, 32, generator=generator), torch.randint(0, 10, (64,), generator=generator)

    def ratio_now() -> float:
        reducer.masked = True
        with torch.no_grad():
            model(images[:32])
        reducer.masked = False
        return float(reducer.budget_loss(65, 48)[1])

    before = ratio_now()

    def batches():
        for start in range(0, 64, 16):
            yield images[start:start + 16], labels[start:start + 16]

    report = reducer.fit(model, batches, {"budget_images": 192, "batch_size": 16, "precision": "fp32"}, progress=False)
    after = ratio_now()
    assert before == pytest.approx(1.0, abs=0.02)
    assert abs(after - 0.5) < abs(before - 0.5) - 0.05, (before, after)
    assert report.images_seen == 192 and report.steps == 12 and report.skipped_steps == 0
    assert reducer.theta_merge.min() >= 0 and reducer.theta_prune.max() <= 1
    assert all(p.requires_grad for p in model.parameters())  # the backbone is unfrozen again

    def nan_batches():
        yield torch.full((4, 3, 32, 32), float("nan")), labels[:4]

    nan_report = reducer.fit(model, nan_batches, {"budget_images": 4, "batch_size": 4}, progress=False)
    assert nan_report.skipped_steps == 1


def test_masked_softmax_gradient_grows_as_exp_of_a_dead_keys_lead() -> None:
    """Why ``clip_grad`` exists. Logits (0, g), mask (1, 0): p_0 = w_0 / (w_0 + w_1) with w_j = exp(l_j - g) m_j, so
    p_0 = 1 and dp_0/dm_1 = -w_0 exp(l_1 - g) / w_0^2 = -exp(g) (the dead key's lead g over the alive one)."""
    for gap in (1.0, 10.0, 20.0):
        mask = torch.tensor([1.0, 0.0], requires_grad=True)
        probs = masked_softmax(torch.tensor([0.0, gap], dtype=torch.float64).view(1, 1, 1, 2), mask[None])
        probs[0, 0, 0, 0].backward()
        assert float(probs.detach()[0, 0, 0, 0]) == 1.0
        assert mask.grad.tolist() == pytest.approx([0.0, -torch.e ** gap], rel=1e-6)


def test_a_soft_mask_leaves_its_dead_keys_to_the_masked_softmax() -> None:
    """In the training form the mask is a float carrying a gradient: its dead keys (mask 0) get no -inf bias, so the
    masked softmax's gradient reaches their mask (the paper's exp(l_j) m_j / sum_k exp(l_k) m_k, the test above); the
    bias is the log size only. A hard (bool) mask of the inference form masks its dead keys with -inf."""
    ctx = ReductionContext(methods.create("ltmp"), hand_dims(3))
    ctx.size = torch.tensor([[1.0, 2.0, 1.0, 4.0]])
    ctx.alive = torch.tensor([[1.0, 1.0, 0.0, 1.0]], requires_grad=True)
    assert torch.equal(ctx.attention_bias(), ctx.size.log().view(1, 1, 1, 4))
    ctx.alive = torch.tensor([[True, True, False, True]])
    assert ctx.attention_bias().flatten().tolist() == pytest.approx([0.0, math.log(2.0), -math.inf, math.log(4.0)])


def test_masked_softmax_does_not_trace_its_row_maximum() -> None:
    """The shift by the row maximum cancels in the result, so autograd need not see it: no amax node in the graph, and
    the logits' gradient is still the masked softmax's exact one, ``p_i (g_i - sum_j g_j p_j)`` for upstream ``g``."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    alive = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=generator)
    probs = masked_softmax(logits, alive)
    nodes, seen = [probs.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.extend(parent for parent, _ in node.next_functions)
    assert not [node.name() for node in seen if "max" in node.name().lower()]
    probs.backward(upstream)
    p = probs.detach()
    expected = p * (upstream - (upstream * p).sum(-1, keepdim=True))
    assert torch.allclose(logits.grad, expected, rtol=0, atol=1e-12)


def _thresholds(reducer) -> torch.Tensor:
    """A copy of all of ``reducer``'s thresholds, merge then prune: (2 * depth,)."""
    return torch.cat([reducer.theta_merge.detach(), reducer.theta_prune.detach()])


def _training_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """16 seeded random images for the tiny ViT, (16, 3, 32, 32), and labels (16,)."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator)


#: LTMP knobs whose fit moves the thresholds visibly in a few steps on the tiny ViT (rates x10 / x10^4 the paper's)
FAST_FIT = dict(r_target=0.3, lr_merge=0.05, lr_prune=0.05, init_prune=0.002)


def _fit_tiny(reducer, steps: int = 8) -> tuple[torch.Tensor, torch.Tensor, FitReport]:
    """``steps`` SGD steps of ``reducer`` on a peaked tiny ViT: all its thresholds before and after, and the report."""
    model = peaked_vit()
    reducer.apply(model)
    images, labels = _training_batch()
    before = _thresholds(reducer)
    report = reducer.fit(model, lambda: iter([(images, labels)] * steps), {"budget_images": 16 * steps}, progress=False)
    return before, _thresholds(reducer), report


def _observe_steps(reducer, observe: Callable[[torch.Tensor], None]) -> None:
    """Call ``observe(r_flops)`` in every fit step, when the step computes its budget loss (before its update)."""
    budget_loss = reducer.budget_loss

    def observed(tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        penalty, ratio = budget_loss(tokens, dim)
        observe(ratio)
        return penalty, ratio

    reducer.budget_loss = observed


def test_clip_grad_bounds_every_threshold_step() -> None:
    """With both learning rates 0.05 and the gradient's norm clipped to 1e-3, each step moves the thresholds by at
    most 5e-5 in L2 norm, so 8 steps by at most 4e-4; without clipping the same fit moves them further. The tolerance
    is float32's rounding of the four merge thresholds near 0.9 (half a spacing, 3e-8, per step and threshold: 8 * 3e-8
    * sqrt(4) = 4.8e-7 in norm), which is 1e-3 of the bound, not 1e-5."""
    before, after, report = _fit_tiny(methods.create("ltmp", clip_grad=1e-3, **FAST_FIT))
    assert report.steps == 8 and report.skipped_steps == 0
    assert report.extra["clipped_steps"] == 8 and report.extra["max_grad_norm"] > 1e-3
    assert 0 < float((after - before).norm()) <= 8 * 0.05 * 1e-3 + 4.8e-7
    before, after, report = _fit_tiny(methods.create("ltmp", **FAST_FIT))
    assert report.extra["clipped_steps"] == 0
    assert float((after - before).norm()) > 8 * 0.05 * 1e-3


def test_only_a_tokens_pass_a_gradient_to_the_merge_threshold() -> None:
    """CLS + 4 patches, keys at angles 0, 18.2, 90 and 60 degrees: B = patches 1 and 3, A = patches 2 and 4, whose
    best cosines are cos(18.2 deg) = 0.95 (merges at theta 0.9) and cos(30 deg) = 0.866 (stays). The gradient of the
    alive count with respect to theta_merge is sum over A of sigmoid'(z) / tau, z = (cosine - theta) / tau; CLS and the
    B tokens, which cannot merge, add nothing (their step would otherwise pass sigmoid'((-2 - theta) / tau) / tau)."""
    reducer = methods.create("ltm", tau=0.5)
    reducer.masked = True
    reducer.theta_merge = torch.nn.Parameter(torch.tensor([0.9]))
    ctx = ReductionContext(reducer, hand_dims(4, head_dim=2))
    angles = torch.tensor([0.0, 0.0, math.acos(0.95), math.pi / 2, math.pi / 3])
    ctx.stats["keys"] = torch.stack([angles.cos(), angles.sin()], -1)[None]
    ctx.stats["keys"][0, 0] = torch.tensor([0.0, -1.0])  # CLS: never a candidate
    reducer._decide(0, ctx, torch.randn(1, 5, 3))
    assert ctx.alive.tolist() == [[1.0, 1.0, 0.0, 1.0, 1.0]]
    ctx.alive.sum().backward()
    def slope(cosine: float) -> float:  # d sigmoid((cosine - theta) / tau) / d theta, up to its sign
        s = torch.sigmoid(torch.tensor((cosine - 0.9) / 0.5))
        return float(s * (1 - s) / 0.5)

    assert float(reducer.theta_merge.grad) == pytest.approx(slope(0.95) + slope(math.cos(math.pi / 6)), rel=1e-5)


def test_a_fit_changes_nothing_but_the_thresholds() -> None:
    """On the embedded architecture (random weights), whose conv stem has BatchNorm: two fit steps move the thresholds
    and leave every backbone weight and BatchNorm statistic as it was (the backbone runs in eval mode and frozen),
    compute no gradient for the backbone, and hand its parameters back trainable."""
    torch.manual_seed(0)
    model = timm.create_model(EMBEDDED_MODEL).eval()
    reducer = methods.create("ltmp", **FAST_FIT)
    reducer.apply(model)
    backbone = {name: value.clone() for name, value in model.state_dict().items()}
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    before = _thresholds(reducer)
    reducer.fit(model, lambda: iter([(images, torch.arange(4))] * 2), {"budget_images": 8}, progress=False)
    assert not torch.equal(_thresholds(reducer), before)
    assert all(torch.equal(value, backbone[name]) for name, value in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_the_fit_records_its_largest_gradient_norm(monkeypatch) -> None:
    """``max_grad_norm`` is the largest of the 8 steps' gradient norms (each read where the fit computes it), not the
    last one's."""
    norms = []
    total_norm = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda grads: norms.append(total_norm(grads)) or norms[-1])
    _, _, report = _fit_tiny(methods.create("ltmp", **FAST_FIT))
    assert len(norms) == 8 and max(norms) > norms[-1]
    assert report.extra["max_grad_norm"] == float(max(norms))


@pytest.mark.parametrize("case", ["plain", "clipped", "clamped"])
def test_one_fit_step_is_one_sgd_step_on_the_papers_loss(case: str) -> None:
    """The fit's first step recomputed by hand: the training form's logits on the batch, loss = cross-entropy with
    label smoothing 0.1 + lambda (r_FLOPs - r_target)^2, its gradient g with respect to the thresholds, then
    theta - lr * g (SGD, no momentum), clamped to [0, 1]. "clipped": ``clip_grad`` at 0.75 of g's norm scales g by
    0.75; "clamped": learning rates so large that both kinds of threshold leave [0, 1] before the clamp."""
    knobs = dict(FAST_FIT)
    if case == "clamped":
        knobs.update(lr_merge=1e3, lr_prune=1e3)
    model = peaked_vit()
    reducer = methods.create("ltmp", **knobs)
    reducer.apply(model)
    images, labels = _training_batch()
    dims = model._reduction_ctx.dims
    reducer.masked = True
    loss = F.cross_entropy(model(images), labels, label_smoothing=0.1) + 10.0 * (
        reducer.budget_loss(dims.tokens, dims.dim)[1] - 0.3) ** 2
    reducer.masked = False
    gradient = torch.cat(torch.autograd.grad(loss, [reducer.theta_merge, reducer.theta_prune]))
    scale = 0.75 if case == "clipped" else 1.0
    if case == "clipped":
        reducer.values["clip_grad"] = 0.75 * float(gradient.norm())
    thresholds = _thresholds(reducer)
    rates = torch.tensor([knobs["lr_merge"]] * 4 + [knobs["lr_prune"]] * 4)
    unclamped = thresholds - rates * scale * gradient
    report = reducer.fit(model, lambda: iter([(images, labels)]), {"budget_images": 16}, progress=False)
    assert report.steps == 1 and report.extra["clipped_steps"] == (1 if case == "clipped" else 0)
    after = _thresholds(reducer)
    assert torch.allclose(after, unclamped.clamp(0.0, 1.0), rtol=0, atol=1e-6)
    assert bool((after != thresholds).all())  # every threshold moved
    if case == "clamped":
        assert bool((unclamped[:4] < 0).any() | (unclamped[:4] > 1).any())  # a merge threshold hit a bound
        assert bool((unclamped[4:] < 0).any() | (unclamped[4:] > 1).any())  # and a prune threshold


def test_fit_reports_where_its_r_flops_ended() -> None:
    """``tail_r_flops_mean`` / ``_sd``: mean and sample standard deviation of r_FLOPs over the last quarter of the
    steps (here 2 of 8), the r_FLOPs each step's loss used; ``last_r_flops`` is the last of them."""
    reducer = methods.create("ltmp", r_target=0.5)
    seen = []
    _observe_steps(reducer, lambda ratio: seen.append(float(ratio.detach())))
    _, _, report = _fit_tiny(reducer)
    assert len(seen) == 8 and seen[-2] != seen[-1]  # the thresholds still move
    mean = (seen[-2] + seen[-1]) / 2
    assert report.extra["last_r_flops"] == pytest.approx(seen[-1], abs=1e-7)
    assert report.extra["tail_r_flops_mean"] == pytest.approx(mean, abs=1e-7)
    assert report.extra["tail_r_flops_sd"] == pytest.approx(abs(seen[-1] - seen[-2]) / math.sqrt(2), abs=1e-7)


def test_fit_reports_its_wall_time(monkeypatch) -> None:
    """``wall_time_s`` is the clock's advance over the fit (the fine-tuning cost the results record)."""
    stub_fit_clock(monkeypatch, 10.0, 13.5)
    _, _, report = _fit_tiny(methods.create("ltmp"), steps=1)
    assert report.wall_time_s == 3.5


def test_cosine_lr_schedule_scales_every_step_by_its_hand_computed_factor() -> None:
    """With the gradient clipped to norm 1e-3 in every step, step k of 8 (16 images each, budget 128) moves the
    thresholds by exactly lr * factor_k * 1e-3, factor_k = (1 + cos(pi k / 8)) / 2: 1, 0.96194, 0.85355, 0.69134,
    0.5, 0.30866, 0.14645 for k = 0..6 (the 8th step's move is not observed). ``constant`` moves 1 every step. The
    tolerance is float32's rounding of thresholds near 0.9 (6e-8) against moves of ~1.5e-5 per threshold."""
    knobs = {**FAST_FIT, "clip_grad": 1e-3}
    for schedule, expected in (("cosine", [1.0, 0.96194, 0.85355, 0.69134, 0.5, 0.30866, 0.14645]),
                               ("constant", [1.0] * 7)):
        reducer = methods.create("ltmp", lr_schedule=schedule, **knobs)
        snapshots = []
        _observe_steps(reducer, lambda ratio: snapshots.append(_thresholds(reducer)))
        _, _, report = _fit_tiny(reducer)
        assert report.extra["clipped_steps"] == 8
        moves = [float((b - a).norm()) / (0.05 * 1e-3) for a, b in zip(snapshots, snapshots[1:])]
        assert moves == pytest.approx(expected, abs=1e-3), schedule
    assert lr_factor("cosine", 128, 128) == 0.0 and lr_factor("constant", 100, 128) == 1.0


def test_non_finite_gradient_skips_the_step() -> None:
    """A finite loss can still give an infinite threshold gradient; the step is skipped and counted (an SGD step
    would send the thresholds to a bound of their range)."""
    reducer = methods.create("ltmp", r_target=0.3, lr_merge=0.05)
    reducer.check_model(peaked_vit())
    reducer.theta_merge.register_hook(lambda grad: grad * float("inf"))
    before, after, report = _fit_tiny(reducer, steps=3)
    assert report.steps == 3 and report.skipped_steps == 3
    assert torch.equal(before, after)


def test_learned_state_round_trip() -> None:
    _, reducer, _ = with_thresholds("ltmp", 0)
    state = reducer.learned_state()
    assert torch.equal(state["theta_merge"], reducer.theta_merge.detach())  # each under its own name
    assert torch.equal(state["theta_prune"], reducer.theta_prune.detach())
    other = methods.create("ltmp")
    other.load_learned_state(state)
    assert torch.equal(other.theta_merge, state["theta_merge"]) and torch.equal(other.theta_prune, state["theta_prune"])


def test_inference_merge_touches_merged_rows_only_hand_example() -> None:
    """Image 0: token 3 (size 1, value 10) joins token 2 (size 2, value 4) -> (2 * 4 + 10) / 3 = 6; token 1 is
    pruned. Image 1: token 1 joins token 3, which is pruned, so nothing is written. Kept rows stay as they were."""
    x = torch.tensor([[[0.0], [2.0], [4.0], [10.0]], [[1.0], [3.0], [5.0], [7.0]]])
    source, target = torch.tensor([3, 5]), torch.tensor([2, 7])  # flat positions b * 4 + n
    share = torch.tensor([1 / 3, 1 / 2])  # size of the source over the destination's size after the merge
    keep = torch.tensor([True, False, True, False, True, False, True, False])  # by flat position
    order = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])  # the rows before the merge in any order: row r holds x.flat[order[r]]
    token_rows = torch.argsort(order)
    keep_rows = keep[order]
    kept = x.reshape(8, 1)[order][keep_rows]  # (4, 1) in row order: positions 2, 0, 6, 4
    out = merge_into_kept(x.reshape(8, 1)[order], token_rows, kept.clone(), keep_rows, source, target, share)
    assert out[:, 0].tolist() == pytest.approx([6.0, 0.0, 5.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("name", LEARNED)
def test_blocks_at_the_threshold_bounds_skip_their_statistics_and_both_forms_agree(name: str) -> None:
    """theta_merge = 1 merges nothing (a cosine is at most 1) and theta_prune = 0 prunes nothing (attention is
    positive): the inference form then skips computing keys / importance in that block (and counts no MACs for
    them), and the training form, which computes them, makes the same decisions."""
    model, reducer, x = with_thresholds(name, 4)
    with torch.no_grad():
        reducer.theta_merge[[0, 2]] = 1.0
        reducer.theta_prune[[0, 2]] = 0.0
        reducer.masked = False
        dropped, counts = model(x), model._reduction_ctx.counts()
        needs = [reducer.needs_at(layer) for layer in range(4)]
        dims = model._reduction_ctx.dims
        similarity = [float(reducer.extra_macs(layer, counts[:, layer, 0], counts[:, layer, 1], dims).sum()) for layer in range(4)]
        reducer.masked = True
        masked, masked_counts = model(x), model._reduction_ctx.counts()
        assert reducer.needs_at(0) == reducer.needs  # the training form needs both everywhere (gradients)
    assert needs[0] == needs[2] == frozenset()
    assert needs[1] == needs[3] == reducer.needs
    reducer.masked = False  # GMACs: importance (H * n^2) is counted in blocks 1 and 3 only
    with torch.no_grad():
        model(x)
    expected = sum(block_macs(counts[:, layer, 0], counts[:, layer, 1], dims)
                   + reducer.extra_macs(layer, counts[:, layer, 0], counts[:, layer, 1], dims) for layer in range(4))
    if reducer.prune:
        expected = expected + dims.num_heads * (counts[:, 1, 0].double() ** 2 + counts[:, 3, 0].double() ** 2)
    assert torch.allclose(image_macs(counts, dims, reducer, 0) - dims.head_macs, expected)
    assert similarity[0] == similarity[2] == 0.0 and (similarity[1] > 0) == reducer.merge
    assert torch.equal(counts[:, 0, 0], counts[:, 0, 1]) and torch.equal(counts[:, 2, 0], counts[:, 2, 1])
    assert int(counts[:, -1, 1].min()) < int(counts[:, 0, 1].min())  # the other blocks still reduce
    assert torch.equal(counts, masked_counts)
    assert torch.allclose(dropped, masked, atol=1e-4)


def test_similarity_macs_leave_out_the_prefix_tokens() -> None:
    """A merging block of CLS + 2 registers + 7 patches splits the 7 patches into |A| = 3 and |B| = 4: 3 x 4 cosines
    of 8-wide keys, 96 MACs (the prefix tokens are never compared)."""
    reducer = hand_thresholds("ltm", 1, init_merge=0.5)
    dims = hand_dims(7, head_dim=8, num_prefix=3)
    assert reducer.extra_macs(0, torch.tensor([10]), torch.tensor([10]), dims).tolist() == [96.0]


def test_identical_keys_do_not_merge_at_theta_one() -> None:
    """Patches that are all equal (a zero position embedding) give equal keys, whose computed cosine can round to
    1 + 1e-7; it counts as 1, so theta_merge = 1 keeps every token in both forms, and 0.999 merges them. (Zeroed
    rather than ``pos_embed="none"``, which drops the class token in timm < 1.0.26.)"""
    model = tiny_vit(class_token=True)
    with torch.no_grad():
        model.pos_embed.zero_()
    reducer = methods.create("ltm", init_merge=1.0)
    reducer.apply(model)
    x = torch.ones(2, 3, 32, 32)
    for masked in (False, True):
        reducer.masked = masked
        with torch.no_grad():
            model(x)
        assert model._reduction_ctx.counts()[:, :, 1].min() == 65
    reducer.masked = False
    with torch.no_grad():
        reducer.theta_merge.fill_(0.999)
        model(x)
    assert int(model._reduction_ctx.counts()[0, 0, 1]) == 1 + 32  # every A token merged in block 0


def test_the_last_pair_of_patches_merges_in_both_forms() -> None:
    """CLS + 2 patches, one A and one B token, with equal keys (equal patches, zero position embedding): the A token
    merges into the B token in both forms, so the block ends with 2 tokens."""
    model = tiny_vit(img_size=(4, 8), depth=1)
    with torch.no_grad():
        model.pos_embed.zero_()
    reducer = methods.create("ltm", init_merge=0.5)
    reducer.apply(model)
    for masked in (False, True):
        reducer.masked = masked
        with torch.no_grad():
            model(torch.ones(2, 3, 4, 8))
        assert model._reduction_ctx.counts()[:, 0].tolist() == [[3, 2], [3, 2]]


def test_both_forms_prune_importance_not_above_the_threshold_and_count_zero_as_positive() -> None:
    """CLS + 4 patches of importance 0.25, 0, 0.5 and 0.3. At theta_prune 0.25 a token must be strictly above it:
    the patches of 0.25 and 0 go. At theta_prune 1e-40 (positive, below the smallest normal float) the alive
    token whose importance is 0 counts as positive and stays. Both forms decide the same."""
    reducer = hand_thresholds("ltp", 2, theta_prune=[0.25, 1e-40])
    importance = torch.tensor([[0.6, 0.25, 0.0, 0.5, 0.3]])
    expected = {0: [True, False, False, True, True], 1: [True] * 5}
    x = torch.randn(1, 5, 1)
    for layer, keep_expected in expected.items():
        ctx = ReductionContext(reducer, hand_dims(4, depth=2))
        ctx.stats["importance"] = importance
        keep, pairs = reducer._decide_packed(layer, ctx, ragged.Packing.full(x))
        assert keep.tolist() == [keep_expected] and pairs is None
        reducer.masked = True
        reducer._decide(layer, ctx, x)
        reducer.masked = False
        assert (ctx.alive > 0).tolist() == [keep_expected]


def test_training_form_prune_step_sees_zero_importance_for_dead_tokens_only() -> None:
    """Dead tokens keep importance 0 (so at theta_prune 0 their step is 0 and, as in the reference, no gradient goes
    back through their earlier masks); alive tokens' importance is at least the smallest positive float (so theta 0
    prunes none of them, as the inference form assumes when it skips the block)."""
    model, reducer, x = with_thresholds("ltmp", 5)
    with torch.no_grad():
        reducer.theta_prune.zero_()
    seen = []
    original = reducer._step

    def recording(value: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        seen.append((value.detach().clone(), None if model._reduction_ctx.alive is None else model._reduction_ctx.alive.detach() > 0))
        return original(value, threshold)

    reducer._step = recording
    reducer.masked = True
    with torch.no_grad():
        model(x)
    prune_steps = seen[1::2]  # each block: the merge step, then the prune step
    assert len(prune_steps) == 4
    dead_seen = 0
    for importance, alive_before in prune_steps[1:]:
        assert bool((importance[alive_before] >= torch.finfo(torch.float32).tiny).all())
        assert bool((importance[~alive_before] == 0).all())
        dead_seen += int((~alive_before).sum())
    assert dead_seen > 0


@pytest.mark.parametrize("name, foreign", [("ltp", "lr_merge"), ("ltp", "init_merge"), ("ltm", "lr_prune"),
                                           ("ltm", "init_prune")])
def test_knobs_of_the_missing_decision_are_rejected(name: str, foreign: str) -> None:
    """LTP has no merge thresholds and LTM no prune thresholds: their knobs would change nothing, so naming one is
    an error (one line, naming the knob), and the absent decision's thresholds sit at the bound that decides nothing."""
    with pytest.raises(BenchError, match=f"no knob '{foreign}'"):
        methods.create(name, **{foreign: 0.5})
    reducer = methods.create(name)
    reducer.apply(tiny_vit())
    absent = reducer.theta_merge if name == "ltp" else reducer.theta_prune
    assert torch.equal(absent, torch.full_like(absent, 1.0 if name == "ltp" else 0.0))


def test_budgeted_batches_cross_epochs_and_stop_at_the_budget() -> None:
    """Budget 10 over epochs of batches of 4 and 4: three batches (the last one whole), the third from epoch 2."""
    epochs = []

    def batches():
        epochs.append(len(epochs))
        yield torch.zeros(4, 1), torch.arange(4)
        yield torch.zeros(4, 1), torch.arange(4, 8)

    got = [y.tolist() for _, y in budgeted_batches(batches, 10)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]] and epochs == [0, 1]
    # a budget reached exactly inside an epoch stops there, without the epoch's next batch
    assert [len(y) for _, y in budgeted_batches(lambda: iter([(torch.zeros(4, 1), torch.arange(4))] * 3), 8)] == [4, 4]


@pytest.mark.parametrize("name", ["ltmp", "ltp"])
def test_fit_on_empty_training_data_is_an_error_not_an_endless_loop(name: str) -> None:
    model = tiny_vit()
    reducer = methods.create(name)
    reducer.apply(model)
    epochs = []

    def empty():
        epochs.append(1)
        if len(epochs) > 3:
            raise RuntimeError("fit kept asking for epochs of an empty training set")
        return iter(())

    with pytest.raises(BenchError, match="training data gave no images"):
        reducer.fit(model, empty, {"budget_images": 8, "batch_size": 4}, progress=False)
    assert all(p.requires_grad for p in model.parameters()) and not reducer.masked
