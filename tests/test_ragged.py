"""Ragged batches: packing, attention groups and their equivalence with image-by-image attention."""
from __future__ import annotations

import itertools

import pytest
import torch

import methods
from methods import ragged
from methods.blocks import ReductionContext, head_mean
from methods.ltmp import best_matches, merging_pairs
from methods.ragged import Packing, plan_groups, ragged_attention
from tests.conftest import hand_dims
from tests.test_ltmp import peaked_vit, with_thresholds


def plan_cost(groups: list[list[int]], counts: list[int], pair_macs: float, overhead: float) -> float:
    return sum(len(g) * max(counts[i] for i in g) ** 2 * pair_macs + overhead for g in groups)


def set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first], *partition]
        for index in range(len(partition)):
            yield partition[:index] + [[first, *partition[index]]] + partition[index + 1:]


@pytest.mark.parametrize("seed", range(6))
def test_plan_groups_is_the_optimal_partition(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 60, (6,), generator=generator).tolist()
    pair_macs, overhead = 10.0, float(torch.randint(100, 30000, (1,), generator=generator))
    plan = plan_groups(counts, pair_macs, overhead)
    assert sorted(i for g in plan for i in g) == list(range(6))
    best = min(plan_cost(p, counts, pair_macs, overhead) for p in set_partitions(list(range(6))))  # all 203 partitions
    assert plan_cost(plan, counts, pair_macs, overhead) == pytest.approx(best)


def test_plan_groups_hand_example_and_cap() -> None:
    # one outlier: [10, 10, 11, 100] with overhead 500 pairs -> the outlier alone (3*121 + 500 + 10^4 + 500 < 4*10^4)
    assert plan_groups([10, 100, 10, 11], 1.0, 500.0) == [[0, 2, 3], [1]]
    # no overhead: every distinct count alone is optimal; a huge overhead: one group
    assert plan_groups([3, 3, 5], 1.0, 0.0) in ([[0, 1], [2]], [[0], [1], [2]])
    assert plan_groups([3, 4, 5], 1.0, 1e9) == [[0, 1, 2]]
    # the cap: at most 2 images of 10 tokens (2 * 100 pairs) in a group even if one group would be cheaper
    plan = plan_groups([10] * 5, 1.0, 1e9, max_pairs=200)
    assert [len(g) for g in plan] == [1, 2, 2] and sorted(i for g in plan for i in g) == list(range(5))
    # an image wider than the cap (10 x 10 pairs > 50) still gets a group, of its own
    assert plan_groups([10, 4, 10], 1.0, 1e9, max_pairs=50) == [[1], [0], [2]]


def test_group_layout_pads_each_group_to_its_own_largest_count() -> None:
    """Counts 3, 10, 3, 10 at an overhead of 1 MAC: the two 3-token images form one group 3 wide and the two 10-token
    images one 10 wide (2 x 9 + 1 + 2 x 100 + 1 = 220 MACs, against 222 alone and 401 together), so group 1 starts
    at slot 2 x 3 = 6 and the layout ends at 6 + 2 x 10 = 26."""
    layout = Packing.of_counts(torch.tensor([3, 10, 3, 10]), [3, 10, 3, 10]).groups(1.0, 1.0)
    assert layout.spans == [(0, 2, 3), (2, 4, 10)]
    assert layout.group_starts == [0, 6, 26]


def test_a_batch_without_padding_splits_as_evenly_as_the_cap_allows() -> None:
    """7 images of 10 tokens, at most 3 per group (300 pairs): 3 groups of 2, 3 and 2 images, not 3, 3 and 1."""
    layout = Packing.full(torch.zeros(7, 10, 1)).groups(1.0, 0.0, max_pairs=300)
    assert [end - start for start, end, _ in layout.spans] == [2, 3, 2]
    assert {width for _, _, width in layout.spans} == {10}


