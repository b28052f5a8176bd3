"""What ``libdm docker serve`` and ``libdm snapshotter serve`` share: the
line that says the plugin is ready, and the ``python -m`` entry point
that runs one without the rest of the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from libdm.cli.args import POOL_ENV, UsageError

__all__ = ["announce", "standalone_main"]


class _Served(Protocol):
    """What a plugin server tells once it listens."""

    @property
    def socket_path(self) -> str: ...


def announce(server: _Served) -> None:
    """Say where the plugin serves (the line scripts and tests wait for)."""
    print(f"serving on {server.socket_path}", flush=True)


def standalone_main(
    prog: str,
    name: str,
    help: str,
    arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
) -> int:
    """``python -m libdm.<name> serve --pool DIR ...``: parse ``argv``
    with the serve command's ``arguments``, log to stderr, and ``run`` it.

    Returns:
        The exit status: ``run``'s, 2 on bad usage, 1 when serving failed.
    """
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--debug", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help=help)
    p.add_argument(
        "--pool",
        metavar="DIR",
        default=None,
        help=f"the pool's state directory (default: ${POOL_ENV})",
    )
    arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return run(args)
    except UsageError as exc:
        print(f"libdm {name}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"libdm {name}: {exc}", file=sys.stderr)
        return 1
