"""Waiting on a condition with a deadline, never on a bare sleep: the one
polling loop of the tests."""

from __future__ import annotations

import time
from collections.abc import Callable

#: How often a condition is asked, in seconds.
INTERVAL = 0.05


def wait_for(
    condition: Callable[[], object], timeout: float = 30.0, interval: float = INTERVAL
) -> bool:
    """Ask ``condition`` until it is true or ``timeout`` seconds passed;
    whether it became true (asked once more at the deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def until(
    condition: Callable[[], object],
    what: str,
    timeout: float = 60.0,
    interval: float = INTERVAL,
) -> None:
    """Wait until ``condition`` is true.

    Raises:
        AssertionError: naming ``what`` was awaited, after ``timeout``
            seconds.
    """
    if not wait_for(condition, timeout, interval):
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
