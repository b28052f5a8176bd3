"""Growing a pool: more data or metadata, by sector math, online.

The pool is reloaded with a table computed from its devices as they are
now (the data device's size rounded down to whole data blocks), never
from a size the caller claims, then suspended without flushing (a pool
that is out of space has I/O queued that a flush would wait on forever)
and resumed.  The kernel grows its data space on that resume, and picks
up a larger metadata device on the same reload.  Thin devices stay active
throughout; their I/O waits while the pool is suspended.
"""

import os

from libdm.dm import ops
from libdm.thin.errors import REPAIR_HINT, PoolFailedError, PoolReadOnlyError
from libdm.thin.units import Bytes, parse_size

__all__ = ["Growth"]


class Growth:
    """Resizing for :class:`~libdm.Pool` (a mixin)."""

    def resize(self, data_size=None, metadata_size=None):
        """Grow a loop pool's data and/or metadata online, like the guide's
        ``device_tool resize``.

        Args:
            data_size: the new data size, bytes or a string such as
                ``"200G"``; ``None`` leaves it.
            metadata_size: the new metadata size; ``None`` leaves it.

        Returns:
            The pool's status after the resize.

        Raises:
            ValueError: a size below the current one (pools never shrink),
                a bad size, or a pool that is not on loop files (use
                :meth:`extend` or :meth:`refresh`).
            PoolFailedError, PoolReadOnlyError: the pool failed or needs
                checking (``needs_check``); the kernel refuses to grow it.
        """
        if self.kind != "loop":
            raise ValueError(f"pool {self.name!r} is on {self.kind} devices: grow it with "
                             f"extend(device), or grow its devices and call refresh()")
        data = None if data_size is None else parse_size(data_size, what="data_size")
        meta = None if metadata_size is None else parse_size(metadata_size, what="metadata_size")
        with self._changing("resize"):
            self._check_growable("resize")
            self._backing.grow(data, meta)
            self._reload_pool()
            data_now, meta_now = self._backing.sizes()
            self._update_config(data_size=int(data_now), metadata_size=int(meta_now))
            return self.status()

    def refresh(self):
        """Reload the pool so it uses all of its devices' current size (after
        they were grown outside libdm, e.g. an LVM volume extended).

        Returns:
            The pool's status after the reload.

        Raises:
            PoolFailedError, PoolReadOnlyError: as for :meth:`resize`.
        """
        with self._changing("refresh"):
            self._check_growable("refresh")
            self._reload_pool()
            return self.status()

    def extend(self, device, *, metadata=False, force=False, start=0, length=None):
        """Add a block device (or a region of one) to a block pool's data
        (or, with ``metadata=True``, its metadata), online: the libdm
        equivalent of the guide's ``vgextend`` + ``lvextend``.

        The new segment is appended to ``<pool>-tdata`` (``-tmeta``), so
        the pool keeps its devices while they grow; its position in the
        concatenation is sector math.  The device passes the same checks
        as at creation (not in use; no signature unless ``force``).  The
        new segment is recorded before the kernel sees it, so a crash
        midway is finished by :meth:`open`.

        Args:
            device: the block device path.
            metadata: grow the metadata instead of the data.
            force: use a device that carries a signature.
            start: where the region starts on the device, bytes or a string
                (default 0).
            length: the region's length, bytes or a string (default: to the
                end of the device).

        Returns:
            The pool's status after the extension.

        Raises:
            ValueError: a loop or adopted pool (use :meth:`resize`), a
                device already in the pool, a region that does not fit.
            DeviceNotBlankError, DeviceBusyError: as for :meth:`create`.
            PoolFailedError, PoolReadOnlyError: the pool cannot grow.
        """
        if self.kind != "block":
            raise ValueError(f"pool {self.name!r} is a {self.kind} pool: "
                             + ("grow it with resize()" if self.kind == "loop"
                                else "its devices are not libdm's"))
        first = 0 if not start else int(parse_size(start, what="start").sectors())
        count = None if length is None else int(parse_size(length, what="length").sectors())
        with self._changing("extend"):
            self._check_growable("extend")
            rdev = os.stat(device).st_rdev
            for path in self._backing.paths():
                if os.path.exists(path) and os.stat(path).st_rdev == rdev:
                    raise ValueError(f"{device} is already part of pool {self.name!r} "
                                     f"(as {path})")
            dev = self._check_device(device, force, "extend")
            size = dev.size // 512
            if first + (count if count is not None else 1) > size or (count is not None
                                                                      and count <= 0):
                raise ValueError(f"region {first}+{count} sectors does not fit on {device} "
                                 f"({size} sectors)")
            side = "meta_segments" if metadata else "data_segments"
            # Segments before the new one are pinned to their current length:
            # if one of them grew later, everything after it would shift.
            segments = [[path, start, length] for path, start, length
                        in (t for t in self._config[side])]
            for seg, target in zip(segments, self._backing.table(segments)):
                seg[2] = int(target.length)
            segments.append([device, first, count])
            if metadata:
                self._backing.meta_segments = segments
            else:
                self._backing.data_segments = segments
            self._update_config(**{side: segments})
            self._reload_pool()
            return self.status()

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
            old = self._config["low_water_mark"]
            self._update_config(low_water_mark=blocks)
            try:
                self._reload_pool()
            except BaseException:
                self._update_config(low_water_mark=old)
                raise

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
            raise PoolFailedError(f"pool {self.name!r} has failed ({st.state}); {REPAIR_HINT}",
                                  operation, self.name)
        if st.needs_check:
            raise PoolReadOnlyError(f"pool {self.name!r} needs its metadata checked "
                                    f"(needs_check) and cannot grow; {REPAIR_HINT}",
                                    operation, self.name)

    def _reload_pool(self):
        if self.kind == "adopted":
            raise ValueError(f"pool {self.name!r} was adopted: its devices and table are not "
                             f"libdm's to change")
        # Suspend first: growing a linear piece under the pool (attach) and
        # loading the longer pool table happen while its I/O waits.
        ops.suspend(self.name, flush=False)
        try:
            with self._backing.attach() as devs:
                table = self._table_for(devs)
            ops.reload(self.name, table)
        finally:
            ops.resume(self.name)

    def _update_config(self, **changes):
        config = dict(self._config, **changes)
        with self._store.transaction():
            self._store.set_config(config)
        self._config = config

    def data_size(self):
        """The pool's data size in ``Bytes`` as the kernel sees it."""
        return Bytes(int(ops.table(self.name)[0].length) * 512)
