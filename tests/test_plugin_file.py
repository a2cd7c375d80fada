"""A user's method in one file outside the project, loaded with ``--plugins``: it runs, is listed, and plots."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tests.conftest import ROOT, run_cli
from tests.test_store import tiny_config

PLUGIN = '''"""Keep the first ``keep`` patch tokens after block 0 (a toy reducer, written as a user would)."""
import torch

from methods.base import Knob, TokenReducer, register_reducer
from methods.tokens import keep_tokens


@register_reducer("first_k")
class FirstK(TokenReducer):
    knobs = (Knob("keep", int, default=32, low=1, sweep=(48, 16), help="patch tokens kept after block 0"),)
    off = {"keep": 1_000_000}

    def reduce(self, layer, x, ctx):
        if layer != 0 or self.keep >= x.shape[1] - ctx.num_prefix:
            return x
        kept = torch.arange(ctx.num_prefix + self.keep, device=x.device).expand(x.shape[0], -1)
        return keep_tokens(x, ctx, kept)
'''


def test_a_plug_in_file_outside_the_project_runs_lists_and_plots(tmp_path: Path, tiny_imagefolder: Path) -> None:
    """``--plugins first_k`` on a file in another folder (on PYTHONPATH): ``list`` shows its knob, ``run --methods
    none,first_k`` measures its declared sweep beside the baseline (fewer GMACs for fewer tokens: the tiny ViT has
    64 patches, 2 blocks), and ``plot`` draws it from the store."""
    plugins = tmp_path / "mine"
    plugins.mkdir()
    (plugins / "first_k.py").write_text(PLUGIN)
    env = {"PYTHONPATH": f"{ROOT}:{plugins}", "TOKENBENCH_PLUGINS": "tests.tiny_model"}
    listed = run_cli("list", "--plugins", "first_k", env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "first_k" in listed.stdout and "keep: int = 32" in listed.stdout
    config = tiny_config(tmp_path, tiny_imagefolder, [2])
    store, reports = tmp_path / "s.sqlite", tmp_path / "r"
    ran = run_cli("run", "--config", str(config), "--methods", "none,first_k", "--plugins", "first_k", "--store",
                  str(store), "--reports", str(reports), "--quiet", env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    rows = pd.read_csv(reports / "results.csv").set_index("knobs")
    assert sorted(rows["method"]) == ["first_k", "first_k", "none"]  # tome: in the config, not run, not stored
    assert rows.loc["keep=16", "gmacs"] < rows.loc["keep=48", "gmacs"] < rows.loc["-", "gmacs"]
    plotted = run_cli("plot", "--store", str(store), "--reports", str(tmp_path / "p"), "--plugins", "first_k", env=env)
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    assert (tmp_path / "p" / "frontier_test_tiny_vit__imagefolder.pdf").is_file()
