"""The package's one lazy-import mechanism: public names resolved from their module on first access.

A package ``__init__`` lists ``{name: module}`` and sets ``__getattr__, __dir__ = lazy_exports(__name__,
mapping, __all__)``, so importing the package costs nothing until a name is used (the trainers pull in TRL
and diffusers, the external rewards their scoring models' code).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, names: Mapping[str, str], public: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` and ``__dir__`` for ``package`` resolving ``names`` (name → module path; a
    module path equal to ``f"{package}.{name}"`` means the submodule itself) and caching each value."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(names[name])
        value = module if names[name] == f"{package}.{name}" else getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(public) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
