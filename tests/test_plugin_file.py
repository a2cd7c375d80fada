"""A user's method in one file outside the project, loaded with ``--plugins``: it runs, is listed, and plots."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench import plugins
from bench.errors import BenchError
from methods import REGISTRY

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
    """A plug-in file in another folder: ``list --plugins first_k`` (the folder on PYTHONPATH) shows its knob,
    ``run --plugins FOLDER/first_k.py --methods none,first_k`` (by its path) measures its declared sweep beside the
    baseline (fewer GMACs for fewer tokens: the tiny ViT has 64 patches, 2 blocks), and ``plot`` draws it."""
    plugin_dir = tmp_path / "mine"
    plugin_dir.mkdir()
    (plugin_dir / "first_k.py").write_text(PLUGIN)
    env = {"PYTHONPATH": f"{ROOT}:{plugin_dir}", "TOKENBENCH_PLUGINS": "tests.tiny_model"}
    listed = run_cli("list", "--plugins", "first_k", env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "first_k" in listed.stdout and "keep: int = 32" in listed.stdout
    config = tiny_config(tmp_path, tiny_imagefolder, [2])
    store, reports = tmp_path / "s.sqlite", tmp_path / "r"
    by_path = {"PYTHONPATH": str(ROOT), "TOKENBENCH_PLUGINS": "tests.tiny_model"}  # the file, not on PYTHONPATH
    ran = run_cli("run", "--config", str(config), "--methods", "none,first_k", "--plugins", str(plugin_dir / "first_k.py"),
                  "--store", str(store), "--reports", str(reports), "--quiet", env=by_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    rows = pd.read_csv(reports / "results.csv").set_index("knobs")
    assert sorted(rows["method"]) == ["first_k", "first_k", "none"]  # tome: in the config, not run, not stored
    assert rows.loc["keep=16", "gmacs"] < rows.loc["keep=48", "gmacs"] < rows.loc["-", "gmacs"]
    plotted = run_cli("plot", "--store", str(store), "--reports", str(tmp_path / "p"), "--plugins",
                      str(plugin_dir / "first_k.py"), env=by_path)
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    assert (tmp_path / "p" / "frontier_test_tiny_vit__imagefolder.pdf").is_file()


BROKEN_PLUGINS = {
    "syntax error": ("def broken(:\n", r"'{path}' failed while importing, at {path}:1: SyntaxError"),
    "error in a library call": ("import torch\n\ntorch.zeros(2, 3) @ torch.zeros(2, 3)\n",  # torch 2.14: no "mm: "
                                r"at {path}:3: RuntimeError: (mm: )?mat1 and mat2 shapes cannot be multiplied"),
    "error in a standard-library call": ("import json\n\njson.loads('{')\n",  # raised in json's own Python code
                                         r"at {path}:3: JSONDecodeError: Expecting property name"),
    "missing dependency": ("import not_a_package_xyz\n", r"at {path}:1: ModuleNotFoundError: No module named "
                                                         r"'not_a_package_xyz'"),
    "name of a shipped method": (PLUGIN.replace('"first_k"', '"tome"'),
                                 r"method name 'tome' is taken by methods.tome.ToMe: register \w+.FirstK under another"),
    "default outside its range": (PLUGIN.replace("default=32", "default=0"), r"plug-in 'first_k' declares knob 'keep' "
                                  r"with default 0, which its own declaration refuses \(knob first_k.keep=0 is outside "
                                  r"\[1, None\]\): fix the Knob"),
    "sweep of the wrong type": (PLUGIN.replace("sweep=(48, 16)", "sweep=(48, 'half')"),
                                r"with sweep value 'half', which its own declaration refuses \(knob first_k.keep='half' "
                                r"is not a int\)"),
    "its own BenchError": ("from bench.errors import BenchError\nraise BenchError('no weights for my method')\n",
                           r"^no weights for my method$"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_PLUGINS))
def test_a_broken_plug_in_file_is_one_error_naming_its_line(case: str, tmp_path: Path) -> None:
    """A plug-in that fails while importing is one :class:`BenchError` naming the file and line (the plug-in's own
    line, not the library's), a name clash, or a knob its own declaration refuses; nothing is registered."""
    source, expected = BROKEN_PLUGINS[case]
    path = tmp_path / f"broken_{re.sub(r'[^a-z]', '_', case)}.py"
    path.write_text(source)
    registered = dict(REGISTRY)
    with pytest.raises(BenchError, match=expected.format(path=re.escape(str(path)))):
        plugins.load_plugins(str(path))
    assert REGISTRY == registered and path.stem not in sys.modules


def test_plug_ins_that_are_not_there_name_the_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    with pytest.raises(BenchError, match=r"cannot import plug-in module 'not_there_xyz' .* --plugins path/to/my_method.py"):
        plugins.load_plugins("not_there_xyz")
    with pytest.raises(BenchError, match=r"cannot import plug-in module 'not_there_xyz.sub' "):  # its package is missing
        plugins.load_plugins("not_there_xyz.sub")
    with pytest.raises(BenchError, match=r"plug-in file .*nowhere.py not found"):
        plugins.load_plugins(str(tmp_path / "nowhere.py"))
    (tmp_path / "bench.py").write_text("")
    with pytest.raises(BenchError, match=r"has the name of the module 'bench' already imported .* rename the file"):
        plugins.load_plugins(str(tmp_path / "bench.py"))


def test_a_plug_in_module_missing_a_dependency_names_the_dependency(tmp_path: Path, monkeypatch) -> None:
    """A module that is there but imports a package that is not: the error is the plug-in's own failure (its line and
    the missing package), not "cannot import plug-in module"."""
    (tmp_path / "needs_dep_xyz.py").write_text("import not_a_package_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(BenchError, match=r"plug-in 'needs_dep_xyz' failed while importing, at .*needs_dep_xyz.py:1: "
                                             r"ModuleNotFoundError: No module named 'not_a_package_xyz'"):
            plugins.load_plugins("needs_dep_xyz")
    finally:
        sys.modules.pop("needs_dep_xyz", None)


def test_a_plug_in_file_loads_once_under_its_stem(tmp_path: Path, monkeypatch) -> None:
    """Named twice (flag and environment), a file is imported once; its class registers under its module's stem."""
    path = tmp_path / "first_k_once.py"
    path.write_text(PLUGIN)
    monkeypatch.setenv(plugins.ENV_VAR, f" {path} ,")
    assert plugins.plugin_names(f"{path},") == [str(path), str(path)]
    try:
        plugins.load_plugins(str(path))
        assert REGISTRY["first_k"].__module__ == "first_k_once"
        assert sys.modules["first_k_once"].__file__ == str(path)
    finally:
        REGISTRY.pop("first_k", None)
        sys.modules.pop("first_k_once", None)
