"""A containerd snapshotter on a libdm pool, served as a proxy plugin.

containerd's snapshots gRPC service (``containerd.services.snapshots.v1``)
on a unix socket, backed by a :class:`~libdm.Pool`: every container layer
is a thin snapshot of its parent.  ``libdm snapshotter serve --pool DIR
--socket PATH [--config FILE]`` runs it; see docs/containerd.rst.

Needs the ``containerd`` extra (``pip install libdm[containerd]``: grpcio
and protobuf); nothing else in libdm imports gRPC.  :mod:`.core` holds
the semantics and needs neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from libdm.snapshotter.config import Config, MonitorConfig, load_config
from libdm.snapshotter.core import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SnapshotError,
    Snapshotter,
)

if TYPE_CHECKING:
    from libdm.snapshotter.service import Server

__all__ = [
    "AlreadyExists",
    "Config",
    "FailedPrecondition",
    "InvalidArgument",
    "MonitorConfig",
    "NotFound",
    "SnapshotError",
    "Snapshotter",
    "load_config",
    "serve",
]


def serve(
    pool_dir: str,
    socket_path: str,
    config: Config,
    *,
    ready: Callable[[Server], object] | None = None,
    exiting: bool = False,
) -> None:
    """Serve the snapshotter until SIGTERM (see :func:`.service.serve`)."""
    from libdm.snapshotter.service import serve as _serve

    _serve(pool_dir, socket_path, config, ready=ready, exiting=exiting)
