"""The ``libdm`` command: device-mapper devices and thin pools from the shell.

Installed as the ``libdm`` console script and run by ``python -m libdm``.
Every command is a thin layer over the library's public API: it parses
arguments, calls one or two library functions and prints the result, as
aligned text for people or, with ``--json``, as JSON for programs.

Exit status: 0 on success, 1 when the operation failed (a
:class:`~libdm.DMError`, another ``OSError``, a pool error such as a
:class:`~libdm.StateError` for a damaged state store, or a store whose
JSON or SQLite data cannot be read), 2 on bad usage (argument errors, and
``ValueError`` from the library's validation of names, sizes and tables),
130 on an interrupt.  Any other exception (``TypeError``,
``AttributeError``, ``KeyError``...) is a bug in libdm: exit status 1, and
the line says so.  An error is one line on stderr,
``libdm: <what failed>: <why>``; ``--debug`` adds the traceback and
libdevmapper's log.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import traceback
from collections.abc import Callable, Sequence

from libdm.cli.args import CommandFunc, UsageError
from libdm.cli.common import CommandError, error_text
from libdm.cli.parser import build_parser

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Errors about stored data, not about the command line: a state store that
# does not parse is a failed operation (1), never bad usage (2).  A
# ProgrammingError is libdm misusing SQLite, so a bug.
_UNREADABLE_STATE = (json.JSONDecodeError, sqlite3.DatabaseError)


def _usage_line(exc: UsageError) -> str:
    prog = exc.prog
    where = prog[len("libdm ") :] if prog.startswith("libdm ") else ""
    hint = f" (see '{prog} --help')"
    return f"libdm: {where + ': ' if where else ''}{exc}{hint}"


def _bug_line(args: argparse.Namespace, exc: BaseException, debug: bool) -> str:
    """The one line for an exception libdm never raises on purpose
    (``TypeError``, ``AttributeError``, ``KeyError``...): a bug in libdm,
    not the user's doing, whatever its type."""
    hint = "" if debug else "; run with --debug for the traceback"
    return (
        f"libdm: {_what(args)}: unexpected {type(exc).__name__}: {error_text(exc)} "
        f"(a bug in libdm, please report it{hint})"
    )


def _what(args: argparse.Namespace) -> str:
    """What the command was about, for the error line: ``remove vol1``,
    ``thin snapshot base layer1``."""
    words: list[str] = [args.command]
    for attr in ("origin", "name", "directory", "device"):
        value = getattr(args, attr, None)
        if isinstance(value, str):
            words.append(value)
    return " ".join(words)


def _configure_logging(debug: bool) -> Callable[[], None]:
    """Log to stderr: everything with ``--debug``, else the monitor's steps."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    logger = logging.getLogger("libdm")
    monitor = logging.getLogger("libdm.monitor")
    saved = (logger.level, monitor.level)
    if debug:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    else:
        monitor.setLevel(logging.INFO)
        monitor.addHandler(handler)
    used = logger if debug else monitor

    def restore() -> None:
        used.removeHandler(handler)
        logger.setLevel(saved[0])
        monitor.setLevel(saved[1])

    return restore


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``libdm`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 failure (a libdm bug included), 2 bad
        usage, 130 interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(_usage_line(exc), file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    debug: bool = args.debug
    restore = _configure_logging(debug)
    failure: BaseException
    code: int
    line: str
    try:
        func: CommandFunc = args.func
        status = func(args)
        sys.stdout.flush()
        return EXIT_OK if status is None else status
    except BrokenPipeError:
        # The reader went away (``libdm ls | head``): nothing to say.
        _silence_stdout()
        return EXIT_FAILED
    except UsageError as exc:
        failure, code, line = exc, EXIT_USAGE, _usage_line(exc)
    except sqlite3.ProgrammingError as exc:
        failure, code, line = exc, EXIT_FAILED, _bug_line(args, exc, debug)
    except _UNREADABLE_STATE as exc:
        failure, code = exc, EXIT_FAILED
        line = f"libdm: {_what(args)}: unreadable stored state: {error_text(exc)}"
    except (OSError, CommandError) as exc:
        failure, code = exc, EXIT_FAILED
        line = f"libdm: {_what(args)}: {error_text(exc, args)}"
    except ValueError as exc:
        failure, code, line = exc, EXIT_USAGE, f"libdm: {_what(args)}: {error_text(exc)}"
    except KeyboardInterrupt as exc:
        failure, code, line = exc, EXIT_INTERRUPTED, f"libdm: {_what(args)}: interrupted"
    except Exception as exc:
        failure, code, line = exc, EXIT_FAILED, _bug_line(args, exc, debug)
    finally:
        restore()
    if debug:
        traceback.print_exception(type(failure), failure, failure.__traceback__, file=sys.stderr)
    print(line, file=sys.stderr)
    return code


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
