"""Lazy public names for subpackages (PEP 562), so that importing one analyzer loads only its own code.

A subpackage's ``__init__`` keeps its ``__all__`` and maps each public name to the submodule that
defines it; the submodule is imported on first access of one of its names::

    __getattr__, __dir__ = lazy_exports(__name__, {"extract": ["extract", ...], "embed": ["embed", ...]})

A public name that is also a submodule's name (``core.extract``, ``dissection.dissect``)
keeps meaning the function, as with eager ``from .extract import extract``: the import system binds
a loaded submodule onto its package, and the package's module class binds the name instead.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["lazy_exports"]


def lazy_exports(package, exports):
    """Module ``__getattr__`` and ``__dir__`` that import ``package.<submodule>`` on first use of its names.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    exports : dict of str -> list of str
        Submodule name (relative to ``package``, or absolute when it starts with ``conceptlens.``,
        for a name re-exported from the core) -> the public names it defines.

    Returns
    -------
    tuple of callables
        ``(__getattr__, __dir__)`` to assign in the package's namespace.
    """
    where = {name: sub for sub, names in exports.items() for name in names}
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module._shadowed = frozenset(name for name, sub in where.items() if name == sub)

    def __getattr__(name):
        sub = where.get(name)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(sub if sub.startswith("conceptlens.") else f"{package}.{sub}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__


class _LazyPackage(types.ModuleType):
    """A package whose public names win over same-named submodules (see the module docstring)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_shadowed", ()) \
                and value.__name__ == f"{self.__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)
