"""What the command modules share: printing, naming the pool, opening it."""

from __future__ import annotations

import argparse
import errno
import shlex
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

import libdm
from libdm.cli import output
from libdm.cli.args import POOL_ENV, UsageError, given_pool

if TYPE_CHECKING:
    from libdm.thin.pool import Pool

__all__ = [
    "CommandError",
    "emit",
    "error_text",
    "in_cli_words",
    "load_pool",
    "pool_directory",
    "wants_json",
]


class CommandError(Exception):
    """The operation cannot be done (exit status 1), with a reason that is
    not an ``OSError`` of its own."""


_Error = TypeVar("_Error", bound=BaseException)


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def emit(args: argparse.Namespace, data: object, text: str | Callable[[], str] | None) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text`` (or the
    result of calling it) for people."""
    if wants_json(args):
        sys.stdout.write(output.dumps(data))
    else:
        if callable(text):
            text = text()
        if text:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")


def pool_directory(args: argparse.Namespace) -> str:
    """The pool's state directory: ``--pool``, else ``$LIBDM_POOL``.

    Raises:
        UsageError: neither is given.
    """
    directory = given_pool(args)
    if not directory:
        raise UsageError(
            f"no pool given: use --pool DIR or set {POOL_ENV}", f"libdm {args.command}"
        )
    return directory


def load_pool(args: argparse.Namespace, *, live: bool = True) -> Pool:
    """The pool named by ``args`` (:class:`libdm.Pool` on its state
    directory; nothing is activated).

    Args:
        args: the parsed arguments.
        live: the command needs the pool device to be active; if it is
            not, fail saying how to activate it.

    Raises:
        StateError: no pool in that directory.
        CommandError: ``live`` and the pool device is not active.
    """
    directory = pool_directory(args)
    pool: Pool = libdm.Pool.load(directory)
    if live and not libdm.exists(pool.name):
        pool.close()
        raise CommandError(
            f"pool {pool.name!r} is not active (after a reboot, "
            f"activate it with: libdm pool open {directory})"
        )
    return pool


def in_cli_words(exc: libdm.DMError, args: argparse.Namespace | None = None) -> str:
    """The error's message for the shell: its remedy, if it has one, said
    as the command's option (``force=True`` is ``--force``).  A remedy
    whose option the command that ran (``args``) does not have is left
    out: the remedy is an argument of a call deeper down, and the
    command would refuse the option."""
    remedy = exc.remedy
    if remedy is None:
        return exc.strerror or str(exc)
    if isinstance(remedy, libdm.RemedyCall):
        return f"{exc.reason}; {remedy.said(command_for(remedy))}"
    if args is not None and not hasattr(args, remedy.argument):
        return exc.reason
    return f"{exc.reason}; {remedy.said(_option(remedy.argument))}"


def _option(argument: str) -> str:
    return "--" + argument.replace("_", "-")


#: The command that makes each pool method's call a remedy names: the
#: library says the method, the shell this.
_COMMANDS: dict[str, str] = {
    "open": "libdm pool open {directory}",
    "repair": "libdm pool repair --pool {directory}",
    "resize": "libdm pool resize --pool {directory}",
    "configure": "libdm pool set --pool {directory}",
}


def _value(value: str | bool) -> str:
    """An argument's value as a command's option takes it (a setting of
    ``pool set`` is ``on`` or ``off``)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return shlex.quote(value)


def command_for(remedy: libdm.RemedyCall) -> str:
    """The command line that makes ``remedy``'s call."""
    line = _COMMANDS[remedy.method].format(directory=shlex.quote(remedy.directory))
    return " ".join(
        [line, *(f"{_option(name)} {_value(value)}" for name, value in remedy.arguments)]
    )


def _kernel_reason(lines: Iterable[str]) -> str | None:
    for line in lines:
        if line.startswith("kernel:"):
            reason = line[len("kernel:") :].strip()
            prefix = "device-mapper: "
            return reason[len(prefix) :] if reason.startswith(prefix) else reason
    return None


def error_text(exc: BaseException, args: argparse.Namespace | None = None) -> str:
    """One line saying what went wrong, for ``libdm: <what>: <this>``.

    A :class:`libdm.DMError` gives its message (its remedy as an option
    of the command ``args``, see :func:`in_cli_words`), its errno's name
    and the kernel's own reason when one was captured; another
    ``OSError`` its message, file name and errno name; anything else its
    first line.
    """
    if isinstance(exc, libdm.DMError):
        text = in_cli_words(exc, args)
        name = errno.errorcode.get(exc.errno) if exc.errno else None
        if name:
            text += f" [{name}]"
        reason = _kernel_reason(exc.log_lines)
        if reason:
            text += f" (kernel: {reason})"
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None:
            text = f"{exc.filename}: {text}"
        name = errno.errorcode.get(exc.errno) if exc.errno else None
        if name:
            text += f" [{name}]"
    else:
        text = str(exc) or type(exc).__name__
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
