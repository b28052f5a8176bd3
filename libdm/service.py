"""The monitor service: one process watching every registered pool, as
dmeventd does for LVM (``libdm monitor serve``).

It scans the configuration directory (:mod:`libdm.thin.registry`) every
``rescan`` seconds: a pool registered meanwhile gets an autoextend
:class:`~libdm.thin.monitor.Monitor` thread, one unregistered has its
monitor stopped, one whose registration changed is restarted with the new
settings, and one that is not active yet (before ``libdm pool open`` after
a reboot) or whose monitor died is retried at the next scan, then at
doubling intervals up to :attr:`MonitorService.MAX_RETRY` seconds (with
:class:`~libdm._backoff.Backoff`), so a pool left down does not fill the
journal.  What it watches is written to a status file that ``libdm pool
info`` reads.

Logs go to the ``libdm`` loggers; under systemd (``JOURNAL_STREAM`` set)
each line carries its syslog priority, so the journal shows warnings and
errors as such (see :func:`journal_handler`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import sys
import threading
import time
from typing import TYPE_CHECKING, ClassVar, NamedTuple, TextIO

from libdm._backoff import Backoff
from libdm.dm.errors import DMError
from libdm.thin import registry

if TYPE_CHECKING:
    from libdm.thin.monitor import Monitor
    from libdm.thin.pool import Pool

__all__ = ["MonitorService", "journal_handler"]

logger = logging.getLogger("libdm.service")

_PRIORITY: dict[int, int] = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _JournalFormatter(logging.Formatter):
    """``<priority>message``: the journal files the line at that priority
    and adds the time and the unit itself."""

    def format(self, record: logging.LogRecord) -> str:
        level = max((lvl for lvl in _PRIORITY if lvl <= record.levelno), default=logging.DEBUG)
        return f"<{_PRIORITY[level]}>{super().format(record)}"


def journal_handler(stream: TextIO | None = None) -> logging.Handler:
    """A logging handler for a service: syslog priority prefixes when
    stderr goes to the journal, a plain timestamped line otherwise."""
    handler: logging.StreamHandler[TextIO] = logging.StreamHandler(stream or sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return handler


class _Watch:
    """One pool being watched: its registration, pool object and monitor."""

    def __init__(
        self, registration: registry.Registration, pool: Pool, monitor: Monitor[Pool]
    ) -> None:
        self.registration, self.pool, self.monitor = registration, pool, monitor

    def alive(self) -> bool:
        return self.monitor.running

    def stop(self) -> None:
        try:
            self.monitor.join(timeout=30)
        except Exception as exc:  # the thread's own error, already logged
            logger.debug("pool %s: monitor ended with %s", self.pool.name, exc)
        self.pool.close()


class _Retry:
    """A pool that could not be watched, or whose monitor stopped: when to
    try it again, and with which registration (a new one starts afresh)."""

    __slots__ = ("at", "backoff", "registration")

    def __init__(self, registration: registry.Registration, backoff: Backoff) -> None:
        self.registration, self.backoff = registration, backoff
        self.at = 0.0  # time.monotonic()


class _PoolStatus(NamedTuple):
    """A pool's entry in the status file (``libdm pool info`` reads it)."""

    name: str | None
    running: bool
    threshold: int
    percent: int


