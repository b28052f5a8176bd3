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

Every growth is journalled like a change of thin ids: an intent naming
the configuration before and after, and the live tables to return to, is
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

import logging
import os
from dataclasses import asdict, dataclass

from libdm.dm import ops
from libdm.dm.blockdev import open_block_device
from libdm.dm.errors import DMError
from libdm.dm.target import Target
from libdm.thin import backing as backings
from libdm.thin import capacity, crash
from libdm.thin.errors import (
    REPAIR_HINT,
    PoolFailedError,
    PoolFullError,
    PoolReadOnlyError,
    StateError,
)
from libdm.thin.units import Bytes, Sectors, format_size, parse_size

__all__ = ["Growth", "GrowthIntent"]

logger = logging.getLogger("libdm")


@dataclass(frozen=True)
class GrowthIntent:
    """A growth in flight, as the store records it before the first step.

    Attributes:
        operation: the call (``resize``, ``extend``, ``refresh``,
            ``set_low_water_mark``).
        old: the pool's configuration before it.
        new: the configuration it brings.
        tables: the live tables (text lines) of the pool and its linear
            pieces before it, to roll back to.
    """

    operation: str
    old: dict
    new: dict
    tables: dict

    @classmethod
    def from_record(cls, record):
        return cls(record["operation"], record["old"], record["new"], record["tables"])


