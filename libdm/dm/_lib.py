"""The one place that imports the compiled binding.

Everything above layer 1 reaches libdevmapper through ``ffi`` and ``lib``
from here, so a missing build fails with one clear message.  Their types
are in ``libdm/_libdevmapper.pyi``, where ``CData`` (a C pointer or
struct, imported here for annotations only) is ``Any``: cffi checks those
at the call.
"""

from typing import TYPE_CHECKING

try:
    from libdm._libdevmapper import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "libdm's compiled binding (libdm._libdevmapper) is missing: install the "
        "package with 'pip install .' on a machine with libdevmapper's headers "
        "(Debian: libdevmapper-dev) and a C compiler"
    ) from exc

if TYPE_CHECKING:
    from libdm._libdevmapper import CData as CData

__all__ = ["ffi", "lib"]
