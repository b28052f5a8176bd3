"""Names a package re-exports, imported on first use (PEP 562).

``import libdm`` then costs next to nothing: the binding, SQLite and the
thin-pool model load when a program first touches ``libdm.Pool`` or
``libdm.create``, and a command such as ``libdm --help`` loads only what
it uses.

A checker does not run ``__getattr__``: each package also imports the same
names under ``TYPE_CHECKING``, so they keep their types (a test checks the
two lists agree).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["exports"]


def exports(
    package: str, table: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` re-exporting the
    names of ``table`` ({module: (name, ...)}) from those modules.

    Submodules of the package resolve too (``libdm.thin`` before anything
    imported it).
    """
    where = {name: module for module, names in table.items() for name in names}
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
