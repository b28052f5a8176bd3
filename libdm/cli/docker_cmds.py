"""Docker commands: ``libdm docker serve`` runs the Docker graph-driver
plugin (:mod:`libdm.docker`) on a unix socket until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from libdm.cli.parser import POOL_ENV, Parser, Subparsers, UsageError, command

__all__ = ["cmd_serve", "main", "register"]


def cmd_serve(args: argparse.Namespace) -> int:
    from libdm.docker import DockerError, DriverOptions, serve

    pool_dir: str | None = getattr(args, "pool", None) or os.environ.get(POOL_ENV)
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
        ready=lambda server: print(f"serving on {server.socket_path}", flush=True),
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
    from libdm.cli import parser

    _, group = parser._current().group(
        sub,
        "docker",
        "Docker's graph-driver plugin on a pool",
        "The Docker graph-driver plugin (libdm.docker): Docker's legacy plugin protocol "
        "on a unix socket, every layer and container a thin snapshot in a libdm pool "
        "(dockerd --experimental --storage-driver libdm).",
        ["libdm docker serve --pool /var/lib/docker-pool"],
    )
    p = command(
        group,
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
    parser = argparse.ArgumentParser(prog="python -m libdm.docker")
    parser.add_argument("--debug", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve Docker's graph-driver plugin protocol")
    p.add_argument(
        "--pool",
        metavar="DIR",
        default=None,
        help=f"the pool's state directory (default: ${POOL_ENV})",
    )
    _arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return cmd_serve(args)
    except UsageError as exc:
        print(f"libdm docker: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"libdm docker: {exc}", file=sys.stderr)
        return 1
