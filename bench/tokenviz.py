"""Token visualisation: which patches each method merged (mean-coloured groups, outlined) and pruned (grey),
at a middle block and after the last block, for a few evaluation images, one column per method.

The model runs a forward pass on the few images (cheap); learned thresholds and matrices come from the store,
so nothing is retrained.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import methods  # noqa: E402
from bench.plots import COLUMN_WIDTH, STYLE, _save  # noqa: E402
from bench.settings import series_labels, split_by_setting  # noqa: E402

MAP_HEIGHT = 0.95  # inches per row of maps
MAP_WIDTH = COLUMN_WIDTH * 2 / 7  # a page's width holds the input and six methods; fewer make a narrower figure


def capture_groups(model: torch.nn.Module, reducer: methods.TokenReducer, images: torch.Tensor, layers: list[int]
                   ) -> dict[int, list[torch.Tensor]]:
    """Per requested block: per image, a (tokens, patches) 0/1 map of the alive tokens after that block."""
    reducer.trace_source = True
    ctx = model._reduction_ctx
    snapshots: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for layer in layers:
        def hook(module, inputs, output, layer=layer):
            groups = reducer.token_groups(layer, ctx)
            if groups is None:
                groups = ctx.source
                alive = ctx.alive
            else:
                alive = None
            per_image = []
            for b in range(groups.shape[0]):
                rows = groups[b] if alive is None else groups[b][alive[b] > 0]
                per_image.append(rows[:, ctx.num_prefix:].detach().cpu())
            snapshots[layer] = per_image
        hooks.append(model.blocks[layer].register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(images)
    finally:
        for handle in hooks:
            handle.remove()
        reducer.trace_source = False
    return snapshots


def paint(image: np.ndarray, groups: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """``image: (H, W)`` grey or ``(H, W, 3)`` RGB in [0, 1] -> RGB (H, W, 3): each group's patches in the group's mean
    colour, pruned patches light grey (on grey images the kept ones are tinted blue to stand apart from it)."""
    pixels = image if image.ndim == 3 else image[..., None]
    height, width, channels = pixels.shape
    cell_h, cell_w = height // grid[0], width // grid[1]
    patches = pixels[: grid[0] * cell_h, : grid[1] * cell_w].reshape(grid[0], cell_h, grid[1], cell_w, channels)
    patches = patches.mean((1, 3)).reshape(-1, channels)
    out = np.full((grid[0] * grid[1], channels), np.nan)
    for row in groups.numpy():
        members = row > 0
        if members.any():
            out[members] = patches[members].mean(0)
    pruned = np.isnan(out[:, 0])
    rgb = np.repeat(out, 3 // channels, axis=1)
    rgb[pruned] = 0.85
    if channels == 1:
        rgb[~pruned, 2] = np.clip(rgb[~pruned, 2] * 0.8 + 0.2, 0, 1)
    return np.kron(rgb.reshape(grid[0], grid[1], 3), np.ones((cell_h, cell_w, 1)))


def display_images(images: torch.Tensor, model: torch.nn.Module) -> np.ndarray:
    """``images: (K, C, H, W)`` model input -> what to draw, in [0, 1]: RGB (K, H, W, 3) un-normalised with the
    model's own mean and std, or grey (K, H, W) scaled to the batch's range (one-channel models such as the embedded
    one)."""
    if images.shape[1] == 3:
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=model)
        mean, std = (torch.tensor(config[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ("mean", "std"))
        return (images.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    grey = images[:, 0].float().cpu().numpy()
    return (grey - grey.min()) / max(float(grey.max() - grey.min()), 1e-6)


def group_borders(groups: torch.Tensor, grid: tuple[int, int], cell: tuple[int, int]) -> np.ndarray:
    """The borders between patches of different groups as line segments ``(S, 2, 2)`` (two (x, y) ends each, in the
    pixel coordinates ``imshow`` gives the image: pixel centres at whole numbers, so a cell edge lies at ``k - 0.5``).

    ``groups: (G, P)`` 0/1 membership of the ``P = grid[0] * grid[1]`` patches; a patch of no group (pruned) is a
    group of its own kind, so a border runs between it and a kept neighbour but not between two pruned ones.
    ``cell``: (height, width) of a patch in pixels."""
    label = np.full(grid[0] * grid[1], -1)
    for index, row in enumerate(groups.numpy()):
        label[row > 0] = index
    label = label.reshape(grid)
    i, j = np.nonzero(label[:, 1:] != label[:, :-1])  # a border right of patch (i, j)
    x, y0, y1 = (j + 1) * cell[1] - 0.5, i * cell[0] - 0.5, (i + 1) * cell[0] - 0.5
    vertical = np.stack([np.stack([x, y0], -1), np.stack([x, y1], -1)], 1)
    i, j = np.nonzero(label[1:, :] != label[:-1, :])  # a border below patch (i, j)
    y, x0, x1 = (i + 1) * cell[0] - 0.5, j * cell[1] - 0.5, (j + 1) * cell[1] - 0.5
    horizontal = np.stack([np.stack([x0, y], -1), np.stack([x1, y], -1)], 1)
    return np.concatenate([vertical, horizontal]).astype(float)


def outline(ax: plt.Axes, groups: torch.Tensor, grid: tuple[int, int], cell: tuple[int, int]) -> None:
    """Draw the borders between patches of different groups (:func:`group_borders`), as one collection: a line
    artist per segment made the embedded run's figure take 14 s to save."""
    ax.add_collection(LineCollection(group_borders(groups, grid, cell), colors="k", linewidths=0.3), autolim=False)


