"""The argument parser: one subcommand per operation, each with an example.

The command modules declare their subcommands through
:func:`libdm.cli.args.command`; :func:`build_parser` assembles them.  The
parser keeps every subcommand's parser in ``parser.commands`` (``{"pool
create": parser, ...}``), which is how the documentation renders each
one's ``--help``.
"""

from __future__ import annotations

import os

from libdm.cli import (
    device_cmds,
    docker_cmds,
    monitor_cmds,
    pool_cmds,
    snapshotter_cmds,
    thin_cmds,
)
from libdm.cli.args import (
    POOL_ENV,
    PROG,
    CommandFunc,
    Parser,
    Subparsers,
    UsageError,
    building,
    command,
    formatter,
    group,
    size,
    state_directory,
)

__all__ = [
    "POOL_ENV",
    "CommandFunc",
    "Parser",
    "Subparsers",
    "UsageError",
    "build_parser",
    "command",
    "size",
]

DESCRIPTION = """\
Drive the Linux device-mapper and libdm thin pools from the shell.

Device commands (create, table, status, ...) work on any device-mapper
device, as dmsetup does. Pool and thin commands work on a libdm pool,
named by its state directory: --pool DIR, or the LIBDM_POOL environment
variable. Sizes take binary suffixes (64K, 512M, 10G) or s for sectors.
"""

EPILOG = """\
Exit status: 0 on success, 1 when the operation failed, 2 on bad usage.
Every command has --help with an example.

Example:
  libdm pool create images --loop /var/lib/images --data-size 10G
  libdm thin create base 1G --pool /var/lib/images
"""


def build_parser(width: int | None = None) -> Parser:
    """The ``libdm`` argument parser.

    Args:
        width: the help text's width (default: the terminal's).

    Returns:
        The parser; ``parser.commands`` maps each command's full name
        (``"create"``, ``"pool create"``...) to its subparser.
    """
    if width is None:
        width = min(max(os.get_terminal_size(2).columns if os.isatty(2) else 80, 60), 100) - 2
    with building(width) as commands:
        parser = Parser(
            prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter(width)
        )
        parser.add_argument(
            "--debug",
            action="store_true",
            default=False,
            help="show tracebacks and libdevmapper's log",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            default=False,
            help="print JSON on stdout (read commands)",
        )
        parser.add_argument(
            "--pool",
            metavar="DIR",
            type=state_directory,
            default=None,
            help=f"the pool's state directory (default: ${POOL_ENV})",
        )
        sub = parser.add_subparsers(
            title="commands", metavar="COMMAND", dest="group", parser_class=Parser
        )
        sub.required = True
        device_cmds.register(sub)
        pool_sub = group(
            sub,
            "pool",
            "thin pools: create, inspect, grow, watch, destroy",
            "Commands on a libdm thin pool, named by its state directory "
            f"(--pool DIR or ${POOL_ENV}).",
            ["libdm pool info --pool /var/lib/images"],
        )
        pool_cmds.register(pool_sub)
        thin_sub = group(
            sub,
            "thin",
            "thin devices and snapshots in a pool",
            "Commands on the thin devices and snapshots of a libdm pool "
            f"(--pool DIR or ${POOL_ENV}).",
            ["LIBDM_POOL=/var/lib/images libdm thin ls --tree"],
        )
        thin_cmds.register(thin_sub)
        monitor_sub = group(
            sub,
            "monitor",
            "the service that watches every registered pool (dmeventd's part)",
            "Commands for the monitor service and its registrations.",
            ["libdm monitor register --pool /var/lib/images", "libdm monitor serve"],
        )
        monitor_cmds.register(monitor_sub)
        snapshotter_cmds.register(sub)
        docker_cmds.register(sub)
        parser.commands = commands
    return parser
