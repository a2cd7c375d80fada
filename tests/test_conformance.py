"""The conformance suite: runs on every registered plug-in, so a new plug-in gets it for free."""
from __future__ import annotations

import inspect
import re

import pytest
import torch
from timm.models.vision_transformer import Attention, ParallelScalingBlock, VisionTransformer

import methods
from bench.errors import BenchError
from bench.flops import embed_macs, image_macs
from methods.none import NoReduction
from tests.conftest import TIMM_MODELS, image_batch, timm_vit, tiny_vit

PLUGINS = sorted(methods.REGISTRY)


def make(name: str, **knobs) -> methods.TokenReducer:
    reducer = methods.create(name, **knobs)
    reducer.trace_source = True
    return reducer


def reducing_knobs(name: str) -> dict:
    """The strongest setting of the plug-in's monotone sweep."""
    sweep = methods.REGISTRY[name].monotone_sweep()
    if sweep is None:
        return {}
    knob, values = sweep
    return {knob: values[-1]}


def prepared(name: str, model=None, **knobs):
    model = model if model is not None else tiny_vit()
    reducer = make(name, **knobs)
    reducer.apply(model)
    reducer.prepare_for_test(model)
    return model, reducer


def skip_unless_vit_takes(options: dict, what: str) -> None:
    """Skip where this timm's ``VisionTransformer`` has no constructor argument for ``options``."""
    if not options.keys() <= inspect.signature(VisionTransformer.__init__).parameters.keys():
        pytest.skip(f"this timm's VisionTransformer has no {what} (timm < 1.0.23 has no attn_layer)")


def assert_off_setting_reproduces(plugin: str, model) -> None:
    """``plugin`` at its ``off`` knobs gives ``model``'s unpatched logits (atol 1e-5)."""
    x = image_batch(model)
    with torch.no_grad():
        reference = model(x)
        patched, _ = prepared(plugin, model, **methods.REGISTRY[plugin].off)
        assert torch.allclose(patched(x), reference, atol=1e-5)


@pytest.mark.parametrize("model_name", sorted(TIMM_MODELS))
@pytest.mark.parametrize("plugin", PLUGINS)
def test_off_setting_reproduces_unpatched_logits(plugin: str, model_name: str) -> None:
    assert_off_setting_reproduces(plugin, timm_vit(model_name))


class GatedAttention(Attention):
    """timm's Attention with its output gate on (no ViT constructor option sets it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, gated=True, **kwargs)


ATTENTION_OPTIONS = {  # timm Attention options no TIMM_MODELS family uses, on the tiny ViT
    "qk_norm and scale_norm": {"qk_norm": True, "scale_attn_norm": True},
    "gated attention": {"attn_layer": GatedAttention},
}


@pytest.mark.parametrize("options", sorted(ATTENTION_OPTIONS))
@pytest.mark.parametrize("plugin", PLUGINS)
def test_off_setting_reproduces_unpatched_logits_with_every_attention_option(plugin: str, options: str) -> None:
    """As above, on attention with normalised queries and keys, a normalised output, or an output gate: the patched
    attention applies each of timm's modules where timm's does."""
    skip_unless_vit_takes(ATTENTION_OPTIONS[options], options)
    assert_off_setting_reproduces(plugin, tiny_vit(**ATTENTION_OPTIONS[options]))


@pytest.mark.parametrize("fused", [True, False])
def test_training_mode_applies_the_attention_dropout_as_timm_does(fused: bool) -> None:
    """In training mode at attention dropout 1 every attention weight is dropped, in timm's attention and in the
    patched one (fused SDPA or explicit probabilities), so the patched model's logits equal the unpatched model's,
    and both differ from the evaluation-mode logits."""
    model = tiny_vit(attn_drop_rate=1.0)
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = image_batch(model)
    with torch.no_grad():
        evaluated = model(x)
        reference = model.train()(x)
        patched, _ = prepared("none", model)
        assert torch.allclose(patched(x), reference, atol=1e-5)
    assert not torch.allclose(reference, evaluated, atol=1e-2)


@pytest.mark.parametrize("model_name", sorted(TIMM_MODELS))
@pytest.mark.parametrize("plugin", PLUGINS)
def test_prefix_tokens_survive_reduction(plugin: str, model_name: str) -> None:
    model, reducer = prepared(plugin, timm_vit(model_name), **reducing_knobs(plugin))
    with torch.no_grad():
        logits = model(image_batch(model))
    ctx = model._reduction_ctx
    prefix = ctx.num_prefix
    assert logits.ndim == 2 and logits.shape[0] == 2 and torch.isfinite(logits).all()
    assert prefix == model.num_prefix_tokens
    # source map: the first `prefix` tokens still hold exactly their own patch position
    source = ctx.source
    assert torch.equal(source[:, :prefix, :prefix], torch.eye(prefix).expand(2, prefix, prefix))
    assert source[:, :prefix, prefix:].sum() == 0
    assert source[:, prefix:, :prefix].sum() == 0
    if ctx.alive is not None:
        assert bool((ctx.alive[:, :prefix] > 0).all())


UNSUPPORTED = {  # a timm ViT option that token reducers cannot patch -> the start of its error
    "parallel blocks": ({"block_fn": ParallelScalingBlock}, "block 0 (ParallelScalingBlock) is not a timm pre-norm Block"),
    "differential attention": ({"attn_layer": "diff"}, "block 0's attention is a DiffAttention, not timm's Attention"),
    "dynamic image size": ({"dynamic_img_size": True}, "dynamic_img_size models are not supported"),
    "attention pooling": ({"global_pool": "map"}, "global_pool='map' is not supported with token reduction"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
@pytest.mark.parametrize("plugin", PLUGINS)
def test_unsupported_architecture_is_refused_by_apply(plugin: str, case: str) -> None:
    """Refused with a one-line BenchError naming the part, before the plug-in's own check reads the model."""
    options, message = UNSUPPORTED[case]
    skip_unless_vit_takes(options, case)
    model = tiny_vit(**options)
    with pytest.raises(BenchError, match=re.escape(message)):
        methods.create(plugin).apply(model)


