"""A Docker graph-driver plugin on a libdm pool.

Docker 20.10 and older load out-of-process graph drivers (``dockerd
--experimental --storage-driver libdm``): a legacy plugin on
``/run/docker/plugins/libdm.sock`` that answers JSON over HTTP.
``libdm docker serve --pool DIR`` serves one, every layer and container
a thin snapshot in the pool (see docs/docker.rst).

:class:`Driver` is the graph driver itself (Docker's calls as methods),
:func:`serve` and :class:`Server` the protocol, :mod:`libdm.docker.archive`
the layer tar work.  Only the standard library is used.
"""

from libdm.docker.driver import CRASH_POINTS, DockerError, Driver, DriverOptions
from libdm.docker.server import DEFAULT_SOCKET, Server, serve

__all__ = [
    "CRASH_POINTS",
    "DEFAULT_SOCKET",
    "DockerError",
    "Driver",
    "DriverOptions",
    "Server",
    "serve",
]
