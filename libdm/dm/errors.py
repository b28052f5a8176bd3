"""The exception hierarchy: every device-mapper failure is a DMError.

``DMError`` is an ``OSError``, and its subclasses also derive from the
matching builtin where there is one, so callers can write
``except FileNotFoundError`` without knowing about device-mapper, as with
``os`` and ``pathlib``.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Self, TypeAlias

__all__ = [
    "DMError",
    "DeviceBusyError",
    "DeviceExistsError",
    "KernelSupportError",
    "NoSuchDeviceError",
    "PermissionDeniedError",
    "Remedy",
    "RemedyCall",
    "error_for",
]


#: What a DMError pickles as: its class, errno, reason, operation, device,
#: log lines and remedy.
_Pickled: TypeAlias = (
    "tuple[type[DMError], int, str, str, str | None, tuple[str, ...], AnyRemedy | None]"
)


@dataclass(frozen=True)
class Remedy:
    """The keyword argument of the failed call that gets past an error
    (``force=True``), kept apart from the message so that each front end
    names it in its own words: the library as the argument, the ``libdm``
    command as its option (``--force``).

    Attributes:
        argument: the keyword argument's name (it is passed ``True``).
        does: what passing it does, said after its name.
    """

    argument: str
    does: str

    def said(self, spelling: str | None = None) -> str:
        """``"force=True uses it anyway"``, or with ``spelling`` (such as
        ``"--force"``) in place of the argument."""
        return f"{spelling or f'{self.argument}=True'} {self.does}"


@dataclass(frozen=True)
class RemedyCall:
    """Another call that gets past an error, a method of the pool (such as
    ``open``, which finishes what a crash interrupted), kept apart from the
    message so that each front end names it in its own words: the library
    as the method, the ``libdm`` command as the command that calls it.

    Attributes:
        method: the :class:`~libdm.Pool` method's name.
        does: what calling it does, said after it.
        directory: the pool's state directory (``Pool.open`` takes it, and
            a command names the pool by it).
        arguments: the call's keyword arguments, as ``(name, value)``.
    """

    method: str
    does: str
    directory: str
    arguments: tuple[tuple[str, str | bool], ...] = ()

    def said(self, spelling: str | None = None) -> str:
        """``"Pool.open('/var/lib/images') finishes it"``, or with
        ``spelling`` (such as a command line) in place of the call."""
        if spelling is None:
            if self.method == "open":
                spelling = f"Pool.open({self.directory!r})"
            else:
                args = ", ".join(f"{name}={value!r}" for name, value in self.arguments)
                spelling = f"Pool.{self.method}({args})"
        return f"{spelling} {self.does}"


#: Either kind of remedy an error can carry.
AnyRemedy: TypeAlias = "Remedy | RemedyCall"


class DMError(OSError):
    """A device-mapper operation failed.

    Attributes:
        errno: the errno of the failed ioctl (0 when the kernel was never
            reached).
        strerror: the errno's text, or a description of the failure (the
            ``reason``, then the ``remedy`` said for Python, if any).
        reason: the description without the remedy.
        remedy: a :class:`Remedy`, when an argument of the call gets
            past the error, or a :class:`RemedyCall`, when another call
            does; else ``None``.
        operation: what libdm was doing, for example ``"create"``.
        device: the device name the operation was about, or ``None``.
        log_lines: libdevmapper's log lines (and, where readable, the
            kernel's device-mapper messages) captured while the task ran.
    """

    # Set by OSError.__init__ from its two arguments.
    errno: int
    strerror: str
    remedy: AnyRemedy | None = None

    def __init__(
        self,
        err: int,
        message: str,
        operation: str,
        device: str | None = None,
        log_lines: Iterable[str] = (),
    ) -> None:
        super().__init__(err, message)
        self.reason = message
        self.operation = operation
        self.device = device
        self.log_lines: tuple[str, ...] = tuple(log_lines)

    def advise(self, remedy: AnyRemedy, reason: str | None = None) -> Self:
        """Attach ``remedy`` (and, if given, a new ``reason``); the message
        becomes the reason, then the remedy.  Returns the error, to raise."""
        if reason is not None:
            self.reason = reason
        self.remedy = remedy
        self.strerror = f"{self.reason}; {remedy.said()}"
        return self

    def __str__(self) -> str:
        where = f" on {self.device!r}" if self.device is not None else ""
        code = f"[Errno {self.errno}] " if self.errno else ""
        text = f"{self.operation}{where} failed: {code}{self.strerror}"
        if self.log_lines:
            text += "\n  " + "\n  ".join(self.log_lines)
        return text

    def __reduce__(self) -> tuple[Callable[..., DMError], _Pickled]:
        # OSError pickles as (errno, strerror); keep our extra fields too.
        # Rebuilt through DMError.__init__, since subclasses (the thin-pool
        # errors) take other arguments.
        return (
            _rebuild,
            (
                type(self),
                self.errno,
                self.reason,
                self.operation,
                self.device,
                self.log_lines,
                self.remedy,
            ),
        )


def _rebuild(
    cls: type[DMError],
    err: int,
    message: str,
    operation: str,
    device: str | None,
    log_lines: tuple[str, ...],
    remedy: AnyRemedy | None = None,
) -> DMError:
    exc = cls.__new__(cls)
    DMError.__init__(exc, err, message, operation, device, log_lines)
    return exc if remedy is None else exc.advise(remedy)


class NoSuchDeviceError(DMError, FileNotFoundError):
    """The named device does not exist (ENXIO from the kernel)."""


class DeviceBusyError(DMError):
    """The device is in use (EBUSY): open, mounted, or held by another device."""


class DeviceExistsError(DMError, FileExistsError):
    """A device with that name or uuid already exists (EEXIST)."""


class PermissionDeniedError(DMError, PermissionError):
    """The caller lacks CAP_SYS_ADMIN (device-mapper needs root)."""


class KernelSupportError(DMError):
    """The kernel cannot do this: no device-mapper driver, or a target
    type whose module is not loaded."""


_BY_ERRNO: dict[int, type[DMError]] = {
    # ENXIO is the driver's "no device of that name" (a table load can also
    # answer it for a device *in the table*: ops._load tells them apart).
    # ENODEV is not here: it only means a device in a table could not be
    # opened, which says nothing about the device itself.
    _errno.ENXIO: NoSuchDeviceError,
    _errno.ENOENT: NoSuchDeviceError,
    _errno.EBUSY: DeviceBusyError,
    _errno.EEXIST: DeviceExistsError,
    _errno.EACCES: PermissionDeniedError,
    _errno.EPERM: PermissionDeniedError,
}

NEEDS_ROOT = "device-mapper needs CAP_SYS_ADMIN: run as root"


def error_for(
    err: int,
    operation: str,
    device: str | None = None,
    log_lines: Iterable[str] = (),
    message: str | None = None,
) -> DMError:
    """Build the right DMError subclass for an errno.

    Args:
        err: the errno (0 when no ioctl result is known).
        operation: the operation's name, e.g. ``"remove"``.
        device: the device name, if any.
        log_lines: captured log lines to attach.
        message: text to use instead of ``os.strerror(err)``.

    Returns:
        A ``DMError`` (or subclass) instance; the caller raises it.
    """
    cls = _BY_ERRNO.get(err, DMError)
    if message is None:
        message = os.strerror(err) if err else "device-mapper reported a failure"
        if cls is PermissionDeniedError:
            message = f"{message} ({NEEDS_ROOT})"
    return cls(err, message, operation, device, log_lines)
