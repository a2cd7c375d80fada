"""Loading user plug-ins: modules or ``.py`` files that register reducers (``@register_reducer``) or timm models
(``@register_model``), named by ``--plugins a,b`` or ``$TOKENBENCH_PLUGINS``."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType

from bench.errors import BenchError

ENV_VAR = "TOKENBENCH_PLUGINS"


def plugin_names(flag: str | None) -> list[str]:
    """The plug-ins to load: ``flag``'s comma-separated names, then ``$TOKENBENCH_PLUGINS``'s (blanks dropped)."""
    listed = ",".join(filter(None, [flag, os.environ.get(ENV_VAR)]))
    return [name.strip() for name in listed.split(",") if name.strip()]


def load_plugins(flag: str | None) -> None:
    """Import the shipped plug-ins, then each named one. A name ending in ``.py`` is a file, imported under its
    stem; any other is a module on ``PYTHONPATH``. A plug-in that cannot be found, or fails while importing, is a
    one-line :class:`BenchError` naming it (and the file and line that failed)."""
    import methods  # noqa: F401  (registers the shipped plug-ins)

    for name in plugin_names(flag):
        try:
            import_file(Path(name)) if name.endswith(".py") else import_module(name)
        except BenchError:
            raise
        except Exception as exc:  # the plug-in's own code failed: say where, in one line
            raise BenchError(f"plug-in {name!r} failed while importing, at {failure_site(exc)}: "
                             f"{type(exc).__name__}: {exc}: fix the plug-in") from exc


def import_module(name: str) -> ModuleType:
    """Import module ``name``; a module that is not there (rather than one that imports a missing package) is a
    :class:`BenchError` naming the fix."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise BenchError(f"cannot import plug-in module {name!r} ({exc}): check --plugins / {ENV_VAR} and "
                             "PYTHONPATH, or pass the plug-in's file, e.g. --plugins path/to/my_method.py") from None
        raise


def import_file(path: Path) -> ModuleType:
    """Import the Python file ``path`` as module ``path.stem`` (so its classes have a readable ``__module__``)."""
    if not path.is_file():
        raise BenchError(f"plug-in file {path} not found: pass --plugins PATH.py of an existing file, or a module name")
    loaded = sys.modules.get(path.stem)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
            return loaded
        raise BenchError(f"plug-in file {path} has the name of the module {path.stem!r} already imported "
                         f"(from {getattr(loaded, '__file__', 'built in')}): rename the file")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[path.stem]
        raise
    return module


def failure_site(exc: BaseException) -> str:
    """``file:line`` where ``exc`` arose: a syntax error's own position, else the innermost traceback frame outside
    Python's and the installed packages' files (the plug-in's own line rather than the library call it made)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    installed = tuple(str(Path(prefix).resolve()) for prefix in {sys.prefix, sys.base_prefix})
    own = [f for f in frames if not f.filename.startswith("<") and not str(Path(f.filename).resolve()).startswith(installed)]
    frame = (own or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame else "an unknown line"