def test_packing_round_trip_and_order() -> None:
    alive = torch.tensor([[True, False, True, True], [False, False, True, False]])
    x = torch.arange(8.0).view(2, 4, 1)
    packing = Packing(alive)
    assert packing.pack(x)[:, 0].tolist() == [0.0, 2.0, 3.0, 6.0]  # image by image, in order
    assert packing.counts.tolist() == [3, 1]
    assert packing.source.index_select(0, packing.index).tolist() == [0, 1, 2, 3]  # each alive position's packed row
    assert torch.equal(packing.unpack(packing.pack(x)), x * alive[..., None])  # zeros in the padding
    packed = packing.pack(x) + 1
    assert packing.pack(packing.unpack(packed)) is packed  # re-packing what unpack gave costs nothing
    assert torch.equal(packing.pack(x * alive[..., None] + 1), packed)  # any other tensor is gathered


def test_head_mean_is_the_mean_over_heads() -> None:
    qkv = torch.randn(10, 3, 4, 8, generator=torch.Generator().manual_seed(0))
    for k in (qkv.unbind(1)[1], qkv.permute(1, 0, 2, 3)):  # packed (T, H, d) view and a (B, H, N, d)-like layout
        assert torch.allclose(head_mean(k), k.mean(1), atol=1e-6)
        assert torch.equal(head_mean(k.bfloat16()), k.bfloat16().mean(1))  # same dtype, same single rounding
    before = qkv.clone()
    head_mean(qkv.unbind(1)[1])
    assert torch.equal(qkv, before)  # the adds never write into the input


def reference_attention(qkv: torch.Tensor, alive: torch.Tensor, scale: float, log_size: torch.Tensor | None):
    """Image by image, over the alive tokens only: out (T, H*d) and importance (B, N)."""
    outputs, importance = [], torch.zeros(alive.shape)
    start = 0
    for b in range(alive.shape[0]):
        count = int(alive[b].sum())
        q, k, v = qkv[start:start + count].permute(1, 2, 0, 3)  # (H, n, d)
        logits = scale * q @ k.transpose(-2, -1)
        if log_size is not None:
            logits = logits + log_size[start:start + count]
        probs = logits.softmax(-1)
        outputs.append((probs @ v).transpose(0, 1).reshape(count, -1))
        importance[b, alive[b]] = probs.mean(dim=(0, 1))
        start += count
    return torch.cat(outputs), importance


