"""Docker commands: ``libdm docker serve`` runs the Docker graph-driver
plugin (:mod:`libdm.docker`) on a unix socket until SIGTERM or SIGINT."""

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

__all__ = ["cmd_serve", "main", "register"]


def cmd_serve(args: argparse.Namespace) -> int:
    from libdm.docker import DockerError, DriverOptions, serve

    pool_dir = given_pool(args)
    if not pool_dir:
        raise UsageError(f"no pool given: use --pool DIR or set {POOL_ENV}", "libdm docker serve")
    try:
        options = DriverOptions.parse(args.storage_opt or [])
    except DockerError as exc:
        raise UsageError(str(exc), "libdm docker serve") from None
    serve(
        pool_dir,
        args.socket,
        options,
        ready=announce,
        exiting=True,
    )
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    from libdm.docker.server import DEFAULT_SOCKET

    p.add_argument(
        "--socket",
        metavar="PATH",
        default=DEFAULT_SOCKET,
        help=f"the unix socket to serve on (default {DEFAULT_SOCKET}: dockerd "
        "--storage-driver libdm finds it there)",
    )
    p.add_argument(
        "--storage-opt",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="the base device's settings as Docker names them: dm.basesize, dm.fs, "
        "dm.mkfsarg, dm.mountopt (repeatable; dockerd's own --storage-opt also reach "
        "the plugin)",
    )


def register(sub: Subparsers) -> Parser:
    """Add the ``docker`` group and its ``serve`` command to the
    top-level subparsers ``sub``."""
    serve_group = group(
        sub,
        "docker",
        "Docker's graph-driver plugin on a pool",
        "The Docker graph-driver plugin (libdm.docker): Docker's legacy plugin protocol "
        "on a unix socket, every layer and container a thin snapshot in a libdm pool "
        "(dockerd --experimental --storage-driver libdm).",
        ["libdm docker serve --pool /var/lib/docker-pool"],
    )
    p = command(
        serve_group,
        "serve",
        cmd_serve,
        pool=True,
        path="docker",
        help="serve Docker's graph-driver plugin protocol on a unix socket until SIGTERM",
        example="libdm docker serve --pool /var/lib/docker-pool --storage-opt dm.basesize=20G",
    )
    _arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m libdm.docker serve --pool DIR [--socket PATH] [--storage-opt K=V]``."""
    return standalone_main(
        "python -m libdm.docker",
        "docker",
        "serve Docker's graph-driver plugin protocol",
        _arguments,
        cmd_serve,
        argv,
    )
