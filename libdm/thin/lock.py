"""The pool's lock: threads of this process and other processes take turns.

A change holds an exclusive ``flock`` on the state directory's lock file
(other processes) and a re-entrant thread lock (this process's threads).
A held lock is waited for with :class:`~libdm._backoff.Backoff`, up to the
pool's ``lock_timeout``; the clock is read only once the lock was found
taken, so an uncontended change costs one ``flock``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterator

from libdm._backoff import Backoff
from libdm.thin.errors import PoolLockedError, RefusedError

__all__ = ["LOCK_NAME", "PoolLock"]

LOCK_NAME = "lock"


class PoolLock:
    """The lock file's descriptor, and who holds it.

    Args:
        fd: the open lock file (owned from here on: :meth:`close` closes it).
        path: the lock file's path, for the error.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self._thread_lock = threading.RLock()
        self._depth = 0

    @property
    def thread_lock(self) -> threading.RLock:
        """The re-entrant lock this process's threads take turns on (held
        for the whole of a change; other parts may share it)."""
        return self._thread_lock

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Close the lock file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextlib.contextmanager
    def held(
        self, operation: str, pool_name: str, timeout: float, on_acquire: Callable[[], None]
    ) -> Iterator[None]:
        """Hold the lock for a change; ``on_acquire()`` runs each time it is
        newly taken (re-reading state another process may have changed).

        Raises:
            PoolLockedError: another process held it for ``timeout`` seconds.
            ValueError: the pool is closed.
        """
        with self._thread_lock:
            if self._depth == 0:
                self._acquire(operation, pool_name, timeout)
                try:
                    on_acquire()
                except BaseException:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                    raise
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _acquire(self, operation: str, pool_name: str, timeout: float) -> None:
        if self.fd < 0:
            raise RefusedError(errno.EBADF, f"pool {pool_name!r} is closed", operation, pool_name)
        backoff: Backoff | None = None
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if backoff is None:  # the clock starts only now
                    backoff = Backoff(0.005, 0.1, timeout=timeout)
                if not backoff.wait():
                    raise PoolLockedError(
                        f"another process has been changing pool {pool_name!r} for more "
                        f"than {timeout} s (lock {self.path})",
                        operation,
                        pool_name,
                    ) from None