def test_a_patch_embedding_without_a_convolution_is_refused() -> None:
    """The image shape is read from the patch embedding's first Conv2d: without one, a one-line error says so."""
    model = tiny_vit()
    model.patch_embed.proj = torch.nn.Identity()
    with pytest.raises(BenchError, match="PatchEmbed has no Conv2d: token reducers need a convolutional patch embedding"):
        methods.create("none").apply(model)


def test_unpatching_gives_back_the_plain_model_which_takes_another_reducer() -> None:
    """After ``unpatch_model`` the model, its blocks and their attention are timm's classes again with no reducer
    state left on them, give the unpatched logits, and can be patched again (a model carrying a reducer is refused)."""
    model = tiny_vit()
    x = image_batch(model)
    with torch.no_grad():
        plain = model(x)
    methods.create("tome", r=4).apply(model)
    with pytest.raises(BenchError, match="already carries a token reducer"):
        methods.create("ltp").apply(model)
    methods.unpatch_model(model)
    modules = [model, *model.blocks, *(block.attn for block in model.blocks)]
    assert [type(m).__name__ for m in modules[:2]] == ["VisionTransformer", "Block"] and type(modules[-1]) is Attention
    assert not [m for m in modules if "_reduction_ctx" in vars(m) or "_reduction_layer" in vars(m)]
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    methods.create("ltp").apply(model)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_counts_recorded_and_non_increasing(plugin: str) -> None:
    model, reducer = prepared(plugin, **reducing_knobs(plugin))
    with torch.no_grad():
        model(image_batch(model, batch=3))
    counts = model._reduction_ctx.counts()
    assert counts.shape == (3, len(model.blocks), 2)
    if reducer.is_mid_block():
        flat = counts.flatten(1)  # attn_0, mlp_0, attn_1, mlp_1, ...
        assert bool((flat[:, 1:] <= flat[:, :-1]).all())
        assert int(flat[:, 0].min()) == model.patch_embed.num_patches + model.num_prefix_tokens


@pytest.mark.parametrize("model_name, batch", [(None, 4), ("vit_little_patch16_reg4_gap_256", 3)])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_image_alone_equals_image_in_batch(plugin: str, model_name: str | None, batch: int) -> None:
    """On the tiny CLS ViT, and on a register-only ViT that average-pools its tokens, where the padding and the token
    sizes reach the logits through the pooling too, not only through attention."""
    model, _ = prepared(plugin, None if model_name is None else timm_vit(model_name), **reducing_knobs(plugin))
    x = image_batch(model, batch=batch, seed=1)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(batch)])
    assert torch.allclose(batched, alone, atol=1e-4)