@pytest.mark.parametrize("plan", ["cpu", "cuda"])
@pytest.mark.parametrize("proportional", [False, True])
@pytest.mark.parametrize("need_importance", [False, True])
@pytest.mark.parametrize("layout", ["scattered", "dense"])
def test_ragged_attention_equals_image_by_image(monkeypatch, layout: str, need_importance: bool,
                                                proportional: bool, plan: str) -> None:
    """``plan`` picks the device's grouping constants (the tensors stay on the CPU): "cpu" with a small cap, so
    several groups; "cuda" with the GPU's own, where a launch outweighs padding and every image shares one group
    padded to the largest count (the path a GPU runs, which no CPU run would otherwise take)."""
    monkeypatch.setitem(ragged.MAX_GROUP_PROBS, "cpu", 2 * 3 * 12 * 12)  # small cap: several groups
    monkeypatch.setitem(ragged.GROUP_OVERHEAD_MACS, "cpu", 50.0)
    generator = torch.Generator().manual_seed(7)
    if layout == "dense":
        alive = torch.ones(7, 12, dtype=torch.bool)
    else:  # alive tokens anywhere (not only at the front), counts 1..12
        alive = torch.rand(7, 12, generator=generator) < torch.linspace(0.05, 0.95, 7)[:, None]
        alive[:, 5] = True
    packing = Packing(alive)
    tokens = int(alive.sum())
    qkv = torch.randn(tokens, 3, 3, 4, generator=generator, requires_grad=True)
    log_size = torch.rand(tokens, generator=generator).mul(3).add(1).log() if proportional else None
    max_pairs = ragged.MAX_GROUP_PROBS[plan] / 3  # what ragged_attention plans with when it needs importance
    groups = len(packing.groups(24.0, ragged.GROUP_OVERHEAD_MACS[plan], max_pairs, 3).spans)
    assert groups == 1 if plan == "cuda" else groups > 1
    out, importance = ragged_attention(qkv, packing, 3, 0.5, log_size, need_importance, device_type=plan)
    expected_out, expected_importance = reference_attention(qkv, alive, 0.5, log_size)
    assert torch.allclose(out, expected_out, atol=1e-6)
    if need_importance:
        assert torch.allclose(importance, expected_importance, atol=1e-6)
        assert torch.equal(importance[~alive], torch.zeros(int((~alive).sum())))
    else:
        assert importance is None
    # gradients flow as through the image-by-image reference (a random linear read-out of both results)
    out_weight, importance_weight = torch.randn(out.shape, generator=generator), torch.randn(alive.shape, generator=generator)

    def readout(out: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        return (out * out_weight).sum() + (0.0 if importance is None else (importance * importance_weight).sum())
    grad, = torch.autograd.grad(readout(out, importance), qkv)
    expected_grad, = torch.autograd.grad(readout(expected_out, expected_importance if need_importance else None), qkv)
    assert torch.allclose(grad, expected_grad, atol=1e-5)


@pytest.mark.parametrize("need_importance", [False, True])
def test_ragged_attention_applies_attention_dropout(need_importance: bool) -> None:
    """In training mode a block passes its attention dropout on: at p = 1 every attention weight is dropped, so the
    output is 0, while importance (read before the dropout) is the same as without it; at p = 0.5 the output differs
    from the undropped one."""
    generator = torch.Generator().manual_seed(3)
    alive = torch.rand(4, 6, generator=generator) < 0.7
    alive[:, 0] = True
    packing = Packing(alive)
    qkv = torch.randn(int(alive.sum()), 3, 2, 4, generator=generator)
    plain, importance = ragged_attention(qkv, packing, 2, 0.5, None, need_importance)
    dropped, dropped_importance = ragged_attention(qkv, packing, 2, 0.5, None, need_importance, dropout_p=1.0)
    assert plain.abs().min() > 0 and torch.equal(dropped, torch.zeros_like(plain))
    assert (importance is None and dropped_importance is None) or torch.equal(dropped_importance, importance)
    torch.manual_seed(0)
    assert not torch.allclose(ragged_attention(qkv, packing, 2, 0.5, None, need_importance, dropout_p=0.5)[0], plain)


@pytest.mark.parametrize("negative_threshold", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_merging_pairs_equal_general_matches(seed: int, negative_threshold: bool) -> None:
    """The inference form's strided matching gives the merges best_matches gives, and only those above threshold;
    dead tokens (zero keys, as unpacked) take part in none, also below a threshold of 0, where they are masked."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.tensor([11, 1, 2, 6, 9])
    alive = torch.arange(11)[None] < counts[:, None]
    keys = torch.randn(5, 11, 6, generator=generator) * alive[..., None]
    candidate = alive & (torch.arange(11) >= 1)  # one prefix token
    rank = candidate.long().cumsum(1) - 1
    best, dst = best_matches(keys, candidate & (rank % 2 == 1), candidate & (rank % 2 == 0))
    in_a = best > -2
    assert int(in_a.sum()) == sum((int(c) - 1) // 2 for c in counts)
    threshold = -1.0 if negative_threshold else float(best[in_a].median())
    assert (threshold < 0) == negative_threshold
    merging = best > threshold
    assert 0 < int(merging.sum()) <= int(in_a.sum())
    image, source, target = merging_pairs(keys, 1, counts, threshold)
    expected_image, expected_source = merging.nonzero(as_tuple=True)
    assert torch.equal(image, expected_image) and torch.equal(source, expected_source)
    assert torch.equal(target, dst[merging])


@pytest.mark.parametrize("name", ["ltmp", "ltp", "ltm"])
def test_padded_batch_runs_linear_layers_on_its_images_tokens_only(name: str) -> None:
    """The rows entering every qkv and fc1 layer are exactly the images' own token counts: no padding."""
    model, reducer, x = with_thresholds(name, 3)
    rows = {"qkv": 0, "fc1": 0}

    def count(kind: str):
        def hook(module, args) -> None:
            rows[kind] += args[0].reshape(-1, args[0].shape[-1]).shape[0]
        return hook

    for block in model.blocks:
        block.attn.qkv.register_forward_pre_hook(count("qkv"))
        block.mlp.fc1.register_forward_pre_hook(count("fc1"))
    with torch.no_grad():
        model(x)
    counts = model._reduction_ctx.counts()
    assert len(set(counts[:, -1, 1].tolist())) > 1, "images should keep different token counts"
    assert rows["qkv"] == int(counts[:, :, 0].sum())
    assert rows["fc1"] == int(counts[:, :, 1].sum())


def test_plan_groups_handles_every_batch_size() -> None:
    for batch, width in itertools.product((1, 2, 5), (1, 7)):
        plan = plan_groups([width] * batch, 1.0, 10.0, max_pairs=width * width)
        assert sorted(i for g in plan for i in g) == list(range(batch))


def test_qk_norm_models_run_ragged_batches_like_single_images() -> None:
    model = peaked_vit(qk_norm=True)
    reducer = methods.create("ltmp")
    reducer.apply(model)
    with torch.no_grad():
        reducer.theta_merge.fill_(0.6)
        reducer.theta_prune.fill_(0.012)
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        batched = model(x)
        counts = model._reduction_ctx.counts()
        single = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert len(set(counts[:, -1, 1].tolist())) > 1, "images should keep different token counts"
    assert torch.allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("name", ["ltmp", "ltp", "ltm"])
def test_blocks_carry_packed_tokens_exactly_like_the_hooked_block_calls(monkeypatch, name: str) -> None:
    """Without block hooks the alive tokens go packed from block to block; with one (or a global one), every block is
    called and pads its output. Both give the same logits, counts and source maps, and the hook sees each block's output."""
    model, reducer, x = with_thresholds(name, 3)
    ctx = model._reduction_ctx
    calls = []
    run_block = methods.blocks.run_block
    monkeypatch.setattr(methods.blocks, "run_block", lambda *args, **kwargs: calls.append(1) or run_block(*args, **kwargs))
    with torch.no_grad():
        carried, carried_counts, carried_source = model(x), ctx.counts(), ctx.source.clone()
        assert not calls  # the blocks' own forward was not called
        seen = []
        handle = model.blocks[1].register_forward_hook(lambda module, args, output: seen.append(output.shape))
        called, called_counts = model(x), ctx.counts()
        handle.remove()
        calls.clear()  # a global hook (e.g. a module tracker) would read the blocks' outputs too
        handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
        try:
            assert torch.equal(model(x), called) and len(calls) == len(model.blocks)
        finally:
            handle.remove()
    assert len(set(carried_counts[:, -1, 1].tolist())) > 1, "images should keep different token counts"
    assert seen == [(4, int(called_counts[:, 1, 1].max()), model.embed_dim)] and len(calls) == len(model.blocks)
    assert torch.equal(carried, called)
    assert torch.equal(carried_counts, called_counts) and torch.equal(carried_source, ctx.source)


def test_the_context_packs_anew_when_its_mask_is_replaced() -> None:
    """The context keeps one Packing while ``alive`` is the same tensor (the MLP and the next attention share it) and
    builds a new one when a plug-in replaces ``alive`` directly (not through ``repack``)."""
    ctx = ReductionContext(methods.create("none"), hand_dims(3))
    ctx.alive = torch.tensor([[True, True, False, False], [True, True, True, True]])
    first = ctx.packing()
    assert ctx.packing() is first and first.counts.tolist() == [2, 4]
    ctx.alive = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert ctx.packing().counts.tolist() == [3, 1]
