"""The kernel's own device-mapper messages around a failure.

When an ioctl fails, the kernel usually says why in its log ("unknown
target type", "Error opening pool device", ...), while the ioctl itself
only returns EINVAL.  This reads those lines back from ``/dev/kmsg`` so an
exception can carry them.  It is only used after a failure, never on the
success path, and silently gives up where the log is not readable
(``dmesg_restrict``, no ``/dev/kmsg``).
"""

from __future__ import annotations

import errno
import os

__all__ = ["device_mapper_messages"]

KMSG = "/dev/kmsg"


# The kernel stamps records with its own clock, which may lag
# CLOCK_MONOTONIC slightly (by a jiffy in the test kernel); records
# already handed out are never repeated.
SLACK_US = 50_000
_last_seq = -1


def device_mapper_messages(since_us: int, limit: int = 8) -> list[str]:
    """Return the kernel's device-mapper messages logged at or after
    ``since_us`` (CLOCK_MONOTONIC microseconds, less a small slack) and not
    returned before, newest last, at most ``limit`` of them."""
    global _last_seq
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    found: list[str] = []
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except OSError as exc:
                # EPIPE: a record was overwritten while reading; go on.
                if exc.errno == errno.EPIPE:
                    continue
                break
            if not record:
                break
            header, _, text = record.decode("utf-8", "replace").partition(";")
            fields = header.split(",")
            if len(fields) < 3 or not fields[1].isdigit() or not fields[2].isdigit():
                continue
            seq = int(fields[1])
            if seq <= _last_seq or int(fields[2]) < since_us - SLACK_US:
                continue
            _last_seq = seq
            text = text.split("\n", 1)[0]
            if text.startswith("device-mapper:"):
                found.append("kernel: " + text)
    finally:
        os.close(fd)
    return found[-limit:]