@pytest.mark.parametrize("size, alive, pooled", [
    ([1.0, 2.0, 1.0, 3.0], [True, True, True, False], 20.0),  # (2 * 10 + 1 * 40) / 3: the dead token is left out
    (None, [True, True, True, False], 25.0),  # no merges yet: (10 + 40) / 2
    ([1.0, 2.0, 1.0, 3.0], None, 13.5),  # every token alive: (2 * 10 + 1 * 40 + 3 * 7) / 6
])
def test_average_pooling_weights_tokens_by_size_and_skips_dead_ones(size, alive, pooled: float) -> None:
    """CLS + 3 tokens of values 10, 40, 7 and sizes 2, 1, 3, the last one dead (padding) where there is a mask; the
    CLS (100) is not pooled."""
    model, _ = prepared("tome", tiny_vit(global_pool="avg"), r=0)
    ctx = model._reduction_ctx
    ctx.size = None if size is None else torch.tensor([size])
    ctx.alive = None if alive is None else torch.tensor([alive])
    assert model.pool(torch.tensor([[[100.0], [10.0], [40.0], [7.0]]])).tolist() == [[pooled]]


def test_external_attention_masks_are_refused_not_ignored() -> None:
    """A patched block or attention called with a mask or as causal raises, rather than attend where it was told not to."""
    model, _ = prepared("none")
    x = torch.randn(1, 65, 48)
    mask = torch.zeros(1, 1, 65, 65, dtype=torch.bool)
    for module in (model.blocks[0], model.blocks[0].attn):
        for call in ({"attn_mask": mask}, {"is_causal": True}):
            with pytest.raises(NotImplementedError, match="does not support external attention masks"):
                module(x, **call)


def test_a_reducers_finish_runs_after_the_last_block_and_before_the_final_norm() -> None:
    """A plug-in's ``finish`` (here doubling the tokens) sees the last block's output; the final norm sees its result."""

    class Doubling(NoReduction):
        def finish(self, x: torch.Tensor, ctx) -> torch.Tensor:
            return 2 * x

    seen = {}
    x = image_batch(tiny_vit())
    for name, reducer in (("plain", methods.create("none")), ("doubled", Doubling())):
        model = reducer.apply(tiny_vit())
        model.norm.register_forward_hook(lambda module, args, output, name=name: seen.__setitem__(name, args[0]))
        with torch.no_grad():
            model(x)
    assert torch.equal(seen["doubled"], 2 * seen["plain"])


@pytest.mark.parametrize("plugin", PLUGINS)
def test_deterministic_and_runs_under_inference_mode_and_bf16(plugin: str) -> None:
    model, _ = prepared(plugin, **reducing_knobs(plugin))
    x = image_batch(model)
    with torch.inference_mode():
        first, second = model(x), model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    assert torch.equal(first, second)
    assert low.shape == first.shape and torch.isfinite(low).all()


@pytest.mark.parametrize("plugin", PLUGINS)
def test_knob_sweep_is_monotone_in_gmacs(plugin: str) -> None:
    sweep = methods.REGISTRY[plugin].monotone_sweep()
    if sweep is None:
        pytest.skip(f"{plugin} has no knob to sweep")
    knob, values = sweep
    x = image_batch(tiny_vit(), batch=4)
    means = []
    for value in values:
        model, reducer = prepared(plugin, **{knob: value})
        with torch.no_grad():
            model(x)
        ctx = model._reduction_ctx
        means.append(float(image_macs(ctx.counts(), ctx.dims, reducer, embed_macs(model, ctx.dims)).mean()))
    steps = [b - a for a, b in zip(means, means[1:])]
    assert all(s <= 0 for s in steps) or all(s >= 0 for s in steps), means
    assert means[0] != means[-1], f"{knob} sweep {values} does not change GMACs: {means}"


def test_a_method_that_learns_nothing_refuses_a_learned_state() -> None:
    """An empty state is fine; tensors given to a method that learns nothing are a one-line error, not ignored."""
    reducer = methods.create("tome")
    reducer.load_learned_state({})
    with pytest.raises(BenchError, match="method 'tome' learns nothing but a learned state was given"):
        reducer.load_learned_state({"theta_merge": torch.zeros(4)})


def test_registering_a_class_again_under_its_own_name_is_a_no_op() -> None:
    """The same class under the same name again (a module imported twice) keeps the registry as it was."""
    registered = dict(methods.REGISTRY)
    methods.register_reducer("tome")(methods.REGISTRY["tome"])
    assert methods.REGISTRY == registered


@pytest.mark.parametrize("knobs, message", [
    ({"r": -1}, "knob tome.r=-1 is outside [0, None]: pick a value in range"),
    ({"r": "many"}, "knob tome.r='many' is not a int: tokens merged per layer (int or per-layer list)"),  # its help
])
def test_a_refused_knob_value_names_the_problem_and_the_fix(knobs: dict, message: str) -> None:
    with pytest.raises(BenchError) as refused:
        methods.create("tome", **knobs)
    assert str(refused.value) == message
