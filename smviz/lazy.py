"""Lazy package exports (PEP 562). A package lists where each public name lives; the submodule is imported
on the name's first use. Why: importing one light module of a package (the app's Overview reads only
manifests and meta.json files) then does not import the rest of the package, e.g. transformers' model
classes and peft, which take about a second to import."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]) -> list[str]:
    """Make the public names of package `package` lazy and return them sorted (its `__all__`). `exports`:
    {submodule, relative to the package as ".name" or absolute: [the names it defines]}. A name is imported
    on first access and then kept in the package's namespace. Called at the end of the package's __init__:
    `__all__ = lazy_exports(__name__, EXPORTS)`."""
    where = {name: module for module, names in exports.items() for name in names}
    if len(where) != sum(len(names) for names in exports.values()):
        raise ValueError(f"{package}: a name is exported from two submodules")

    class LazyPackage(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            module = where.get(name)
            if module is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            value = getattr(importlib.import_module(module, package), name)
            setattr(self, name, value)
            return value

        def __dir__(self) -> list[str]:
            return sorted(set(vars(self)) | set(where))

        def __setattr__(self, name: str, value: Any) -> None:
            # Importing a submodule binds it as an attribute of its package. Where a submodule shares its
            # name with the function it exports (smviz.train.finetune), the package keeps the function, as
            # an eager `from .finetune import finetune` in __init__ would.
            if name in where and isinstance(value, types.ModuleType) and value.__name__ == f"{package}.{name}":
                value = getattr(value, name)
            super().__setattr__(name, value)

    sys.modules[package].__class__ = LazyPackage
    return sorted(where)
