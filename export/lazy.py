"""A package's public names imported on first use (PEP 562), so that importing the package stays light."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def attach(package: str, where: dict[str, str], submodules: tuple[str, ...] = (),
           computed: dict[str, Callable[[], object]] | None = None) -> tuple[Callable, Callable]:
    """The `__getattr__` and `__dir__` of `package`.

    `where` maps each public name to the module that defines it (absolute, or relative to `package`);
    `submodules` are importable by attribute; `computed` names get their value from a function. Each value is
    kept in the package once asked for, so the next lookup is a plain attribute.
    """
    computed = computed or {}

    def __getattr__(name: str) -> object:
        if name in where:
            value = getattr(importlib.import_module(where[name], package), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        elif name in computed:
            value = computed[name]()
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where, *submodules, *computed})

    return __getattr__, __dir__
