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
import sys
import threading
import time
from typing import TYPE_CHECKING, ClassVar, NamedTuple, TextIO

from libdm._backoff import Backoff
from libdm.dm.errors import DMError
from libdm.thin import registry
from libdm.thin.errors import StateError

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

    def __init__(self, registration: registry.Registration, pool: Pool, monitor: Monitor) -> None:
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

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler)."""
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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.status_path)
            logger.info("libdm monitor: stopped")

    def scan(self) -> None:
        """One pass: start, restart and stop monitors to match the
        registrations, then write the status file."""
        now = time.monotonic()
        try:
            wanted = {r.pool: r for r in registry.registrations(self.config_dir).values()}
        except StateError as exc:
            logger.error("%s; keeping the pools watched as they are", exc)
            wanted = {d: w.registration for d, w in self.watches.items()}
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
        os.makedirs(os.path.dirname(self.status_path), mode=0o755, exist_ok=True)
        tmp = f"{self.status_path}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"pid": os.getpid(), "updated": time.time(), "pools": pools}, fh)
        os.replace(tmp, self.status_path)
