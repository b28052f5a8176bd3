"""Exponential backoff: the one place libdm decides how long to wait
before trying again (a busy device, a held lock, a failed growth)."""

from __future__ import annotations

import time

__all__ = ["Backoff"]


class Backoff:
    """Delays that start at ``first`` seconds and double up to ``cap``.

    The clock is read only once a wait is needed, so the first attempt of
    an operation that succeeds costs no system call.

    Args:
        first: the first delay, in seconds (> 0).
        cap: the longest delay, in seconds (>= ``first``).
        timeout: if given, :meth:`wait` returns ``False`` instead of
            sleeping once this many seconds have passed since the first
            call to :meth:`wait`, :meth:`next_delay` or :meth:`elapsed`.

    Raises:
        ValueError: a delay that is not positive, or ``cap < first``.
    """

    __slots__ = ("_began", "_delay", "cap", "first", "timeout")

    def __init__(self, first: float, cap: float, *, timeout: float | None = None) -> None:
        if not first > 0 or cap < first:
            raise ValueError(f"backoff needs 0 < first <= cap (first {first}, cap {cap})")
        self.first = first
        self.cap = cap
        self.timeout = timeout
        self._delay = first
        self._began: float | None = None

    def elapsed(self) -> float:
        """Seconds since the first wait (0.0, and the clock starts, on the first call)."""
        now = time.monotonic()
        if self._began is None:
            self._began = now
        return now - self._began

    def next_delay(self) -> float:
        """The delay to wait now, in seconds; the next one doubles, up to ``cap``."""
        self.elapsed()
        delay = self._delay
        self._delay = min(delay * 2, self.cap)
        return delay

    def wait(self) -> bool:
        """Sleep for :meth:`next_delay` seconds and return ``True``; or
        return ``False`` without sleeping once ``timeout`` has passed."""
        if self.timeout is not None and self.elapsed() >= self.timeout:
            return False
        delay = self.next_delay()
        if self.timeout is not None:
            delay = max(0.0, min(delay, self.timeout - self.elapsed()))
        time.sleep(delay)
        return True

    def reset(self) -> None:
        """Start again from ``first`` (after a success)."""
        self._delay = self.first
        self._began = None