class Growth:
    """Resizing for :class:`~libdm.Pool` (a mixin)."""

    def resize(self, data_size=None, metadata_size=None, *, low_water_mark=None):
        """Grow a loop pool's data and/or metadata online, like the guide's
        ``device_tool resize``.

        Args:
            data_size: the new data size, bytes or a string such as
                ``"200G"``; ``None`` leaves it.
            metadata_size: the new metadata size; ``None`` leaves it.
            low_water_mark: a new low water mark (data blocks) to load in
                the same reload as the data growth (the monitor's re-arm,
                without a second suspend); ``None`` leaves it.

        Returns:
            The pool's status after the resize.

        Raises:
            ValueError: a size below the current one (pools never shrink),
                a bad size, or a pool that is not on loop files (use
                :meth:`extend` or :meth:`refresh`).
            PoolFullError: the metadata is too small to map that much data
                (the message says how much metadata it takes; give
                ``metadata_size`` too, and the metadata grows first).
            PoolFailedError, PoolReadOnlyError: the pool failed or needs
                checking (``needs_check``); the kernel refuses to grow it.
            DMError: the kernel refused; the pool is back as it was.
        """
        if self.kind != "loop":
            raise ValueError(
                f"pool {self.name!r} is on {self.kind} devices: grow it with "
                f"extend(device), or grow its devices and call refresh()"
            )
        data = None if data_size is None else parse_size(data_size, what="data_size")
        meta = None if metadata_size is None else parse_size(metadata_size, what="metadata_size")
        with self._changing("resize"):
            self._check_growable("resize")
            data_now, meta_now = self._backing.sizes()
            for what, want, now in (("data", data, data_now), ("metadata", meta, meta_now)):
                if want is not None and want < now:
                    raise ValueError(
                        f"{what} cannot shrink: it is {format_size(now)}, asked "
                        f"{format_size(want)} (a thin pool only grows)"
                    )
            if data is not None and data > data_now:
                # Refused before anything changes, metadata growth included.
                self._check_capacity(
                    "resize",
                    dict(self._config, data_size=int(data)),
                    extra_metadata=None if meta is None else meta - meta_now,
                )
            # The kernel grows data before metadata on a resume: metadata first.
            if meta is not None and meta > meta_now:
                self._grow("resize", metadata_size=int(meta))
            if data is not None and data > data_now:
                lwm = {} if low_water_mark is None else {"low_water_mark": int(low_water_mark)}
                self._grow("resize", data_size=int(data), **lwm)
            return self.status()

    def refresh(self):
        """Reload the pool so it uses all of its devices' current size (after
        they were grown outside libdm, e.g. an LVM volume extended).

        Returns:
            The pool's status after the reload.

        Raises:
            PoolFullError: the metadata cannot map the grown data.
            PoolFailedError, PoolReadOnlyError: as for :meth:`resize`.
        """
        with self._changing("refresh"):
            self._check_growable("refresh")
            self._grow("refresh")
            return self.status()

    def extend(self, device, *, metadata=False, force=False, start=None, length=None):
        """Add a block device (or a region of one) to a block pool's data
        (or, with ``metadata=True``, its metadata), online: the libdm
        equivalent of the guide's ``vgextend`` + ``lvextend``.

        The new segment is appended to ``<pool>-tdata`` (``-tmeta``), so
        the pool keeps its devices while they grow; its position in the
        concatenation is sector math.  The device passes the same checks
        as at creation (not in use; no signature unless ``force``).  The
        new segment is recorded before the kernel sees it, so a crash
        midway is finished by :meth:`open`.

        A device the pool already sits on (a split device's headroom, see
        :meth:`free_regions`) can give its free part: by default the
        region starts after the last sector the pool uses there, and one
        that directly follows the side's last segment lengthens it.

        Args:
            device: the block device path.
            metadata: grow the metadata instead of the data.
            force: use a device that carries a signature.
            start: where the region starts on the device, bytes or a string
                (default 0, or the free tail of a device the pool uses).
            length: the region's length, bytes or a string (default: to the
                end of the device).

        Returns:
            The pool's status after the extension.

        Raises:
            ValueError: a loop or adopted pool (use :meth:`resize`), a
                region the pool uses already (named), a region that does not
                fit.
            DeviceNotBlankError, DeviceBusyError: as for :meth:`create`.
            PoolFailedError, PoolReadOnlyError: the pool cannot grow.
        """
        if self.kind != "block":
            raise ValueError(
                f"pool {self.name!r} is a {self.kind} pool: "
                + (
                    "grow it with resize()"
                    if self.kind == "loop"
                    else "its devices are not libdm's"
                )
            )
        first = (
            None
            if start is None
            else (0 if start in (0, "0") else int(parse_size(start, what="start").sectors()))
        )
        count = None if length is None else int(parse_size(length, what="length").sectors())
        with self._changing("extend"):
            self._check_growable("extend")
            used = self._used_regions(os.stat(device).st_rdev)
            if used:
                # A device the pool already sits on: only its free part.
                size = open_block_device(device).size // 512
                end = max(stop for _, stop in used)
                if first is None and -(-end // 8) * 8 >= size:
                    raise ValueError(
                        f"{device} is already part of pool {self.name!r} and has no free part left"
                    )
                first = -(-end // 8) * 8 if first is None else first
                clash = [
                    (a, b) for a, b in used if first < b and a < (first + count if count else size)
                ]
                if clash:
                    raise ValueError(
                        f"{device} is already part of pool {self.name!r} in sectors "
                        f"{', '.join(f'{a}-{b}' for a, b in clash)}; its free part starts "
                        f"at sector {-(-end // 8) * 8}"
                    )
            else:
                size = self._check_device(device, force, "extend").size // 512
                first = first or 0
            if first + (count if count is not None else 1) > size or (
                count is not None and count <= 0
            ):
                raise ValueError(
                    f"region {first}+{count} sectors does not fit on {device} ({size} sectors)"
                )
            side = "meta_segments" if metadata else "data_segments"
            # Segments before the new one are pinned to their current length:
            # if one of them grew later, everything after it would shift.
            segments = [
                [path, start, length] for path, start, length in (t for t in self._config[side])
            ]
            for seg, target in zip(segments, self._backing.table(segments), strict=False):
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
            # The devices are recorded as at creation (size, path), so a
            # forged or swapped device is refused at the next open.
            self._grow("extend", **backings.segment_changes(self._config, side, segments))
            return self.status()

    def _used_regions(self, rdev):
        """The ``(start, end)`` sectors the pool uses on the block device
        ``rdev``, from both sides' segments."""
        if self.kind != "block":
            return []
        out = []
        for side in ("meta_segments", "data_segments"):
            segments = self._config[side]
            targets = self._backing.table(segments)
            for (path, start, _), target in zip(segments, targets, strict=True):
                if os.path.exists(path) and os.stat(path).st_rdev == rdev:
                    out.append((start, start + int(target.length)))
        return out

    def free_regions(self):
        """The free tails of the block devices the pool sits on: where
        :meth:`extend` (and the monitor) can grow without another device,
        such as what ``create_on_device(thinp_percent=...)`` left free.

        Returns:
            A list of ``(device path, start, length)``, in ``Sectors``,
            largest first; empty for loop and adopted pools.
        """
        if self.kind != "block":
            return []
        seen, out = set(), []
        for path in self._backing.paths():
            rdev = os.stat(path).st_rdev
            if rdev in seen:
                continue
            seen.add(rdev)
            end = -(-max(stop for _, stop in self._used_regions(rdev)) // 8) * 8
            size = open_block_device(path).size // 512
            if size > end:
                out.append((path, Sectors(end), Sectors(size - end)))
        return sorted(out, key=lambda region: -int(region[2]))

    def set_low_water_mark(self, blocks):
        """Set the pool's low water mark: when free data blocks fall below
        it the kernel raises one device-mapper event (see
        :func:`libdm.wait_event`).  Stored, and applied by a reload.

        Args:
            blocks: free data blocks (``DataBlocks`` or int), 0 for never.
        """
        blocks = int(blocks)
        if blocks < 0:
            raise ValueError("the low water mark must be >= 0 data blocks")
        with self._changing("set_low_water_mark"):
            if blocks == self._config["low_water_mark"]:
                return
            self._grow("set_low_water_mark", low_water_mark=blocks)

    def monitor(self, threshold=80, percent=20, **options):
        """An autoextend :class:`~libdm.thin.monitor.Monitor` for this pool
        (``dm.thinp_autoextend_threshold`` / ``_percent``): not running yet;
        call its ``run()``, ``start()``, or use it in a ``with`` block.

        Args:
            threshold: percent used at which to grow (default 80).
            percent: growth in percent of the current size (default 20).
            options: see :class:`~libdm.thin.monitor.Monitor`.
        """
        from libdm.thin.monitor import Monitor

        return Monitor(self, threshold, percent, **options)

    def _check_growable(self, operation):
        st = self.status()
        if st.failed:
            raise PoolFailedError(
                f"pool {self.name!r} has failed ({st.state}); {REPAIR_HINT}", operation, self.name
            )
        if st.needs_check:
            raise PoolReadOnlyError(
                f"pool {self.name!r} needs its metadata checked "
                f"(needs_check) and cannot grow; {REPAIR_HINT}",
                operation,
                self.name,
            )

    # -- the growth protocol ---------------------------------------------------------

    def _grow(self, operation, **changes):
        """Reload the pool on its configuration with ``changes`` applied,
        journalled (see the module doc)."""
        if self.kind == "adopted":
            raise ValueError(
                f"pool {self.name!r} was adopted: its devices and table are not libdm's to change"
            )
        old = dict(self._config)
        new = dict(old, **changes)
        self._check_capacity(operation, new)
        intent = GrowthIntent(operation, old, new, self._live_tables())
        with self._store.transaction():
            self._store.set_growth_intent(asdict(intent))
        crash.point("grow:intent")
        try:
            self._apply_growth(new)
        except BaseException as exc:
            self._roll_back_growth(intent, operation, exc)
            raise
        self._record_growth(new)

    def _live_tables(self):
        """The live tables of the pool and its linear pieces, as text."""
        names = [self.name]
        if self.kind == "block":
            names += [self._backing.meta_name, self._backing.data_name]
        return {name: [str(t) for t in ops.table(name)] for name in names if ops.exists(name)}

    def _use_config(self, config):
        self._config = config
        self._backing = backings.from_config(self.kind, self._store.statedir, self.name, config)

    def _apply_growth(self, config):
        """Bring the backing and the pool's table to ``config``; idempotent,
        so that Pool.open can finish a growth a kill interrupted."""
        self._use_config(config)
        if self.kind == "loop":
            self._backing.grow(Bytes(config["data_size"]), Bytes(config["metadata_size"]))
        crash.point("grow:backing")
        # Suspend first: growing a linear piece under the pool (attach) and
        # loading the longer pool table happen while its I/O waits.
        ops.suspend(self.name, flush=False)
        with self._backing.attach() as devs:
            table = self._table_for(devs)
        ops.reload(self.name, table)
        crash.point("grow:loaded")
        ops.resume(self.name)
        crash.point("grow:resumed")

    def _record_growth(self, config):
        with self._store.transaction():
            self._store.set_config(config)
            self._store.drop_growth_intent()
        self._use_config(config)

    def _roll_back_growth(self, intent, operation, cause=None):
        """Put the pool back on the tables and sizes it had before the
        growth, resumed, and drop the intent; the store's configuration
        was never changed.  Raises StateError if that fails too (the
        intent stays, so Pool.open tries again)."""
        old = intent.old
        self._use_config(old)
        tables = {
            name: [Target.parse(line) for line in lines] for name, lines in intent.tables.items()
        }
        try:
            if self.name in tables:
                # The pool first, onto its old (shorter) table; then what
                # is under it may shrink back.
                ops.suspend(self.name, flush=False)
                ops.reload(self.name, tables[self.name])
                ops.resume(self.name)
            for name, table in tables.items():
                if name != self.name and ops.exists(name) and ops.table(name) != table:
                    ops.reload(name, table)
                    ops.suspend(name, flush=False)
                    ops.resume(name)
            if self.kind == "loop":
                self._shrink_files_back(old)
        except DMError as exc:
            self._resume_if_suspended()
            raise StateError(
                f"{operation} of pool {self.name!r} failed ({cause}) and so did putting the "
                f"pool back ({exc}); libdm pool open {self.directory} finishes or undoes it",
                operation,
                self.name,
            ) from exc
        finally:
            self._resume_if_suspended()
        with self._store.transaction():
            self._store.drop_growth_intent()
        logger.warning("pool %s: %s rolled back (%s)", self.name, operation, cause)
        self._clear_needs_check_offline(operation)

    def _resume_if_suspended(self):
        try:
            if ops.info(self.name).suspended:
                ops.resume(self.name)
        except DMError:
            pass

    def _shrink_files_back(self, old):
        """Undo this growth's own file growth: only down to the recorded
        sizes, and only where the kernel maps no more than them."""
        st = self.status()
        if st.failed:
            return
        data = int(st.total_data) * int(self.block_size.bytes())
        meta = int(st.total_meta.bytes())
        self._backing.undo_growth(max(old["data_size"], data), max(old["metadata_size"], meta))

    def _clear_needs_check_offline(self, operation):
        """A resume the kernel refused may have flagged the metadata
        needs_check and made the pool read-only.  If none of its devices
        is open, take the pool down, let thin_check clear the flag, and
        bring it back; otherwise say what to do."""
        st = self.status()
        if st.failed or not st.needs_check:
            return
        busy = [
            row["name"]
            for row in self._store.active_devices()
            if ops.exists(self.device_dm_name(row["name"]))
            and ops.info(self.device_dm_name(row["name"])).open_count
        ]
        if busy or self.kind == "adopted":
            raise PoolReadOnlyError(
                f"the kernel refused the change and flagged pool {self.name!r} needs_check "
                f"(read-only); close {', '.join(busy) or 'its devices'} and run "
                f"libdm pool open {self.directory} to check and clear it",
                operation,
                self.name,
            )
        for row in self._store.active_devices():
            dm_name = self.device_dm_name(row["name"])
            if ops.exists(dm_name):
                ops.remove(dm_name)
        ops.remove(self.name)
        self._activate_pool("open")  # thin_check --clear-needs-check-flag first
        for row in self._store.active_devices():
            self._activate(row, operation)

    def _finish_growth(self, intent, operation):
        """Pool.open: finish a growth a kill interrupted (or roll it back
        if it cannot be finished).  The pool may be down (a reboot), or
        live and suspended, with or without the new table loaded."""
        try:
            if backings.exists_live(self.name):
                self._apply_growth(intent.new)
            else:
                self._use_config(intent.new)
                if self.kind == "loop":
                    self._backing.grow(
                        Bytes(intent.new["data_size"]), Bytes(intent.new["metadata_size"])
                    )
                self._activate_pool(operation)
        except (DMError, OSError, ValueError) as exc:
            logger.warning(
                "pool %s: could not finish the interrupted %s (%s); rolling back",
                self.name,
                intent.operation,
                exc,
            )
            if backings.exists_live(self.name):
                self._roll_back_growth(intent, operation, exc)
            else:
                self._use_config(intent.old)
                with self._store.transaction():
                    self._store.drop_growth_intent()
            return
        self._record_growth(intent.new)

    def _check_capacity(self, operation, config, extra_metadata=None):
        """Refuse a data growth the metadata cannot map (PoolFullError with
        the metadata size it takes).  ``extra_metadata``: ``Bytes`` the
        metadata grows by first, in the same call."""
        st = self.status()
        if st.failed:
            return
        new_blocks = self._data_sectors(config) // int(self.block_size)
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
        size = format_size(Bytes(new_blocks * int(self.block_size.bytes())))
        have = format_size(Bytes(int(st.total_meta) * capacity.METADATA_BLOCK))
        if want is None:
            raise PoolFullError(
                f"pool {self.name!r} cannot map {size} of data with {int(self.block_size)}-"
                f"sector blocks: that takes more than the 16 GiB of metadata the kernel can "
                f"use",
                operation,
                self.name,
            )
        how = (
            f"resize(data_size=..., metadata_size='{format_size(want)}') grows it first "
            f"(libdm pool resize --metadata-size {format_size(want)})"
            if self.kind == "loop"
            else "extend(device, metadata=True) grows it"
        )
        raise PoolFullError(
            f"growing the data of pool {self.name!r} to {size} needs {needed} more metadata "
            f"blocks, more than its {have} of metadata has free ({used} of {total} blocks used, "
            f"the kernel's reserve included): the kernel would refuse it or leave the pool "
            f"read-only; the metadata must be at least {format_size(want)}: {how}",
            operation,
            self.name,
        )

    def _data_sectors(self, config):
        """The data device's size in sectors under ``config``."""
        if self.kind == "loop":
            return int(config["data_size"]) // 512
        backing = backings.from_config(self.kind, self._store.statedir, self.name, config)
        return sum(int(t.length) for t in backing.table(backing.data_segments))

    def _update_config(self, **changes):
        config = dict(self._config, **changes)
        with self._store.transaction():
            self._store.set_config(config)
        self._use_config(config)

    def data_size(self):
        """The pool's data size in ``Bytes`` as the kernel sees it."""
        return Bytes(int(ops.table(self.name)[0].length) * 512)
