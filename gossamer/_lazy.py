"""Lazy package faces (PEP 562): a face lists where each of its names lives and imports
nothing until a name is used, so ``import gossamer.node`` (or the CLI) stays cheap.

    _EXPORTS = {"Node": "gossamer.node.node", ...}   # or a module relative to the package
    __all__, __getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_face(
    package: str, exports: Mapping[str, str], extra: Sequence[str] = ()
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``'s face.

    ``exports`` maps a name to its module: ``gossamer.…`` absolute, anything else relative to
    ``package``; ``"module:attr"`` when the attribute's name differs.  ``extra``: names the
    package defines itself (listed in ``__all__``).
    """
    namespace = sys.modules[package]
    names = sorted([*extra, *exports])

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = target.partition(":")
        if not module.startswith("gossamer"):
            module = f"{package}.{module}"
        value = getattr(importlib.import_module(module), attr or name)
        setattr(namespace, name, value)  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return names

    return names, __getattr__, __dir__


__all__ = ["lazy_face"]