class MonitorService:
    """Watch every registered pool until :meth:`stop`.

    Args:
        config_dir: the registrations (default ``$LIBDM_MONITOR_DIR`` or
            ``/etc/libdm/monitor.d``).
        status_path: where to write what is watched (default
            ``$LIBDM_RUN_DIR/monitor.json`` or ``/run/libdm/monitor.json``).
        rescan: seconds between scans of the directory.
        interval: each monitor's status-check interval (seconds).
    """

    #: The longest wait, in seconds, before a pool that could not be
    #: watched (or whose monitor stopped) is tried again.
    MAX_RETRY: ClassVar[float] = 60.0

    def __init__(
        self,
        config_dir: str | None = None,
        status_path: str | None = None,
        *,
        rescan: float = 5.0,
        interval: float = 10.0,
    ) -> None:
        self.config_dir = config_dir or registry.config_dir()
        self.status_path = status_path or registry.status_path()
        self.rescan_interval = rescan
        self.interval = interval
        self.watches: dict[str, _Watch] = {}  # by pool directory
        self._retries: dict[str, _Retry] = {}  # by pool directory
        self._stop = threading.Event()
        self._files: dict[str, registry.Registration] = {}  # as of the last scan
        self._invalid: dict[str, str] = {}  # file: why, as reported
        # The status file this service wrote last, held open so that its
        # inode number cannot be given to another file: the service
        # replaces or removes only that one (or a dead service's).
        self._status_fd: int | None = None
        self._status_problem: str | None = None  # logged once, not per scan

    def stop(self) -> None:
        """Ask :meth:`run` to return.  Safe from another thread, not from a
        signal handler: the signal may come while :meth:`run`'s thread
        holds the lock this takes."""
        self._stop.set()

    def run(self) -> None:
        """Scan, watch and report until :meth:`stop`; then stop every
        monitor and remove the status file."""
        logger.info("libdm monitor: watching pools registered in %s", self.config_dir)
        try:
            while not self._stop.is_set():
                self.scan()
                self._stop.wait(self.rescan_interval)
        finally:
            for pool_dir in list(self.watches):
                self._unwatch(pool_dir, "service stopping")
            self._remove_status()
            logger.info("libdm monitor: stopped")

    def scan(self) -> None:
        """One pass: start, restart and stop monitors to match the
        registrations, then write the status file."""
        now = time.monotonic()
        wanted = {r.pool: r for r in self._registrations().values()}
        for pool_dir in list(self.watches):
            watch = self.watches[pool_dir]
            if pool_dir not in wanted:
                self._unwatch(pool_dir, "unregistered")
            elif wanted[pool_dir] != watch.registration:
                self._unwatch(pool_dir, "registration changed")
            elif not watch.alive():
                self._unwatch(pool_dir, "its monitor stopped; will start it again")
                self._failed(watch.registration, now)
            else:
                self._retries.pop(pool_dir, None)  # it ran for a whole scan
        for pool_dir, retry in list(self._retries.items()):
            if wanted.get(pool_dir) != retry.registration:
                del self._retries[pool_dir]  # unregistered or changed
        for pool_dir, registration in wanted.items():
            waiting = self._retries.get(pool_dir)
            if pool_dir in self.watches or (waiting is not None and now < waiting.at):
                continue
            if not self._watch(registration):
                self._failed(registration, now)
        self._write_status(wanted)

    def _registrations(self) -> dict[str, registry.Registration]:
        """The valid registrations, ``{file: Registration}``.  A file that
        is not valid is reported (once while it stays so) and skipped; if
        it was valid at an earlier scan, its pool stays watched as it was
        (a half-saved edit does not stop the watch)."""
        found = registry.read(self.config_dir)
        files = dict(found.valid)
        reported: dict[str, str] = {}
        for bad in found.invalid:
            earlier = self._files.get(bad.path)
            if earlier is not None:
                files[bad.path] = earlier
            if self._invalid.get(bad.path) != bad.reason:
                kept = "" if earlier is None else f", pool {earlier.pool} stays watched as it was"
                logger.error("%s; skipped%s", bad.reason, kept)
            reported[bad.path] = bad.reason
        self._files, self._invalid = files, reported
        return files

    def _failed(self, registration: registry.Registration, now: float) -> None:
        """Try the pool again later: at the next scan, then at doubling
        intervals up to :attr:`MAX_RETRY` seconds."""
        retry = self._retries.get(registration.pool)
        if retry is None:
            first = max(self.rescan_interval, 0.01)
            backoff = Backoff(first, max(first, self.MAX_RETRY))
            retry = self._retries[registration.pool] = _Retry(registration, backoff)
        retry.at = now + retry.backoff.next_delay()

    def _watch(self, registration: registry.Registration) -> bool:
        """Start watching the pool; False if it cannot be watched now."""
        from libdm.thin.pool import Pool

        try:
            pool = Pool.load(registration.pool)
        except (DMError, OSError) as exc:
            logger.warning("pool at %s: cannot be watched yet: %s", registration.pool, exc)
            return False
        if not os.path.exists(pool.path):
            logger.warning(
                "pool %s is not active (libdm pool open %s); will retry",
                pool.name,
                registration.pool,
            )
            pool.close()
            return False
        try:
            monitor = registration.monitor(pool, interval=self.interval).start()
        except (DMError, OSError, ValueError) as exc:
            logger.error("pool %s: cannot be watched: %s", pool.name, exc)
            pool.close()
            return False
        self.watches[registration.pool] = _Watch(registration, pool, monitor)
        logger.info(
            "pool %s: watching (grow by %d%% at %d%% used)",
            pool.name,
            registration.percent,
            registration.threshold,
        )
        return True

    def _unwatch(self, pool_dir: str, why: str) -> None:
        watch = self.watches.pop(pool_dir)
        logger.info("pool %s: no longer watched (%s)", watch.pool.name, why)
        watch.stop()

    def _write_status(self, wanted: dict[str, registry.Registration]) -> None:
        pools = {}
        for pool_dir, registration in wanted.items():
            watch = self.watches.get(pool_dir)
            pools[pool_dir] = _PoolStatus(
                name=None if watch is None else watch.pool.name,
                running=watch is not None and watch.alive(),
                threshold=registration.threshold,
                percent=registration.percent,
            )._asdict()
        status = {"pid": os.getpid(), "updated": time.time(), "pools": pools}
        try:
            problem = self._put_status(json.dumps(status).encode())
        except OSError as exc:
            problem = f"cannot write the status file {self.status_path}: {exc}"
        if problem is not None and problem != self._status_problem:
            logger.error("%s; libdm pool info will not show what is watched", problem)
        self._status_problem = problem

    def _put_status(self, data: bytes) -> str | None:
        """Write the status file through a new temporary file, never
        following a symlink, replacing only a status file this service
        (or a service no longer running) wrote; what is in the way, or
        ``None`` if it was written."""
        directory, name = os.path.split(self.status_path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            current = _lstat(name, dir_fd)
            if current is not None and not self._replaceable(name, current, dir_fd):
                return (
                    f"{self.status_path} is not a status file of this service or of one "
                    f"that stopped; libdm leaves it as it is"
                )
            tmp = f"{name}.{os.getpid()}.tmp"
            try:
                fd = os.open(
                    tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=dir_fd,
                )
            except FileExistsError:
                return f"{os.path.join(directory, tmp)} is in the way; libdm did not make it"
            try:
                with memoryview(data) as rest:
                    while rest:
                        rest = rest[os.write(fd, rest) :]
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                os.close(fd)
                os.unlink(tmp, dir_fd=dir_fd)  # made here (O_EXCL): ours
                raise
            self._close_status()
            self._status_fd = fd
            return None
        finally:
            os.close(dir_fd)

    def _replaceable(self, name: str, st: os.stat_result, dir_fd: int) -> bool:
        """True if the status file is the one this service wrote last, or
        one left by a service that is not running (a restart after a crash)."""
        if self._is_own_status(st):
            return True
        if not stat.S_ISREG(st.st_mode):
            return False
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as fh:
                pid = json.load(fh)["pid"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True  # its service is gone
        except OSError:
            pass
        return False

    def _remove_status(self) -> None:
        """Remove the status file if it is still the one this service wrote."""
        if self._status_fd is None:
            return
        directory, name = os.path.split(self.status_path)
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            self._close_status()
            return
        try:
            st = _lstat(name, dir_fd)
            if st is not None and self._is_own_status(st):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
            self._close_status()

    def _is_own_status(self, st: os.stat_result) -> bool:
        if self._status_fd is None:
            return False
        own = os.fstat(self._status_fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def _close_status(self) -> None:
        if self._status_fd is not None:
            os.close(self._status_fd)
            self._status_fd = None


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
