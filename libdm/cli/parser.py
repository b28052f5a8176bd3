"""The argument parser: one subcommand per operation, each with an example.

The command modules declare their subcommands through :func:`command`;
:func:`build_parser` assembles them.  The parser keeps every subcommand's
parser in ``parser.commands`` (``{"pool create": parser, ...}``), which is
how the documentation renders each one's ``--help``.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, Protocol, TypeAlias

from libdm.thin.units import parse_size

if TYPE_CHECKING:
    from libdm.thin.units import Bytes

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

#: The environment variable naming the pool when ``--pool`` is not given.
POOL_ENV = "LIBDM_POOL"

PROG = "libdm"

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


class UsageError(Exception):
    """Bad command-line usage: exit status 2, the message on one line."""

    def __init__(self, message: str, prog: str = PROG) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` instead of
    printing the usage and exiting, so that ``main`` reports them on one
    line like every other error.

    The top-level parser also has ``commands``: each command's full name
    mapped to its subparser (set by :func:`build_parser`).
    """

    commands: dict[str, Parser]

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions and epilogs as prose, but keeps indented lines
    (the examples) as they are."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        prose: list[str] = []

        def flush() -> None:
            if prose:
                out.append(
                    textwrap.fill(
                        " ".join(prose), width, initial_indent=indent, subsequent_indent=indent
                    )
                )
                prose.clear()

        for line in text.splitlines():
            if not line.strip():
                flush()
                out.append("")
            elif line.startswith(" ") or line.rstrip().endswith(":"):
                flush()
                out.append(indent + line.rstrip())
            else:
                prose.append(line.strip())
        flush()
        return "\n".join(out)


class _FormatterClass(Protocol):
    """What argparse's ``formatter_class`` is called as."""

    def __call__(self, *, prog: str) -> argparse.HelpFormatter: ...


#: The subparsers of a group (``add_subparsers`` with ``parser_class=Parser``).
Subparsers: TypeAlias = "argparse._SubParsersAction[Parser]"

#: A command's function: ``func(args)``, returning its exit status (None: 0).
CommandFunc: TypeAlias = Callable[[argparse.Namespace], int | None]


def _formatter(width: int) -> _FormatterClass:
    def make(prog: str) -> argparse.HelpFormatter:
        return _Formatter(prog, width=width, max_help_position=30)

    return make


def size(text: str) -> Bytes:
    """An argparse type: a size such as ``10G`` as ``Bytes``."""
    try:
        return parse_size(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def state_directory(text: str) -> str:
    """An argparse type: ``--pool``'s directory, which may not be empty
    (an empty one must not quietly mean ``$LIBDM_POOL``)."""
    if not text:
        raise argparse.ArgumentTypeError(
            f"the directory is empty: give the pool's state directory, or leave "
            f"--pool out to use ${POOL_ENV}"
        )
    return text


def percentage(text: str) -> int:
    """An argparse type: a whole percentage (0..100)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole percentage") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{value} is not a percentage from 0 to 100")
    return value


def count(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def positive_seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return value


class _Builder:
    """What :func:`command` needs while the parser is being built."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.commands: dict[str, Parser] = {}
        self.debug = Parser(add_help=False)
        self.debug.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks and libdevmapper's log",
        )
        self.json = Parser(add_help=False)
        self.json.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON on stdout"
        )
        self.pool = Parser(add_help=False)
        self.pool.add_argument(
            "--pool",
            metavar="DIR",
            type=state_directory,
            default=argparse.SUPPRESS,
            help=f"the pool's state directory (default: ${POOL_ENV})",
        )

    def group(
        self,
        subparsers: Subparsers,
        name: str,
        help: str,
        description: str,
        examples: Sequence[str],
    ) -> tuple[Parser, Subparsers]:
        epilog = "Example:\n" + "".join(f"  {line}\n" for line in examples)
        parser = subparsers.add_parser(
            name,
            help=help,
            description=description,
            parents=[self.debug],
            formatter_class=_formatter(self.width),
            epilog=epilog,
        )
        sub = parser.add_subparsers(
            title="commands", metavar="COMMAND", dest=f"{name}_command", parser_class=Parser
        )
        sub.required = True
        self.commands[name] = parser
        return parser, sub


_builder: _Builder | None = None


def _current() -> _Builder:
    """The builder of the parser being built."""
    if _builder is None:
        raise RuntimeError("commands are declared only while build_parser() runs")
    return _builder


def command(
    subparsers: Subparsers,
    name: str,
    func: CommandFunc,
    *,
    help: str,
    example: str | Sequence[str],
    description: str | None = None,
    json: bool = False,
    pool: bool = False,
    path: str = "",
) -> Parser:
    """Declare one subcommand.

    Args:
        subparsers: where to add it (the top level, ``pool`` or ``thin``).
        name: the subcommand's name.
        func: ``func(args) -> exit status`` that runs it.
        help: one line for the command list.
        example: one or more example command lines (a str, or a list).
        description: a paragraph for ``--help`` (``help`` by default).
        json: the command reads and takes ``--json``.
        pool: the command works on a pool and takes ``--pool``.
        path: the group, ``"pool"`` or ``"thin"``, for the command's full name.

    Returns:
        The new subparser, to add the command's own arguments to.
    """
    b = _current()
    parents = [b.debug] + ([b.json] if json else []) + ([b.pool] if pool else [])
    examples = [example] if isinstance(example, str) else list(example)
    epilog = "Example:\n" + "".join(f"  {line}\n" for line in examples)
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        epilog=epilog,
        parents=parents,
        formatter_class=_formatter(b.width),
    )
    full = f"{path} {name}".strip()
    parser.set_defaults(func=func, command=full)
    b.commands[full] = parser
    return parser


def build_parser(width: int | None = None) -> Parser:
    """The ``libdm`` argument parser.

    Args:
        width: the help text's width (default: the terminal's).

    Returns:
        The parser; ``parser.commands`` maps each command's full name
        (``"create"``, ``"pool create"``...) to its subparser.
    """
    from libdm.cli import (
        device_cmds,
        docker_cmds,
        monitor_cmds,
        pool_cmds,
        snapshotter_cmds,
        thin_cmds,
    )

    global _builder
    if width is None:
        width = min(max(os.get_terminal_size(2).columns if os.isatty(2) else 80, 60), 100) - 2
    _builder = _Builder(width)
    try:
        parser = Parser(
            prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=_formatter(width)
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
        _, pool_sub = _builder.group(
            sub,
            "pool",
            "thin pools: create, inspect, grow, watch, destroy",
            "Commands on a libdm thin pool, named by its state directory "
            f"(--pool DIR or ${POOL_ENV}).",
            ["libdm pool info --pool /var/lib/images"],
        )
        pool_cmds.register(pool_sub)
        _, thin_sub = _builder.group(
            sub,
            "thin",
            "thin devices and snapshots in a pool",
            "Commands on the thin devices and snapshots of a libdm pool "
            f"(--pool DIR or ${POOL_ENV}).",
            ["LIBDM_POOL=/var/lib/images libdm thin ls --tree"],
        )
        thin_cmds.register(thin_sub)
        _, monitor_sub = _builder.group(
            sub,
            "monitor",
            "the service that watches every registered pool (dmeventd's part)",
            "Commands for the monitor service and its registrations.",
            ["libdm monitor register --pool /var/lib/images", "libdm monitor serve"],
        )
        monitor_cmds.register(monitor_sub)
        snapshotter_cmds.register(sub)
        docker_cmds.register(sub)
        parser.commands = _builder.commands
        return parser
    finally:
        _builder = None
