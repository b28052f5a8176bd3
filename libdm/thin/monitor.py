"""Autoextend: grow a pool before it fills, as LVM's dmeventd and Docker's
``dm.thinp_autoextend_threshold`` / ``dm.thinp_autoextend_percent`` did.

The monitor sets the pool's low water mark from the threshold, so the
kernel raises an event as soon as free space falls below it, and waits for
events with a timeout as a fallback (events are edge-triggered, and every
resume raises one too, so the status is read after every wake-up rather
than trusted).  When data or metadata use reaches the threshold, it grows
that part by ``percent`` of its size:

* loop pools by growing their files, while the filesystem holding them
  keeps ``reserve`` bytes free;
* block pools by extending onto the next of the ``spares`` devices, or
  else into the free tail of a device they sit on (what
  ``create_on_device`` left free), data and metadata alike;
* or through a ``grow`` callback, for anything else (an LVM volume, a
  cloud disk), after which the pool is refreshed.

Every step is logged on the ``libdm.monitor`` logger and kept in
:attr:`Monitor.history`; failures back off exponentially; ``max_data_size``
and ``max_metadata_size`` are hard limits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, Self, TypeVar

from libdm._backoff import Backoff
from libdm.dm.errors import DMError
from libdm.dm.events import wait_event
from libdm.thin.backing import CAPABILITIES
from libdm.thin.errors import PoolFailedError
from libdm.thin.units import Bytes, Sectors, format_size, parse_size

if TYPE_CHECKING:
    import typing_extensions

    from libdm.thin.config import PoolKind
    from libdm.thin.growth import Region
    from libdm.thin.pooldev import PoolStatus
    from libdm.thin.units import DataBlocks

__all__ = ["GrowCallback", "GrowthStep", "Monitor", "Part", "Watched"]

#: The part of a pool a step grows.
Part = Literal["data", "metadata"]


class Watched(Protocol):
    """What the monitor asks of the pool it watches (a :class:`~libdm.Pool`):
    its public methods, so this module needs nothing above it."""

    @property
    def name(self) -> str: ...

    @property
    def directory(self) -> str: ...

    @property
    def kind(self) -> PoolKind: ...

    @property
    def block_size(self) -> Sectors: ...

    def settle(self) -> str | None: ...

    def status(self) -> PoolStatus: ...

    def data_size(self) -> Bytes: ...

    def set_low_water_mark(self, blocks: DataBlocks | int) -> None: ...

    def resize(
        self,
        data_size: int | str | None = None,
        metadata_size: int | str | None = None,
        *,
        low_water_mark: int | None = None,
    ) -> PoolStatus: ...

    def extend(
        self,
        device: str,
        *,
        metadata: bool = False,
        force: bool = False,
        start: int | str | None = None,
        length: int | str | None = None,
    ) -> PoolStatus: ...

    def free_regions(self) -> list[Region]: ...

    def refresh(self) -> PoolStatus: ...


#: The pool a monitor watches (a :class:`~libdm.Pool`).
if TYPE_CHECKING:
    # Unparameterised, Monitor and GrowCallback take any pool, as they did
    # before Monitor was generic (mypy --strict accepts them bare then).
    # typing's own TypeVar takes a default from Python 3.13 only.
    W = typing_extensions.TypeVar("W", bound=Watched, default=Any)
else:
    W = TypeVar("W", bound="Watched")

#: ``grow(pool, part, old_size, wanted_size) -> bool``: see :class:`Monitor`.
GrowCallback = Callable[[W, Part, Bytes, Bytes], bool]

logger = logging.getLogger("libdm.monitor")


@dataclass(frozen=True)
class GrowthStep:
    """One thing the monitor did or tried.

    Attributes:
        when: ``time.time()`` of the step.
        part: ``"data"`` or ``"metadata"``.
        used_percent: how full that part was.
        old_size, new_size: ``Bytes`` before and after (equal when it failed).
        error: why it failed, or ``None``.
    """

    when: float
    part: Part
    used_percent: float
    old_size: Bytes
    new_size: Bytes
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True if the step grew the part."""
        return self.error is None


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class Monitor(Generic[W]):
    """Watches one pool and grows it (see the module documentation).

    Args:
        pool: the :class:`~libdm.Pool`.
        threshold: percent used at which data is grown (1..99, default 80).
        percent: how much to grow, in percent of the current size (default 20).
        metadata_threshold: percent used at which metadata is grown
            (default: ``threshold``).
        interval: seconds between status checks when no event comes.
        max_data_size, max_metadata_size: hard limits (bytes or strings).
        reserve: bytes (or a string) to keep free on the filesystem that
            holds a loop pool's files (default ``"64M"``).
        spares: block devices a block pool may be extended onto, in order,
            for data or metadata; without spares, the free tails of the
            pool's own devices (:meth:`Pool.free_regions`) are used.
        grow: ``grow(pool, part, old_size, wanted_size) -> bool``, called
            when the monitor cannot grow the pool itself; return True once
            the devices are bigger (the pool is then refreshed).

    Raises:
        ValueError: thresholds or percent out of range, bad sizes.
    """

    #: Seconds before the first retry after a failed step; each further
    #: failure doubles the wait, up to :attr:`MAX_BACKOFF`.
    FIRST_BACKOFF: ClassVar[float] = 1.0
    MAX_BACKOFF: ClassVar[float] = 300.0

    def __init__(
        self,
        pool: W,
        threshold: int = 80,
        percent: int = 20,
        *,
        metadata_threshold: int | None = None,
        interval: float = 10.0,
        max_data_size: int | str | None = None,
        max_metadata_size: int | str | None = None,
        reserve: int | str = "64M",
        spares: Iterable[str] = (),
        grow: GrowCallback[W] | None = None,
    ) -> None:
        for what, value in (("threshold", threshold), ("metadata_threshold", metadata_threshold)):
            if value is not None and not 0 < value < 100:
                raise ValueError(f"{what} must be a percentage between 1 and 99, got {value}")
        if not 0 < percent <= 1000:
            raise ValueError(f"percent must be between 1 and 1000, got {percent}")
        self.pool = pool
        self.threshold = threshold
        self.percent = percent
        self.metadata_threshold = threshold if metadata_threshold is None else metadata_threshold
        self.interval = interval
        self.max_data_size = None if max_data_size is None else parse_size(max_data_size)
        self.max_metadata_size = (
            None if max_metadata_size is None else parse_size(max_metadata_size)
        )
        self.reserve = parse_size(reserve, what="reserve")
        self.spares: list[str] = list(spares)
        self.grow_callback = grow
        self.history: list[GrowthStep] = []
        self._backoff = Backoff(self.FIRST_BACKOFF, self.MAX_BACKOFF)
        # After a failed step: the monotonic time before which no step is tried.
        self._retry_at: float | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._unsettled: str | None = None  # the last refusal to settle, said once
        # stop() writes here so a wait in progress ends at once.  The pipe
        # lives as long as the monitor: a service makes one per watch.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        weakref.finalize(self, _close_all, self._wake_r, self._wake_w)

    # -- running -----------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to return, ending a wait in progress at once (safe
        from another thread or a signal handler)."""
        self._stop.set()
        with contextlib.suppress(BlockingIOError):  # already woken
            os.write(self._wake_w, b"x")

    def start(self) -> Self:
        """Run in a daemon thread; returns this monitor.  ``with
        pool.monitor(...):`` does the same and stops it at the end."""
        self._stop.clear()
        self._drain_wake()
        self._error = None
        self._thread = threading.Thread(
            target=self._run_in_thread, daemon=True, name=f"libdm-monitor-{self.pool.name}"
        )
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True while a :meth:`start`-ed monitor's thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # re-raised by join()
            self._error = exc

    def join(self, timeout: float | None = None) -> None:
        """Stop a :meth:`start`-ed monitor and wait for it.

        Raises:
            The exception that ended the monitor's thread, if any.
        """
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._error is not None:
            raise self._error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        self.join()
        return False

    def run(self, *, iterations: int | None = None) -> list[GrowthStep]:
        """Watch until :meth:`stop` (or for ``iterations`` wake-ups).

        Returns:
            :attr:`history`.
        """
        self._arm()
        seen: int | None = None
        n = 0
        while not self._stop.is_set() and (iterations is None or n < iterations):
            n += 1
            self.check()
            timeout = self.interval
            if self._retry_at is not None:
                timeout = max(0.0, min(timeout, self._retry_at - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                seen = wait_event(
                    self.pool.name, seen, timeout=max(timeout, 0.01), wake_fd=self._wake_r
                )
        self._drain_wake()
        return self.history

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def check(self) -> list[GrowthStep]:
        """Read the status once and grow what crossed its threshold.

        Returns:
            The :class:`GrowthStep` values of this check (maybe none).
        """
        if self._retry_at is not None and time.monotonic() < self._retry_at:
            return []  # backing off after a failed step
        try:
            settled = self.pool.settle()
        except DMError as exc:
            # Said once while it stays so; the status below says the rest.
            if str(exc) != self._unsettled:
                logger.warning(
                    "pool %s: an interrupted change is not settled: %s", self.pool.name, exc
                )
            self._unsettled = str(exc)
        else:
            self._unsettled = None
            if settled is not None:
                logger.warning("pool %s: settled an interrupted %s", self.pool.name, settled)
        st = self.pool.status()
        if st.failed:
            return [
                self._record(
                    "data", 100.0, Bytes(0), Bytes(0), f"the pool has failed ({st.state})"
                )
            ]
        steps: list[GrowthStep] = []
        data_pct = 100.0 * int(st.used_data) / max(int(st.total_data), 1)
        if data_pct >= self.threshold:
            steps.append(self._grow("data", data_pct))
        meta_pct = 100.0 * int(st.used_meta) / max(int(st.total_meta), 1)
        if meta_pct >= self.metadata_threshold:
            steps.append(self._grow("metadata", meta_pct))
        failed = [s for s in steps if not s.ok]
        if failed:
            self._retry_at = time.monotonic() + self._backoff.next_delay()
        elif steps:
            self._backoff.reset()
            self._retry_at = None
        return steps

    # -- growing -------------------------------------------------------------------

    def _arm(self) -> None:
        """Low water mark = the free blocks left at the threshold."""
        st = self.pool.status()
        if not st.failed:
            self.pool.set_low_water_mark(int(st.total_data) * (100 - self.threshold) // 100)

    def _sizes(self) -> tuple[Bytes, Bytes]:
        """(data, metadata) sizes.

        Raises:
            PoolFailedError: the pool has failed.
        """
        st = self.pool.status()
        if st.failed:
            raise PoolFailedError(f"the pool has failed ({st.state})", "monitor", self.pool.name)
        return self.pool.data_size(), Bytes(int(st.total_meta.bytes()))

    def _grow(self, part: Part, used_pct: float) -> GrowthStep:
        try:
            data, meta = self._sizes()
        except PoolFailedError as exc:  # since check() read the status
            return self._record(part, used_pct, Bytes(0), Bytes(0), str(exc))
        old = data if part == "data" else meta
        limit = self.max_data_size if part == "data" else self.max_metadata_size
        want = Bytes(int(old) + int(old) * self.percent // 100)
        unit = int(self.pool.block_size.bytes()) if part == "data" else 4096
        want = want.round_up(unit)
        if limit is not None and want > limit:
            want = Bytes(limit).round_down(unit)
        if want <= old:
            why = (
                "no room to grow"
                if limit is None
                else f"at its hard limit of {format_size(limit)}"
            )
            return self._record(part, used_pct, old, old, why)
        try:
            new = self._apply(part, old, want)
        except (DMError, OSError, ValueError) as exc:
            return self._record(part, used_pct, old, old, str(exc))
        if new <= old:
            return self._record(part, used_pct, old, old, "no room to grow")
        if part == "data" and not CAPABILITIES[self.pool.kind].resizable:
            self._arm()  # a resize re-armed it already
        return self._record(part, used_pct, old, new, None)

    def _apply(self, part: Part, old: Bytes, want: Bytes) -> Bytes:
        pool = self.pool
        can = CAPABILITIES[pool.kind]
        if can.resizable:
            want = self._clamp_to_filesystem(part, old, want)
            if want <= old:
                raise OSError(
                    f"the filesystem holding {pool.directory} has no room beyond "
                    f"its {format_size(self.reserve)} reserve"
                )
            if part == "data":
                # Re-armed in the same reload: one suspend per step, not two.
                blocks = int(want) // int(pool.block_size.bytes())
                pool.resize(
                    data_size=int(want), low_water_mark=blocks * (100 - self.threshold) // 100
                )
            else:
                pool.resize(metadata_size=int(want))
        elif can.extendable and (self.spares or pool.free_regions()):
            # As LVM's autoextend takes from the volume group: a spare
            # device, else the free tail of one the pool sits on.
            metadata = part == "metadata"
            if self.spares:
                pool.extend(self.spares.pop(0), metadata=metadata)
            else:
                path, start, free = pool.free_regions()[0]
                unit = int(pool.block_size) if part == "data" else 8
                sectors = min(free, (want - old).sectors_up()).round_down(unit)
                if sectors <= 0:
                    raise OSError(f"the free region of {path} is smaller than one block")
                pool.extend(
                    path,
                    metadata=metadata,
                    start=int(start.bytes()),
                    length=int(sectors.bytes()),
                )
        elif self.grow_callback is not None:
            if not self.grow_callback(pool, part, old, want):
                raise OSError(f"the grow callback did not grow the {part}")
            pool.refresh()
        else:
            raise OSError(
                f"no way to grow the {part} of pool {pool.name!r}: give spares or a grow callback"
            )
        data, meta = self._sizes()
        return data if part == "data" else meta

    def _clamp_to_filesystem(self, part: Part, old: Bytes, want: Bytes) -> Bytes:
        """A sparse file may only grow as far as the filesystem can fill it."""
        path = os.path.join(self.pool.directory, "data" if part == "data" else "metadata")
        vfs = os.statvfs(self.pool.directory)
        free = vfs.f_bavail * vfs.f_frsize - int(self.reserve)
        # st_blocks counts 512-byte units; lstat: never through a symlink.
        allocated = int(Sectors(os.lstat(path).st_blocks).bytes())
        room = max(free, 0) + allocated  # the most this file can ever hold
        unit = int(self.pool.block_size.bytes()) if part == "data" else 4096
        return Bytes(min(int(want), room // unit * unit))

    def _record(
        self, part: Part, used_pct: float, old: Bytes, new: Bytes, error: str | None
    ) -> GrowthStep:
        step = GrowthStep(time.time(), part, round(used_pct, 1), Bytes(old), Bytes(new), error)
        self.history.append(step)
        if error is None:
            logger.info(
                "pool %s: %s %.1f%% used, grown from %s to %s",
                self.pool.name,
                part,
                used_pct,
                format_size(old),
                format_size(new),
            )
        else:
            logger.error(
                "pool %s: %s %.1f%% used, could not grow: %s",
                self.pool.name,
                part,
                used_pct,
                error,
            )
        return step
