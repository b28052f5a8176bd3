"""The one place that imports the compiled binding.

Everything above layer 1 reaches libdevmapper through ``ffi`` and ``lib``
from here, so a missing build fails with one clear message.
"""

try:
    from libdm._libdevmapper import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "libdm's compiled binding (libdm._libdevmapper) is missing: install the "
        "package with 'pip install .' on a machine with libdevmapper's headers "
        "(Debian: libdevmapper-dev) and a C compiler"
    ) from exc

__all__ = ["ffi", "lib"]
