"""What the command modules share, declared once: the parser class and its
usage error, the argument types, the options several commands take, and
:func:`command` and :func:`group`, through which each module declares its
subcommands.

Nothing here imports another module of :mod:`libdm.cli`: the command
modules and the parser import this one, so they need not import each
other.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import textwrap
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn, NotRequired, Protocol, TypeAlias, TypedDict

from libdm.thin.units import parse_size

if TYPE_CHECKING:
    from libdm.thin.units import Bytes

__all__ = [
    "POOL_ENV",
    "PROG",
    "CommandFunc",
    "GrowthOptions",
    "Parser",
    "Subparsers",
    "UsageError",
    "building",
    "command",
    "count",
    "deferred_arguments",
    "formatter",
    "given_pool",
    "group",
    "growth_arguments",
    "growth_options",
    "min_free_space_argument",
    "percentage",
    "positive_seconds",
    "size",
    "state_directory",
]

#: The environment variable naming the pool when ``--pool`` is not given.
POOL_ENV = "LIBDM_POOL"

PROG = "libdm"


def given_pool(args: argparse.Namespace) -> str | None:
    """The pool's state directory as given: ``--pool``, else
    ``$LIBDM_POOL``; None when neither is."""
    directory: str | None = getattr(args, "pool", None) or os.environ.get(POOL_ENV)
    return directory


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


def formatter(width: int) -> _FormatterClass:
    """The help formatter of every libdm parser, at ``width`` columns."""

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
            formatter_class=formatter(self.width),
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


@contextlib.contextmanager
def building(width: int) -> Iterator[dict[str, Parser]]:
    """While a parser is built: :func:`group` and :func:`command` may be
    called.  Yields the commands declared (full name to subparser)."""
    global _builder
    _builder = _Builder(width)
    try:
        yield _builder.commands
    finally:
        _builder = None


def group(
    subparsers: Subparsers,
    name: str,
    help: str,
    description: str,
    examples: Sequence[str],
) -> Subparsers:
    """Declare a group of commands (``pool``, ``thin``, ...); returns its
    subparsers, to declare its commands in with :func:`command`."""
    return _current().group(subparsers, name, help, description, examples)[1]


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
        formatter_class=formatter(b.width),
    )
    full = f"{path} {name}".strip()
    parser.set_defaults(func=func, command=full)
    b.commands[full] = parser
    return parser


# -- options several commands take ----------------------------------------


def growth_arguments(p: argparse.ArgumentParser) -> None:
    """The monitor's growth settings, for ``pool monitor`` and ``monitor
    register``."""
    p.add_argument(
        "--threshold",
        metavar="PCT",
        type=percentage,
        default=80,
        help="percent used at which to grow (default 80)",
    )
    p.add_argument(
        "--percent",
        metavar="PCT",
        type=count,
        default=20,
        help="growth in percent of the current size (default 20)",
    )
    p.add_argument(
        "--metadata-threshold",
        metavar="PCT",
        type=percentage,
        help="percent of metadata used at which to grow it (default: --threshold)",
    )
    p.add_argument(
        "--max-data-size", metavar="SIZE", type=size, help="never grow the data beyond this"
    )
    p.add_argument(
        "--max-metadata-size",
        metavar="SIZE",
        type=size,
        help="never grow the metadata beyond this",
    )
    p.add_argument(
        "--reserve",
        metavar="SIZE",
        type=size,
        help="free space to keep on the filesystem holding a loop pool's files (default 64M)",
    )
    p.add_argument(
        "--spare",
        metavar="DEV",
        action="append",
        default=[],
        help="a block device a block pool may be extended onto, for data or "
        "metadata (repeatable, used in order)",
    )


class GrowthOptions(TypedDict):
    """:func:`growth_options`: ``pool.monitor()``'s keyword options, as
    ``Registration`` takes them too."""

    spares: list[str]
    metadata_threshold: NotRequired[int]
    max_data_size: NotRequired[int]
    max_metadata_size: NotRequired[int]
    reserve: NotRequired[int]


def growth_options(args: argparse.Namespace) -> GrowthOptions:
    """``pool.monitor()`` keyword options from :func:`growth_arguments`'
    (beyond threshold and percent), sizes as ints."""
    options: GrowthOptions = {"spares": list(args.spare)}
    if args.metadata_threshold is not None:
        options["metadata_threshold"] = args.metadata_threshold
    if args.max_data_size is not None:
        options["max_data_size"] = int(args.max_data_size)
    if args.max_metadata_size is not None:
        options["max_metadata_size"] = int(args.max_metadata_size)
    if args.reserve is not None:
        options["reserve"] = int(args.reserve)
    return options


def deferred_arguments(p: argparse.ArgumentParser) -> None:
    """``--no-deferred-removal`` and ``--no-deferred-deletion``, for ``pool
    create`` and ``pool adopt``."""
    p.add_argument(
        "--no-deferred-removal",
        action="store_true",
        help="fail with EBUSY instead of removing a busy device later",
    )
    p.add_argument(
        "--no-deferred-deletion",
        action="store_true",
        help="fail with EBUSY instead of queueing a delete that meets a busy device",
    )


def min_free_space_argument(p: argparse.ArgumentParser) -> None:
    """``--min-free-space``, for ``pool create`` and ``pool adopt``."""
    p.add_argument(
        "--min-free-space",
        metavar="PCT",
        type=percentage,
        default=10,
        help="percent of space that must stay free for new devices (default 10)",
    )
