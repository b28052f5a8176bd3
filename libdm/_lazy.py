"""Names a package re-exports, imported on first use (PEP 562).

``import libdm`` then costs next to nothing: the binding, SQLite and the
thin-pool model load when a program first touches ``libdm.Pool`` or
``libdm.create``, and a command such as ``libdm --help`` loads only what
it uses.
"""

import importlib

__all__ = ["exports"]


def exports(package, table):
    """``__getattr__`` and ``__dir__`` for ``package`` re-exporting the
    names of ``table`` ({module: (name, ...)}) from those modules.

    Submodules of the package resolve too (``libdm.thin`` before anything
    imported it).
    """
    where = {name: module for module, names in table.items() for name in names}
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name):
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

    def __dir__():
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
