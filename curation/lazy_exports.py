"""Package APIs that import their modules on first use (PEP 562).

A stage's `__init__` names its whole public API, but importing every module at once costs seconds (datasketch
pulls scipy, dedup pulls numba, the search pulls LightGBM): `mixlab --help`, and every torchrun, Slurm or Ray
process that needs one class, paid for all of them. With `lazy_exports` `from mixlab.curation import X`
imports only X's module; the names, `__all__` and `dir()` stay what they were.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable[[str], Any],
                                                                            Callable[[], list[str]]]:
    """`__all__`, `__getattr__` and `__dir__` for `package`. exports: module -> the names it provides, each
    "name" or "name as alias". A submodule not in `exports` is imported when asked for, as an eager `__init__`
    would have made it an attribute."""
    where: dict[str, tuple[str, str]] = {}
    for module, names in exports.items():
        for spec in names:
            name, _, alias = spec.partition(" as ")
            where[alias or name] = (module, name)

    def __getattr__(name: str) -> Any:
        if name in where:
            module, attribute = where[name]
            value = getattr(importlib.import_module(module), attribute)
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(where) | set(vars(sys.modules[package])))

    return sorted(where), __getattr__, __dir__
