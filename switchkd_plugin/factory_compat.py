"""Make TinyLLaVA Factory importable on Python >= 3.11 without editing its source.

The Factory's chat templates (``tinyllava/data/template/*.py``) are dataclasses whose fields
default to formatter *instances*. Since Python 3.11 ``dataclasses`` rejects any default whose class
is unhashable ("mutable default ... use default_factory"), and the formatters are themselves
``eq=True`` dataclasses, hence unhashable. The fix here gives those formatter classes an identity
hash as soon as their module has executed, before any template module is defined. That restores
the Python 3.10 behaviour (one shared, never-mutated formatter instance per template class).

Each fix is a no-op where it is not needed: on Python < 3.11, and on a Factory whose formatter
classes are already hashable.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence

_FORMATTER_MODULE = "tinyllava.data.template.formatter"
# What the Factory's own training and data code needs; importing them proves the fix worked.
_FACTORY_MODULES = ("tinyllava.model", "tinyllava.data", "tinyllava.utils")


def _make_dataclasses_hashable(module: types.ModuleType) -> None:
    """Give every unhashable dataclass defined in ``module`` an identity ``__hash__``."""
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and value.__module__ == module.__name__
            and dataclasses.is_dataclass(value)
            and value.__hash__ is None
        ):
            value.__hash__ = object.__hash__


class _HashingLoader(importlib.abc.Loader):
    """Wraps the real loader of the formatter module and patches the module right after it runs."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._inner.exec_module(module)
        _make_dataclasses_hashable(module)


class _FormatterFinder(importlib.abc.MetaPathFinder):
    """Finds only the Factory's formatter module, through the normal path finder."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _FORMATTER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _HashingLoader(spec.loader)
        return spec


def install() -> None:
    """Install the import-time fixes (idempotent). Call before importing ``tinyllava``."""
    if sys.version_info < (3, 11):
        return
    already_loaded = sys.modules.get(_FORMATTER_MODULE)
    if already_loaded is not None:
        # E.g. an earlier import of the templates failed after the formatters had loaded.
        _make_dataclasses_hashable(already_loaded)
    if not any(isinstance(finder, _FormatterFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _FormatterFinder())


def import_tinyllava() -> types.ModuleType:
    """Install the fixes, import the Factory's model, data and utils packages, return ``tinyllava``.

    Raises whatever the Factory's import raises (``ModuleNotFoundError`` when it is not on the
    path; other errors under transformers releases it does not support, e.g. 5.x).
    """
    install()
    for name in _FACTORY_MODULES:
        importlib.import_module(name)
    return sys.modules["tinyllava"]
