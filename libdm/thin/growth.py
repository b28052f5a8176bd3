"""Growing a pool: more data or metadata, by sector math, online.

The pool is reloaded with a table computed from its devices as they are
now (the data device's size rounded down to whole data blocks), never
from a size the caller claims, then suspended without flushing (a pool
that is out of space has I/O queued that a flush would wait on forever)
and resumed.  The kernel grows its data space on that resume, and picks
up a larger metadata device on the same reload (after the data: so when
both grow, the metadata goes first, in a reload of its own).  Thin
devices stay active throughout; their I/O waits while the pool is
suspended.

Every growth goes through the journal's one
:class:`~libdm.thin.journal.Transaction`, as a change of thin ids does: an
intent (a :class:`~libdm.thin.journal.GrowthIntent`) naming the
configuration before and after, and the live tables to return to, is
committed first; then the backing grows (files, or a segment recorded),
the pool is suspended, reloaded and resumed; then the new configuration
is recorded and the intent dropped in one commit.  A growth that fails
is rolled back to the recorded tables and sizes before the error is
raised, so the pool is never left suspended; one that a kill interrupts
is finished (or, if that fails, rolled back) by :meth:`Pool.open`.  Before
any of it, a data growth that the metadata cannot map is refused (see
:mod:`libdm.thin.capacity`): the kernel would refuse the resume and leave
the pool read-only and flagged ``needs_check``.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Literal

from libdm.dm import ops
from libdm.dm.blockdev import open_block_device
from libdm.dm.errors import DMError, RemedyCall
from libdm.dm.target import Target
from libdm.thin import backing as backings
from libdm.thin import capacity, crash
from libdm.thin.config import PoolConfig
from libdm.thin.core import PoolCore
from libdm.thin.errors import (
    REPAIR_HINT,
    PoolFailedError,
    PoolFullError,
    PoolReadOnlyError,
    RefusedError,
    StateError,
)
from libdm.thin.journal import GrowthIntent, Transaction
from libdm.thin.label import RESERVED, DeviceLabel, Role, erase_label, write_label
from libdm.thin.pooldev import PoolStatus
from libdm.thin.status import ThinPoolFailed
from libdm.thin.units import Bytes, DataBlocks, Sectors, format_size, parse_size

__all__ = ["Growth", "GrowthIntent"]

logger = logging.getLogger("libdm")

Region = tuple[str, Sectors, Sectors]


class Growth:
    """The pool's growth part: resize, refresh, extend, and the low water
    mark, each journalled (see the module doc).  The public methods are
    the pool's (:meth:`Pool.resize <libdm.Pool.resize>` and the others
    document them); the caller holds nothing, each takes the pool's lock.

    Args:
        core: the core of the pool it grows.
    """

    def __init__(self, core: PoolCore) -> None:
        self.core = core

    def resize(
        self,
        data_size: int | str | None = None,
        metadata_size: int | str | None = None,
        *,
        low_water_mark: int | None = None,
    ) -> PoolStatus:
        core = self.core
        backing = core.backing.files()
        if backing is None:
            raise RefusedError(
                errno.EOPNOTSUPP,
                f"pool {core.name!r} is on {core.kind} devices: "
                f"{core.backing.capabilities.growth_hint}",
                "resize",
                core.name,
            )
        data = None if data_size is None else parse_size(data_size, what="data_size")
        meta = None if metadata_size is None else parse_size(metadata_size, what="metadata_size")
        with core.changing("resize"):
            self.check_growable("resize")
            data_now, meta_now = backing.sizes()
            for what, want, now in (("data", data, data_now), ("metadata", meta, meta_now)):
                if want is not None and want < now:
                    raise ValueError(
                        f"{what} cannot shrink: it is {format_size(now)}, asked "
                        f"{format_size(want)} (a thin pool only grows)"
                    )
            if data is not None and data > data_now:
                # Refused before anything changes, metadata growth included.
                self.check_capacity(
                    "resize",
                    core.config.but(data_size=data),
                    extra_metadata=None if meta is None else Bytes(meta - meta_now),
                )
            # The kernel grows data before metadata on a resume: metadata first.
            if meta is not None and meta > meta_now:
                self.grow("resize", core.config.but(metadata_size=meta))
            if data is not None and data > data_now:
                new = core.config.but(data_size=data)
                if low_water_mark is not None:
                    new = new.but(low_water_mark=DataBlocks(int(low_water_mark)))
                self.grow("resize", new)
            return core.status()

    def refresh(self) -> PoolStatus:
        core = self.core
        with core.changing("refresh"):
            self.check_growable("refresh")
            self.grow("refresh", core.config)
            return core.status()

    def extend(
        self,
        device: str,
        *,
        metadata: bool = False,
        force: bool = False,
        start: int | str | None = None,
        length: int | str | None = None,
    ) -> PoolStatus:
        from libdm.thin.creation import check_device

        core = self.core
        backing = core.backing.pieces()
        if backing is None:
            raise RefusedError(
                errno.EOPNOTSUPP,
                f"pool {core.name!r} is a {core.kind} pool: "
                f"{core.backing.capabilities.growth_hint}",
                "extend",
                core.name,
            )
        first = (
            None
            if start is None
            else (0 if start in (0, "0") else int(parse_size(start, what="start").sectors()))
        )
        count = None if length is None else int(parse_size(length, what="length").sectors())
        with core.changing("extend"):
            self.check_growable("extend")
            used = self.used_regions(os.stat(device).st_rdev)
            if used:
                # A device the pool already sits on: only its free part.
                size = int(Bytes(open_block_device(device).size).whole_sectors())
                # The free part starts at the next 4 KiB after the last use.
                free = int(Sectors(max(stop for _, stop in used)).round_up(8))
                if first is None and free >= size:
                    raise RefusedError(
                        errno.EBUSY,
                        f"{device} is already part of pool {core.name!r} and has no free part "
                        f"left",
                        "extend",
                        core.name,
                    )
                first = free if first is None else first
                clash = [
                    (a, b) for a, b in used if first < b and a < (first + count if count else size)
                ]
                if clash:
                    raise RefusedError(
                        errno.EBUSY,
                        f"{device} is already part of pool {core.name!r} in sectors "
                        f"{', '.join(f'{a}-{b}' for a, b in clash)}; its free part starts "
                        f"at sector {free}",
                        "extend",
                        core.name,
                    )
            else:
                size = int(Bytes(check_device(device, force, "extend").size).whole_sectors())
                # A whole device gets the pool's label, and the pool maps it
                # from after the label (see libdm.thin.label).
                labelled = first is None or first >= int(RESERVED)
                first = int(RESERVED) if first is None else first
            if first + (count if count is not None else 1) > size or (
                count is not None and count <= 0
            ):
                raise ValueError(
                    f"region {first}+{count} sectors does not fit on {device} ({size} sectors)"
                )
            side: Literal["meta_segments", "data_segments"] = (
                "meta_segments" if metadata else "data_segments"
            )
            # Segments before the new one are pinned to their current length:
            # if one of them grew later, everything after it would shift.
            fields = core.config.backing
            recorded = fields.meta_segments if metadata else fields.data_segments
            segments: list[list[Any]] = [
                [seg.path, int(seg.start), seg.length] for seg in recorded or ()
            ]
            for seg, target in zip(segments, backing.table(segments), strict=False):
                seg[2] = int(target.length)
            last = segments[-1]
            if (
                used
                and os.stat(last[0]).st_rdev == os.stat(device).st_rdev
                and last[1] + last[2] == first
            ):
                # Right after the last segment: that segment just grows.
                last[2] += (size - first) if count is None else count
            else:
                segments.append([device, first, count])
            label = None
            if not used and labelled:
                role = Role.META if metadata else Role.DATA
                label = DeviceLabel(
                    core.config.token, core.name, core.directory, role, len(segments) - 1
                )
                write_label(device, label)
            # The devices are recorded as at creation (size, path, label), so
            # a forged or swapped device is refused at the next open.
            try:
                changes = backings.segment_changes(core.config, side, segments)
                self.grow("extend", core.config.with_backing(**changes))
            except BaseException:
                if label is not None:
                    erase_label(device, core.config.token)
                raise
            return core.status()

    def used_regions(self, rdev: int) -> list[tuple[int, int]]:
        """The ``(start, end)`` sectors the pool uses on the block device
        ``rdev``, from both sides' segments."""
        core = self.core
        backing = core.backing.pieces()
        if backing is None:
            return []
        out = []
        # A repair's spare and the metadata it swapped out are the pool's too.
        fields = core.config.backing
        for recorded in (
            fields.meta_segments,
            fields.data_segments,
            fields.spare_segments,
            fields.damaged_meta_segments,
        ):
            segments = recorded or ()
            targets = backing.table(segments)
            for (path, start, _), target in zip(segments, targets, strict=True):
                if os.path.exists(path) and os.stat(path).st_rdev == rdev:
                    out.append((int(start), int(start) + int(target.length)))
        # So is the first MiB of a device carrying the pool's label.
        for record in backing.labelled_devices():
            if os.path.exists(record.path) and os.stat(record.path).st_rdev == rdev:
                out.append((0, int(RESERVED)))
                break
        return out

    def free_regions(self) -> list[Region]:
        backing = self.core.backing.pieces()
        if backing is None:
            return []
        seen: set[int] = set()
        out: list[Region] = []
        for path in backing.paths():
            rdev = os.stat(path).st_rdev
            if rdev in seen:
                continue
            seen.add(rdev)
            end = Sectors(max(stop for _, stop in self.used_regions(rdev))).round_up(8)
            size = Bytes(open_block_device(path).size).whole_sectors()
            if size > end:
                out.append((path, end, size - end))
        return sorted(out, key=lambda region: -int(region[2]))

    def set_low_water_mark(self, blocks: DataBlocks | int) -> None:
        count = int(blocks)
        if count < 0:
            raise ValueError("the low water mark must be >= 0 data blocks")
        with self.core.changing("set_low_water_mark"):
            if count == int(self.core.config.low_water_mark):
                return
            self.grow("set_low_water_mark", self.core.config.but(low_water_mark=DataBlocks(count)))

    def check_growable(self, operation: str) -> None:
        core = self.core
        st = core.status()
        if core.device.last_info is not None:
            # A growth suspends and reloads the pool: not over a suspend or
            # a table of another program's, whose end libdm cannot know.
            core.refuse_if_held(core.device.last_info, operation)
        if isinstance(st, ThinPoolFailed):
            raise PoolFailedError(
                f"pool {core.name!r} has failed ({st.state}); {REPAIR_HINT}", operation, core.name
            )
        if st.needs_check:
            raise PoolReadOnlyError(
                f"pool {core.name!r} needs its metadata checked "
                f"(needs_check) and cannot grow; {REPAIR_HINT}",
                operation,
                core.name,
            )

    # -- the growth protocol ---------------------------------------------------------

    def grow(self, operation: str, new: PoolConfig) -> None:
        """Reload the pool on configuration ``new`` (its own with changes
        made by :meth:`PoolConfig.but <libdm.thin.config.PoolConfig.but>`),
        through the journal (see the module doc)."""
        core = self.core
        if not core.backing.capabilities.owns_devices:
            raise RefusedError(
                errno.EPERM,
                f"pool {core.name!r} was adopted: its devices and table are not libdm's to change",
                operation,
                core.name,
            )
        old = core.config
        self.check_capacity(operation, new)
        txn = core.journal.open_growth(GrowthIntent(operation, old, new, self.live_tables()))
        try:
            self.apply(new)
        except BaseException as exc:
            self.roll_back(txn, operation, exc)
            raise
        txn.commit()

    def live_tables(self) -> dict[str, tuple[str, ...]]:
        """The live tables of the pool and its linear pieces, as text."""
        core = self.core
        names = [core.name, *core.backing.piece_names()]
        return {name: tuple(str(t) for t in ops.table(name)) for name in names if ops.exists(name)}

    def apply(self, config: PoolConfig) -> None:
        """Bring the backing and the pool's table to ``config``; idempotent,
        so that Pool.open can finish a growth a kill interrupted."""
        core = self.core
        core.use_config(config)
        files = core.backing.files()
        if files is not None:
            files.grow(config.data_size, config.metadata_size)
        crash.point("grow:backing")
        # Suspend first: growing a linear piece under the pool (attach) and
        # loading the longer pool table happen while its I/O waits.
        ops.suspend(core.name, flush=False)
        with core.backing.attach() as devs:
            table = core.table_for(devs)
        ops.reload(core.name, table)
        crash.point("grow:loaded")
        ops.resume(core.name)
        crash.point("grow:resumed")

    def roll_back(self, txn: Transaction, operation: str, cause: BaseException | None) -> None:
        """Put the pool back on the tables and sizes it had before the
        growth, resumed, and withdraw the intent; the store's configuration
        was never changed.  Raises StateError if that fails too (the
        intent stays, so Pool.open tries again)."""
        core = self.core
        intent = txn.intent
        assert isinstance(intent, GrowthIntent)
        old = intent.old
        core.use_config(old)
        tables = {
            name: [Target.parse(line) for line in lines] for name, lines in intent.tables.items()
        }
        try:
            if core.name in tables:
                # The pool first, onto its old (shorter) table; then what
                # is under it may shrink back.
                ops.suspend(core.name, flush=False)
                ops.reload(core.name, tables[core.name])
                ops.resume(core.name)
            for name, table in tables.items():
                if name != core.name and ops.exists(name) and ops.table(name) != table:
                    ops.reload(name, table)
                    ops.suspend(name, flush=False)
                    ops.resume(name)
            self.shrink_files_back(old)
        except DMError as exc:
            self.resume_if_suspended()
            raise StateError(
                f"{operation} of pool {core.name!r} failed ({cause}) and so did putting the "
                f"pool back ({exc})",
                operation,
                core.name,
            ).advise(RemedyCall("open", "finishes or undoes it", core.directory)) from exc
        finally:
            self.resume_if_suspended()
        txn.withdraw()
        logger.warning("pool %s: %s rolled back (%s)", core.name, operation, cause)
        self.clear_needs_check_offline(operation)

    def resume_if_suspended(self) -> None:
        try:
            if ops.info(self.core.name).suspended:
                ops.resume(self.core.name)
        except DMError:
            pass

    def shrink_files_back(self, old: PoolConfig) -> None:
        """Undo this growth's own file growth: only down to the recorded
        sizes, and only where the kernel maps no more than them."""
        core = self.core
        files = core.backing.files()
        if files is None:
            return
        st = core.status()
        if isinstance(st, ThinPoolFailed):
            return
        data = int(st.total_data) * int(core.block_size.bytes())
        meta = int(st.total_meta.bytes())
        files.undo_growth(
            Bytes(max(int(old.data_size), data)), Bytes(max(int(old.metadata_size), meta))
        )

    def clear_needs_check_offline(self, operation: str) -> None:
        """A resume the kernel refused may have flagged the metadata
        needs_check and made the pool read-only.  If none of its devices
        is open, take the pool down, let thin_check clear the flag, and
        bring it back; otherwise say what to do."""
        core = self.core
        st = core.status()
        if isinstance(st, ThinPoolFailed) or not st.needs_check:
            return
        live = core.live_devices(core.store.active_devices(), operation)
        busy = [name for name, proven in live.items() if proven.info.open_count]
        if busy or not core.backing.capabilities.owns_devices:
            raise PoolReadOnlyError(
                f"the kernel refused the change and flagged pool {core.name!r} needs_check "
                f"(read-only); close {', '.join(busy) or 'its devices'} first",
                operation,
                core.name,
            ).advise(RemedyCall("open", "then checks and clears it", core.directory))
        for name in live:
            ops.remove(core.device_dm_name(name))
        ops.remove(core.name)
        core.activate_pool("open")  # thin_check --clear-needs-check-flag first
        for row in core.store.active_devices():
            core.activate(row, operation)

    def finish(self, intent: GrowthIntent, operation: str) -> bool:
        """Pool.open: finish a growth a kill interrupted (True), or roll it
        back if it cannot be finished (False).  The pool may be down (a
        reboot), or live and suspended, with or without the new table
        loaded."""
        core = self.core
        txn = Transaction(core.journal, intent)
        try:
            if core.pool_is_live(operation):
                self.apply(intent.new)
            else:
                core.use_config(intent.new)
                files = core.backing.files()
                if files is not None:
                    files.grow(intent.new.data_size, intent.new.metadata_size)
                core.activate_pool(operation)
        except (DMError, OSError, ValueError) as exc:
            logger.warning(
                "pool %s: could not finish the interrupted %s (%s); rolling back",
                core.name,
                intent.operation,
                exc,
            )
            if core.pool_is_live(operation):
                self.roll_back(txn, operation, exc)
            else:
                core.use_config(intent.old)
                txn.withdraw()
            return False
        txn.commit()
        return True

    def check_capacity(
        self, operation: str, config: PoolConfig, extra_metadata: Bytes | None = None
    ) -> None:
        """Refuse a data growth the metadata cannot map (PoolFullError with
        the metadata size it takes).  ``extra_metadata``: what the metadata
        grows by first, in the same call."""
        core = self.core
        st = core.status()
        if isinstance(st, ThinPoolFailed):
            return
        new_blocks = int(core.data_sectors(config)) // int(core.block_size)
        old_blocks = int(st.total_data)
        needed = capacity.blocks_needed(old_blocks, new_blocks)
        if not needed:
            return
        total = int(st.total_meta) + (
            0 if not extra_metadata else int(extra_metadata) // capacity.METADATA_BLOCK
        )
        used = int(st.used_meta)
        if capacity.fits(used, total, needed):
            return
        want = capacity.metadata_size_needed(used, int(st.total_meta), old_blocks, new_blocks)
        size = format_size(Bytes(new_blocks * int(core.block_size.bytes())))
        have = format_size(Bytes(int(st.total_meta) * capacity.METADATA_BLOCK))
        if want is None:
            raise PoolFullError(
                f"pool {core.name!r} cannot map {size} of data with {int(core.block_size)}-"
                f"sector blocks: that takes more than the 16 GiB of metadata the kernel can "
                f"use",
                operation,
                core.name,
            )
        how = core.backing.metadata_growth(want)
        refusal = (
            f"growing the data of pool {core.name!r} to {size} needs {needed} more metadata "
            f"blocks, more than its {have} of metadata has free ({used} of {total} blocks used, "
            f"the kernel's reserve included): the kernel would refuse it or leave the pool "
            f"read-only; the metadata must be at least {format_size(want)}"
        )
        if isinstance(how, RemedyCall):
            raise PoolFullError(refusal, operation, core.name).advise(how)
        raise PoolFullError(f"{refusal}: {how}", operation, core.name)
