"""Prune-and-Merge: M/R on hand-made scores, scoring vs finite differences, structure counts, identity."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import methods
from bench.errors import BenchError
from methods.base import FitReport
from methods.blocks import ModelDims, ReductionContext
from methods.prune_and_merge import merge_matrix, search_structure
from tests.conftest import hand_dims, image_batch, tiny_vit


def test_merge_matrix_on_hand_made_scores() -> None:
    # CLS + a 2 x 3 grid: positions 1 2 3 / 4 5 6. Centres: 2 and 6. Pruned: 4. Merged: 1, 3 (row 0), 5 (row 1).
    score = torch.tensor([0.0, 0.2, 0.8, 0.4, 0.05, 0.3, 0.6])
    centre = torch.tensor([False, False, True, False, False, False, True])
    pruned = torch.tensor([False, False, False, False, True, False, False])
    m, final_pruned = merge_matrix(score, centre, pruned, num_prefix=1, grid_width=3)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],  # CLS: fixed one-hot
        [0, 0.2 / 0.8, 1, 0.4 / 0.8, 0, 0, 0],  # centre 2 takes 1 and 3 (its row), weights score_j / score_c
        [0, 0, 0, 0, 0, 0.3 / 0.6, 1],  # centre 6 takes 5
    ])
    assert torch.allclose(m, expected)
    assert torch.equal(final_pruned, pruned)
    assert torch.allclose(m.sum(1), torch.tensor([1.0, 1.75, 1.5]))
    r = torch.linalg.pinv(m)
    assert torch.allclose(m @ r, torch.eye(3), atol=1e-6)  # R inverts M on the kept subspace
    assert torch.allclose(r[4], torch.zeros(3))  # the pruned token gets nothing back: shortcut only


def test_merged_token_joins_its_own_rows_centre_even_where_another_row_has_a_nearer_one() -> None:
    """CLS + a 2 x 3 grid, positions 1 2 3 / 4 5 6, centres 3 and 6. Position 4 is one step from centre 3 in raster
    order but joins 6, the centre of its own image row."""
    score = torch.tensor([0.0, 0.1, 0.1, 0.5, 0.2, 0.1, 0.4])
    centre = torch.tensor([False, False, False, True, False, False, True])
    m, _ = merge_matrix(score, centre, torch.zeros(7, dtype=torch.bool), num_prefix=1, grid_width=3)
    assert torch.allclose(m, torch.tensor([[1, 0, 0, 0, 0, 0, 0], [0, 0.2, 0.2, 1, 0, 0, 0],
                                           [0, 0, 0, 0, 0.5, 0.25, 1]]))


def test_merged_token_without_a_centre_in_its_row_joins_the_nearest_in_raster_order() -> None:
    score = torch.tensor([0.0, 0.5, 0.1, 0.1, 0.1])  # CLS + 2 x 2 grid, one centre at position 1
    centre = torch.tensor([False, True, False, False, False])
    m, _ = merge_matrix(score, centre, torch.zeros(5, dtype=torch.bool), 1, 2)
    assert torch.allclose(m[1], torch.tensor([0, 1, 0.2, 0.2, 0.2]))


def test_ties_go_to_the_left_centre_in_a_row_and_to_the_earlier_one_in_raster_order() -> None:
    """CLS + a 3 x 3 grid, positions 1 2 3 / 4 5 6 / 7 8 9, centres 1, 3 and 7 (score 1; the others 0.5). Position 2
    is one column from both centres of its row and joins 1, the left one. Row 1 has no centre: position 5 is 2 steps
    from 3 and from 7 in raster order and joins 3, the earlier; 4 joins 3 (1 step), 6 joins 7 (1 step)."""
    score = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.5, 0.5, 0.5, 1.0, 0.5, 0.5])
    centre = torch.zeros(10, dtype=torch.bool)
    centre[[1, 3, 7]] = True
    m, _ = merge_matrix(score, centre, torch.zeros(10, dtype=torch.bool), num_prefix=1, grid_width=3)
    assert m.tolist() == [[1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0.5, 0, 0, 0, 0, 0, 0, 0],
                          [0, 0, 0, 1, 0.5, 0.5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0.5, 1, 0.5, 0.5]]


def test_a_block_without_centres_prunes_every_patch() -> None:
    """No centre in the block: the tokens that would merge are pruned too, and M keeps the CLS row alone."""
    pruned = torch.tensor([False, False, True, False, False])
    m, final_pruned = merge_matrix(torch.tensor([0.0, 0.5, 0.1, 0.3, 0.2]), torch.zeros(5, dtype=torch.bool), pruned, 1, 2)
    assert m.tolist() == [[1, 0, 0, 0, 0]]
    assert final_pruned.tolist() == [False, True, True, True, True]
    assert not pruned[1]  # the caller's mask is not changed


def test_structure_search_rounds_the_counts_to_the_nearest() -> None:
    """2 blocks x 4 patches = 8 slots: keep 0.7 -> round(5.6) = 6 centres, prune 0.2 -> round(1.6) = 2 pruned."""
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.1, 0.7], [0.0, 0.6, 0.5, 0.4, 0.05]])
    centre, pruned = search_structure(scores, 1, keep_rate=0.7, prune_rate=0.2)
    assert centre.tolist() == [[False, True, True, False, True], [False, True, True, True, False]]
    assert pruned.tolist() == [[False, False, False, True, False], [False, False, False, False, True]]


def test_structure_search_counts_match_the_rates() -> None:
    scores = torch.rand(4, 1 + 50, generator=torch.Generator().manual_seed(0))
    centre, pruned = search_structure(scores, 1, keep_rate=0.6, prune_rate=0.1)
    assert int(centre.sum()) == 120 and int(pruned.sum()) == 20
    assert not bool((centre & pruned).any()) and not bool(centre[:, 0].any() or pruned[:, 0].any())
    assert float(scores[:, 1:][centre[:, 1:]].min()) >= float(scores[:, 1:][~centre[:, 1:]].max())
    assert float(scores[:, 1:][pruned[:, 1:]].max()) <= float(scores[:, 1:][~pruned[:, 1:]].min())


def test_scores_equal_a_finite_difference_estimate() -> None:
    """sum_{b,h,i} A_ij dL/dA_ij is the derivative of L when column j of A is scaled by (1 + eps)."""
    torch.manual_seed(0)
    model = tiny_vit(depth=2).double()
    reducer = methods.create("pm")
    reducer.apply(model)
    x, y = image_batch(model, batch=3).double(), torch.tensor([1, 2, 3])
    captured = {}
    original = reducer.set_scores
    reducer.set_scores = lambda raw, dims: captured.setdefault("raw", raw)
    reducer.calibrate(model, [(x, y)])
    reducer.set_scores = original
    layer, eps = 1, 1e-6
    attn = model.blocks[layer].attn

    class ScaleColumn(torch.nn.Module):
        def __init__(self, column: int, factor: float) -> None:
            super().__init__()
            self.column, self.factor, self.p = column, factor, 0.0

        def forward(self, probs: torch.Tensor) -> torch.Tensor:
            probs = probs.clone()
            probs[..., self.column] *= self.factor
            return probs

    reducer.calibrating = True  # explicit attention path (attn_drop is applied to the probabilities)
    for column in (0, 5, 40):
        losses = []
        for factor in (1 + eps, 1 - eps):
            attn.attn_drop = ScaleColumn(column, factor)
            with torch.no_grad():
                losses.append(float(torch.nn.functional.cross_entropy(model(x), y)))
        estimate = abs(losses[0] - losses[1]) / (2 * eps)
        assert float(captured["raw"][layer, column]) == pytest.approx(estimate, rel=1e-4, abs=1e-9)
    reducer.calibrating = False


def test_calibration_computes_no_weight_gradient() -> None:
    """The scores need dL/dA only: no parameter of the backbone gets a gradient accumulated (a full ``backward`` would
    compute every weight gradient too, ~30 % of the calibration's time on the embedded model)."""
    torch.manual_seed(0)
    model = tiny_vit(depth=2)
    reducer = methods.create("pm", keep_rate=0.5)
    reducer.apply(model)
    accumulated = []
    for name, parameter in model.named_parameters():
        parameter.register_post_accumulate_grad_hook(lambda p, name=name: accumulated.append(name))
    images = reducer.calibrate(model, [(image_batch(model, batch=3), torch.tensor([1, 2, 3]))] * 2)
    assert images == 6 and accumulated == []
    assert all(parameter.grad is None for parameter in model.parameters())


def test_scores_are_normalised_per_block_then_weighted_by_depth_and_r_is_the_pseudo_inverse() -> None:
    """Raw scores of 2 blocks over CLS + 4 patches: each block's patch scores sum to 1, then block l is weighted by
    1 - 0.25 l (the CLS column is left alone); every block's R is pinv(M)."""
    reducer = methods.create("pm", keep_rate=0.5, prune_rate=0.25, depth_decay=0.25)
    dims = ModelDims.of(tiny_vit(img_size=8, depth=2))  # 2 x 2 = 4 patches
    reducer.set_scores(torch.tensor([[9.0, 2.0, 2.0, 4.0, 0.0], [9.0, 1.0, 3.0, 0.0, 4.0]]), dims)
    assert reducer.scores.tolist() == [[9.0, 0.25, 0.25, 0.5, 0.0], [6.75, 0.09375, 0.28125, 0.0, 0.375]]
    for m, r in zip(reducer.M, reducer.R):
        assert torch.allclose(r.detach(), torch.linalg.pinv(m.detach()))


def test_token_groups_are_ms_nonzero_pattern() -> None:
    """The token map of a block is M's nonzero pattern, whatever the weights' size (0.25 and 0.5 here), one per image;
    the pruned position 4 belongs to no token."""
    reducer = methods.create("pm")
    score = torch.tensor([0.0, 0.2, 0.8, 0.4, 0.05, 0.3, 0.6])
    m, pruned = merge_matrix(score, torch.tensor([False, False, True, False, False, False, True]),
                             torch.tensor([False, False, False, False, True, False, False]), 1, 3)
    reducer.load_learned_state({"M.0": m, "R.0": torch.linalg.pinv(m), "pruned.0": pruned})
    ctx = ReductionContext(reducer, hand_dims(6))
    ctx.begin_shape = (2, 7)
    groups = reducer.token_groups(0, ctx)
    assert groups.shape == (2, 3, 7)
    assert groups[1].tolist() == [[1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1]]


def test_matrices_for_another_token_count_are_refused() -> None:
    """A structure calibrated for 65 tokens (32 x 32 images) does not fit 17 (16 x 16): a one-line error, not a
    shape error from a matmul."""
    reducer = methods.create("pm", keep_rate=0.5)
    reducer.prepare_for_test(reducer.apply(tiny_vit()))
    other = methods.create("pm", keep_rate=0.5)
    model = other.apply(tiny_vit(img_size=16))
    other.load_learned_state(reducer.learned_state())
    with pytest.raises(BenchError, match="calibrated for 65 tokens, got 17"):
        model(torch.zeros(1, 3, 16, 16))


def test_full_keep_is_the_identity_and_reproduces_logits() -> None:
    model = tiny_vit()
    x = image_batch(model)
    with torch.no_grad():
        reference = model(x)
    reducer = methods.create("pm", keep_rate=1.0, prune_rate=0.0)
    reducer.apply(model)
    reducer.prepare_for_test(model)
    assert all(reducer.identity)
    assert all(torch.equal(m.detach(), torch.eye(65)) and torch.allclose(r.detach(), torch.eye(65)) for m, r in zip(reducer.M, reducer.R))
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-5)
    dims = model._reduction_ctx.dims
    assert all(float(reducer.extra_macs(l, torch.tensor([65]), torch.tensor([65]), dims)[0]) == 0 for l in range(4))


