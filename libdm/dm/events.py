"""Waiting for device-mapper events, with a timeout.

A ``DM_DEVICE_WAITEVENT`` task blocks inside the ioctl with no timeout,
and would hold the library lock all that time.  Instead this opens a
control fd of its own, arms it with ``DM_DEV_ARM_POLL`` (driver 4.37+) and
``poll()``s it: the fd becomes readable when any device raises an event,
and the device's event counter then says whether it was ours.  Arming
before reading the counter means no event can slip between the two.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time

from libdm.dm._lib import lib
from libdm.dm.errors import error_for
from libdm.dm.ops import info
from libdm.dm.task import dm_dir
from libdm.dm.validate import check_name

__all__ = ["wait_event"]


class _Control:
    """The control fd of this process, and which process opened it."""

    fd: int | None = None
    pid: int | None = None


_control = _Control()
_control_lock = threading.Lock()


def _control_fd() -> int:
    # One fd per process; a forked child must open its own.
    with _control_lock:
        fd = _control.fd
        if fd is None or _control.pid != os.getpid():
            path = os.path.join(dm_dir(), "control")
            try:
                fd = _control.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise error_for(
                    exc.errno or 0,
                    "wait_event",
                    None,
                    message=f"cannot open {path}: {exc.strerror}",
                ) from exc
            _control.pid = os.getpid()
        return fd


def wait_event(
    name: str,
    event_nr: int | None = None,
    timeout: float | None = None,
    *,
    wake_fd: int | None = None,
) -> int:
    """Wait until device ``name``'s event counter moves past ``event_nr``.

    A thin pool raises an event when free space falls below its low water
    mark, a resume raises one too, so callers should read the status after
    waking rather than assume why.

    Args:
        name: the device name.
        event_nr: the counter value already seen; ``None`` means "the
            current value", i.e. wait for the next event.
        timeout: seconds to wait at most; ``None`` waits forever.
        wake_fd: a file descriptor (e.g. a pipe's read end) that ends the
            wait early when it becomes readable; another thread or a signal
            handler writes to it to stop a waiter.

    Returns:
        The device's new event number, or the unchanged one when
        ``wake_fd`` ended the wait.

    Raises:
        TimeoutError: no event within ``timeout`` seconds.
        NoSuchDeviceError: the device does not exist (or was removed while
            waiting).
        DMError: the driver cannot arm polling (before 4.37).
    """
    check_name(name)
    if event_nr is None:
        event_nr = info(name).event_nr
    deadline = None if timeout is None else time.monotonic() + timeout
    fd = _control_fd()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if wake_fd is not None:
        poller.register(wake_fd, select.POLLIN)
    while True:
        if lib.libdm_arm_poll(fd) != 0:
            err = errno.EINVAL
            raise error_for(
                err,
                "wait_event",
                name,
                message="the driver cannot arm event polling (needs 4.37+)",
            )
        current = info(name).event_nr
        if current != event_nr:
            return current
        if deadline is None:
            ready = poller.poll()
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no event on device {name!r} within {timeout} s")
            ready = poller.poll(max(1, int(remaining * 1000)))
        if wake_fd is not None and any(fd_ == wake_fd for fd_, _ in ready):
            return current
