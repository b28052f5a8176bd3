"""Snapshotter commands: ``libdm snapshotter serve`` runs the containerd
snapshotter plugin (:mod:`libdm.snapshotter`) on a unix socket until
SIGTERM or SIGINT; ``libdm snapshotter foreign`` lists the devices named
like its own that it did not make (and leaves alone).

gRPC is imported only when the command runs, so the rest of the command
line works without the ``containerd`` extra.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from libdm.cli.args import (
    POOL_ENV,
    Parser,
    Subparsers,
    UsageError,
    command,
    given_pool,
    group,
)
from libdm.cli.serving import announce, standalone_main

__all__ = ["cmd_foreign", "cmd_serve", "main", "register"]


def cmd_serve(args: argparse.Namespace) -> int:
    pool_dir = given_pool(args)
    try:
        from libdm.snapshotter import load_config, serve
    except ImportError as exc:
        raise UsageError(
            f"the snapshotter needs grpcio and protobuf (pip install 'libdm[containerd]'): {exc}",
            "libdm snapshotter serve",
        ) from None
    config = load_config(args.config, pool=pool_dir)
    if not config.pool:
        raise UsageError(
            f"no pool given: use --pool DIR, set {POOL_ENV}, or pool = in the config",
            "libdm snapshotter serve",
        )
    serve(
        config.pool,
        args.socket,
        config,
        ready=announce,
        exiting=True,
    )
    return 0


def cmd_foreign(args: argparse.Namespace) -> int:
    from libdm.cli.common import emit
    from libdm.snapshotter.config import load_config
    from libdm.snapshotter.core import foreign_devices
    from libdm.thin.pool import Pool

    pool_dir = given_pool(args)
    config = load_config(args.config, pool=pool_dir)
    if not config.pool:
        raise UsageError(
            f"no pool given: use --pool DIR, set {POOL_ENV}, or pool = in the config",
            "libdm snapshotter foreign",
        )
    with Pool.load(config.pool) as pool:
        names = foreign_devices(pool, config)
    emit(args, names, "\n".join(names))
    return 0


def _config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="a TOML file of snapshotter settings (see docs/containerd.rst)",
    )


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        metavar="PATH",
        required=True,
        help="the unix socket to serve on (containerd's proxy plugin address)",
    )
    _config_argument(p)


def register(sub: Subparsers) -> Parser:
    """Add the ``snapshotter`` group and its ``serve`` command to the
    top-level subparsers ``sub``."""
    serve_group = group(
        sub,
        "snapshotter",
        "containerd's snapshotter plugin on a pool",
        "The containerd snapshotter plugin (libdm.snapshotter): containerd's snapshots "
        "gRPC service on a unix socket, every layer a thin snapshot in a libdm pool "
        "(needs the containerd extra: pip install 'libdm[containerd]').",
        ["libdm snapshotter serve --pool /var/lib/images --socket /run/libdm/snapshotter.sock"],
    )
    p = command(
        serve_group,
        "serve",
        cmd_serve,
        pool=True,
        path="snapshotter",
        help="serve containerd's snapshots API on a unix socket until SIGTERM",
        example="libdm snapshotter serve --pool /var/lib/images "
        "--socket /run/libdm/snapshotter.sock",
    )
    _arguments(p)
    f = command(
        serve_group,
        "foreign",
        cmd_foreign,
        pool=True,
        json=True,
        path="snapshotter",
        help="list the pool's devices named like the snapshotter's that it did not make",
        description="List the pool's devices named with the snapshotter's device prefix "
        "that it did not make (the user's, another snapshotter's): it never deletes or "
        "changes them, and logs them at every start and Cleanup.  Nothing is changed.",
        example="libdm snapshotter foreign --pool /var/lib/images",
    )
    _config_argument(f)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m libdm.snapshotter serve --pool DIR --socket PATH [--config FILE]``."""
    return standalone_main(
        "python -m libdm.snapshotter",
        "snapshotter",
        "serve containerd's snapshots API on a unix socket",
        _arguments,
        cmd_serve,
        argv,
    )