def test_reduced_forward_is_the_papers_formula_image_by_image() -> None:
    """x_out = R_l · Block_l(M_l · x) + p_l ⊙ x, computed here one image at a time with the unpatched timm blocks
    and plain matrix products, equals the plug-in's batched forward."""
    import copy
    model = tiny_vit()
    plain = copy.deepcopy(model)
    reducer = methods.create("pm", keep_rate=0.5)
    reducer.apply(model)
    reducer.prepare_for_test(model)
    assert not any(reducer.identity)
    x = image_batch(model, batch=3)
    with torch.no_grad():
        tokens = plain.norm_pre(plain._pos_embed(plain.patch_embed(x)))  # (B, N, C)
        images = []
        for image in tokens:  # (N, C)
            for block, merge, rebuild, pruned in zip(plain.blocks, reducer.M, reducer.R, reducer.pruned):
                image = rebuild @ block((merge @ image)[None])[0] + pruned[:, None].float() * image
            images.append(image)
        reference = plain.forward_head(plain.norm(torch.stack(images)))
        assert torch.allclose(model(x), reference, atol=1e-5)


def test_static_counts_state_round_trip_and_impossible_rates() -> None:
    model = tiny_vit()
    reducer = methods.create("pm", keep_rate=0.5)
    reducer.apply(model)
    reducer.prepare_for_test(model)
    with torch.no_grad():
        logits = model(image_batch(model, batch=3))
    counts = model._reduction_ctx.counts()
    assert bool((counts == counts[0]).all())  # static: identical for every image
    assert counts[0, :, 0].tolist() == [m.shape[0] for m in reducer.M]
    assert sum(m.shape[0] - 1 for m in reducer.M) == round(0.5 * 4 * 64)
    other_model = tiny_vit()
    other = methods.create("pm", keep_rate=0.5)
    other.apply(other_model)
    other.load_learned_state(reducer.learned_state())
    with torch.no_grad():
        assert torch.allclose(other_model(image_batch(model, batch=3)), logits)
    assert torch.equal(other.scores, reducer.scores)  # stored again by a re-save: the calibration's scores survive
    with pytest.raises(BenchError, match="exceed 1"):
        methods.create("pm", keep_rate=0.95, prune_rate=0.1)