def pick_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """One cell per reduced method (a label's variants apart, :func:`bench.settings.series_labels`), the one closest
    to the median GMACs (matched cost)."""
    reduced = cells[cells["label"] != "none"]
    reduced = reduced.assign(label=series_labels(reduced))
    target = float(reduced["gmacs"].median())
    return reduced.groupby("label", sort=True).apply(
        lambda g: g.iloc[(g["gmacs"] - target).abs().argsort().iloc[0]], include_groups=False).reset_index()


def token_maps(model: torch.nn.Module, cells: pd.DataFrame, learned: dict[str, dict[str, torch.Tensor]],
               images: torch.Tensor, display: np.ndarray, out_dir: Path, stem: str) -> list[Path]:
    """``images``: (K, C, H, W) model input; ``display``: (K, H, W) grey or (K, H, W, 3) RGB in [0, 1] for drawing."""
    chosen = pick_cells(cells)
    depth = len(model.blocks)
    layers = [depth // 2 - 1, depth - 1]
    grid = tuple(model.patch_embed.grid_size)
    columns = [(row["label"], row) for _, row in chosen.iterrows()]
    with plt.rc_context(STYLE):
        width = min(COLUMN_WIDTH * 2, MAP_WIDTH * (len(columns) + 1))
        fig, axes = plt.subplots(len(images) * 2, len(columns) + 1,
                                 figsize=(width, MAP_HEIGHT * len(images) * 2), squeeze=False)
        snapshots = {}
        for label, row in columns:
            reducer = methods.create(row["method"], **json.loads(row["knobs"]))
            patched = reducer.apply(copy.deepcopy(model))
            reducer.load_learned_state(learned.get(row["cell_key"], {}))
            snapshots[label] = capture_groups(patched, reducer, images, layers)
        for k in range(len(images)):
            for s, layer in enumerate(layers):
                r = 2 * k + s
                axes[r, 0].imshow(display[k], cmap="gray", vmin=0, vmax=1)
                axes[r, 0].set_ylabel(f"block {layer + 1}", fontsize=6)
                for c, (label, row) in enumerate(columns, start=1):
                    groups = snapshots[label][layer][k]
                    axes[r, c].imshow(paint(display[k], groups, grid))
                    outline(axes[r, c], groups, grid, (display.shape[1] // grid[0], display.shape[2] // grid[1]))
                    if r == 0:
                        axes[r, c].set_title(f"{label}\n{row['gmacs']:.3f} G", fontsize=6)
                    axes[r, c].text(0.02, 0.02, f"{len(groups)} tok", transform=axes[r, c].transAxes, fontsize=5,
                                    color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "linewidth": 0})
        axes[0, 0].set_title("input", fontsize=6)
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("merged groups (mean colour, outlined) and pruned patches (grey)", fontsize=7)
        return _save(fig, out_dir, f"token_maps_{stem}")


def token_maps_from_run(work: Any, cells: pd.DataFrame, store: Any, out_dir: str | Path, count: int = 3,
                        naming: pd.DataFrame | None = None) -> list[Path]:
    """The figure for a finished run (``work``: :class:`bench.runner.Workload`; ``cells``: the run's cells, one
    evaluation setting), named as :func:`bench.plots.plot_cells` names that setting among the cells of ``naming``."""
    cells = cells[(cells["model"] == work.config["model"]) & (cells["dataset"] == work.dataset)]
    if cells.empty or (cells["label"] != "none").sum() == 0:
        return []
    (setting, cells), *_ = split_by_setting(cells, naming)
    x, _ = next(iter(work.eval_batches()))
    x = x[:count].to(work.device)
    display = display_images(x, work.model)
    learned = {key: store.learned_state(key) for key in cells["cell_key"]}
    return token_maps(work.model, cells, learned, x, display, Path(out_dir), setting.stem)