def seeded_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` seeded random images for the tiny ViT, (count, 3, 32, 32), and labels (count,)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 3, 32, 32, generator=generator), torch.randint(0, 10, (count,), generator=generator)


def finetuning_setup(keep_rate: float, images: int = 32, **knobs):
    """The tiny ViT patched by pm-ft at ``keep_rate`` (and ``knobs``) and seeded random images/labels in batches of 16."""
    model = tiny_vit()
    reducer = methods.create("pm", keep_rate=keep_rate, regime="finetuned", lr=1e-2, calib_batches=1, **knobs)
    reducer.apply(model)
    x, y = seeded_images(images)
    return model, reducer, x, y, lambda: iter([(x[i:i + 16], y[i:i + 16]) for i in range(0, images, 16)])


def test_finetuning_keeps_the_structure_and_lowers_the_loss() -> None:
    model, reducer, _, _, batches = finetuning_setup(0.4)
    report = reducer.fit(model, batches, {"budget_images": 64, "batch_size": 16}, progress=False)
    zero_before = [(m.detach() == 0) for m in reducer.M]
    assert report.extra["calibration_images"] == 16 and report.extra["finetune_images"] == 64
    assert report.images_seen == 80 and report.steps == 4
    for m, zeros in zip(reducer.M, zero_before):
        assert torch.equal(m.detach()[0], torch.eye(1, m.shape[1])[0])  # CLS row stays one-hot
        assert bool((m.detach()[zeros] == 0).all())
    assert all(p.requires_grad for p in model.parameters())
    stored = methods.create("pm", keep_rate=0.4)  # the trained R, not pinv of the trained M, is what is stored
    stored.load_learned_state(reducer.learned_state())
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(stored.R, reducer.R))
    assert not all(torch.allclose(r.detach(), torch.linalg.pinv(m.detach()), atol=1e-4) for m, r in zip(reducer.M, reducer.R))


def test_one_finetuning_step_is_one_adam_step_on_the_distillation_loss() -> None:
    """The first fine-tuning step recomputed by hand: the teacher is the unpatched model, loss = CE(student) + alpha T^2
    KL(softmax(teacher / T) || softmax(student / T)) at alpha 0.5, T 4; its gradient with respect to M and R is
    masked to M's nonzero entries and to R's rows of kept tokens, then one Adam step at lr 1e-2, and M's CLS row is
    reset to one-hot. Non-default alpha and T, so that neither factor can go missing unnoticed."""
    knobs = dict(keep_rate=0.4, regime="finetuned", lr=1e-2, calib_batches=1, alpha=0.5, temperature=4.0)
    x, y = seeded_images(16)
    with torch.no_grad():
        teacher = tiny_vit()(x)
    hand = methods.create("pm", **knobs)
    student_model = hand.apply(tiny_vit())
    hand.calibrate(student_model, [(x, y)])
    trained = [layer for layer, identity in enumerate(hand.identity) if not identity]
    assert trained  # the step below is not vacuous
    params = [hand.M[l] for l in trained] + [hand.R[l] for l in trained]
    masks = [(hand.M[l].detach() != 0).float() for l in trained] + [(~hand.pruned[l]).float()[:, None] for l in trained]
    student = student_model(x)
    loss = F.cross_entropy(student, y) + 0.5 * 16.0 * F.kl_div(
        F.log_softmax(student / 4.0, -1), F.softmax(teacher / 4.0, -1), reduction="batchmean")
    expected = [p.detach().clone().requires_grad_() for p in params]
    for parameter, gradient, mask in zip(expected, torch.autograd.grad(loss, params), masks):
        parameter.grad = gradient * mask
    torch.optim.Adam(expected, lr=1e-2).step()
    with torch.no_grad():
        for m in expected[:len(trained)]:
            m[0] = torch.eye(1, m.shape[1])[0]
    fitted = methods.create("pm", **knobs)
    model = fitted.apply(tiny_vit())
    fitted.fit(model, lambda: iter([(x, y)]), {"budget_images": 16}, progress=False)
    got = [fitted.M[l] for l in trained] + [fitted.R[l] for l in trained]
    for parameter, reference in zip(got, expected):
        assert torch.allclose(parameter.detach(), reference.detach(), atol=1e-6, rtol=0)


def test_fit_runs_the_model_in_evaluation_mode() -> None:
    """A model handed over in training mode (dropout 0.5 everywhere) calibrates and fine-tunes as it does in
    evaluation mode: the same M and R."""
    x, y = seeded_images(16)
    fitted = []
    for training in (False, True):
        model = tiny_vit(drop_rate=0.5, attn_drop_rate=0.5, proj_drop_rate=0.5)
        reducer = methods.create("pm", keep_rate=0.4, regime="finetuned", lr=1e-2, calib_batches=1)
        reducer.apply(model).train(training)
        reducer.fit(model, lambda: iter([(x, y)]), {"budget_images": 16}, progress=False)
        fitted.append([p.detach() for p in (*reducer.M, *reducer.R)])
    assert len(fitted[0]) == len(fitted[1]) and all(torch.equal(a, b) for a, b in zip(*fitted))


@pytest.mark.parametrize("train_all", [False, True])
def test_train_all_finetunes_the_backbone_too(train_all: bool) -> None:
    model, reducer, _, _, batches = finetuning_setup(0.4, train_all=train_all)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    reducer.fit(model, batches, {"budget_images": 16}, progress=False)
    changed = [name for name, value in model.state_dict().items() if not torch.equal(value, before[name])]
    assert (changed != []) is train_all
    assert not train_all or "blocks.0.attn.qkv.weight" in changed


def test_finetuning_stops_at_its_budget_when_the_last_step_is_skipped() -> None:
    """A non-finite loss on the batch that completes the budget skips that step and ends fine-tuning: it used to
    skip the budget check too and go on through the epoch's remaining batches."""
    model, reducer, images, _, batches = finetuning_setup(0.4, images=64)
    images[16:32] = float("nan")  # the second batch, which reaches the 32-image budget
    report = reducer.fit(model, batches, {"budget_images": 32, "batch_size": 16}, progress=False)
    assert report.extra["finetune_images"] == 32 and report.skipped_steps == 1


def test_finetuning_leaves_identity_blocks_alone() -> None:
    """A block whose structure is the identity skips its M and R, which then get no gradient: fine-tuning crashed
    on them (``fmnist_full --quick``, pm-ft at keep_rate 0.9). They stay the identity; the other blocks train."""
    model, reducer, _, _, batches = finetuning_setup(0.6)
    reducer.calibrate(model, batches(), "fp32")
    state = reducer.learned_state()
    tokens = state["M.0"].shape[1]
    state["M.0"], state["R.0"], state["pruned.0"] = torch.eye(tokens), torch.eye(tokens), torch.zeros(tokens, dtype=torch.bool)
    reducer.load_learned_state(state)
    assert reducer.identity == [True, False, False, False]
    before = [m.detach().clone() for m in reducer.M]
    report = FitReport()
    reducer._finetune(model, batches, {"budget_images": 32, "batch_size": 16}, report, progress=False)
    assert report.steps == 2 and report.skipped_steps == 0
    assert torch.equal(reducer.M[0].detach(), torch.eye(tokens)) and torch.equal(reducer.R[0].detach(), torch.eye(tokens))
    assert not torch.equal(reducer.M[1].detach(), before[1])
    everything_kept = methods.create("pm", keep_rate=1.0, prune_rate=0.0, regime="finetuned", calib_batches=1)
    model = everything_kept.apply(tiny_vit())
    report = everything_kept.fit(model, batches, {"budget_images": 32, "batch_size": 16}, progress=False)
    assert all(everything_kept.identity) and report.extra["finetune_images"] == 0 and report.images_seen == 16
