"""Where a pool's data and metadata live, and how to bring them up.

Each backing knows how to produce the two block devices a ``thin-pool``
table names, how to describe itself for the pool report, and what to
tear down.  The pool does not care which one it has, so any block device
can back a pool (a file through a loop device, a disk, a partition, an
LVM volume, another device-mapper device).

* :class:`LoopBacking`: sparse files in the state directory, attached to
  loop devices (the guide's loop-lvm mode, the embedded default).
* :class:`LinearBacking`: block devices under ``<pool>-tmeta`` and
  ``<pool>-tdata`` linear devices: two devices given by the caller, or one
  raw device split by ``thinp_percent`` / ``thinp_metapercent`` (the
  guide's ``dm.directlvm_device``), extended later by more devices.
* :class:`AdoptedBacking`: an existing thin-pool device (``dm.thinpooldev``);
  libdm does not own its devices.
"""

import os

from libdm.dm import loop
from libdm.dm import ops
from libdm.dm.errors import NoSuchDeviceError
from libdm.dm.blockdev import open_block_device
from libdm.dm.target import Target
from libdm.thin.units import Bytes, Sectors, format_size

__all__ = ["LoopBacking", "LinearBacking", "AdoptedBacking", "from_config", "split_layout",
           "default_metadata_size"]

DATA_FILE = "data"
METADATA_FILE = "metadata"


def exists_live(name):
    """True if device ``name`` exists with a live table.

    A device without one is what a create killed between its create and
    load ioctls leaves behind; it is removed here, so the caller makes it
    afresh.
    """
    try:
        info = ops.info(name)
    except NoSuchDeviceError:
        return False
    if info.live_table:
        return True
    ops.remove(name)
    return False


class _Devices:
    """The pool's two devices while they are being used to load a table.

    ``meta`` and ``data`` have ``path``, ``devno`` and ``size`` (bytes).
    Loop handles are closed on exit; by then the pool holds the loops.
    """

    def __init__(self, meta, data, handles=()):
        self.meta, self.data, self._handles = meta, data, handles

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.close()
        return False


class LoopBacking:
    """Sparse data and metadata files in ``directory``, on loop devices."""

    kind = "loop"

    def __init__(self, directory):
        self.directory = directory
        self.data_file = os.path.join(directory, DATA_FILE)
        self.metadata_file = os.path.join(directory, METADATA_FILE)

    def config(self):
        return {"data_file": DATA_FILE, "metadata_file": METADATA_FILE}

    def make(self, data_size, metadata_size):
        """Create both sparse files; zero the first 4 KiB of metadata."""
        for path, size in ((self.data_file, data_size), (self.metadata_file, metadata_size)):
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, int(size))
                if path == self.metadata_file:
                    os.pwrite(fd, bytes(4096), 0)
                os.fsync(fd)
            finally:
                os.close(fd)

    def attach(self):
        meta = loop.attach_or_find(self.metadata_file)
        try:
            data = loop.attach_or_find(self.data_file)
        except BaseException:
            meta.close()
            raise
        return _Devices(meta, data, (meta, data))

    def describe(self):
        return {"Data file": self.data_file, "Metadata file": self.metadata_file}

    def sizes(self):
        """(data, metadata) file sizes in ``Bytes``."""
        return (Bytes(os.stat(self.data_file).st_size),
                Bytes(os.stat(self.metadata_file).st_size))

    def grow(self, data_size=None, metadata_size=None):
        """Grow the files to the given ``Bytes`` (``None``: unchanged) and
        make their loop devices follow (LOOP_SET_CAPACITY).

        Raises:
            ValueError: a size below the current one (shrinking would cut
                off blocks the pool has handed out).
        """
        for path, size, what in ((self.data_file, data_size, "data"),
                                 (self.metadata_file, metadata_size, "metadata")):
            if size is None:
                continue
            current = os.stat(path).st_size
            if int(size) < current:
                raise ValueError(
                    f"{what} cannot shrink: it is {format_size(Bytes(current))}, asked "
                    f"{format_size(size)} (a thin pool only grows)")
        for path, size in ((self.data_file, data_size), (self.metadata_file, metadata_size)):
            if size is None or int(size) == os.stat(path).st_size:
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, int(size))
                os.fsync(fd)
            finally:
                os.close(fd)
            dev = loop.find(path)
            if dev is not None:
                with dev:
                    loop.refresh_capacity(dev)

    def teardown(self):
        """Nothing: the loops are autoclear and go with the pool."""

    def remove_files(self):
        for path in (self.data_file, self.metadata_file):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def backing_filesystem_dir(self):
        return self.directory


class LinearBacking:
    """Block devices under ``<pool>-tmeta`` and ``<pool>-tdata`` linear
    devices, as LVM builds its thin pools.

    Each side is a list of *segments* ``[path, start, length]`` (sectors;
    a length of ``None`` means "to the end of the device", so a device that
    grows is picked up by a refresh).  The linear devices concatenate them
    in order, so the pool's data device can be extended online by
    appending a segment: the pool keeps the same data device while that
    device grows, which the kernel allows (it refuses to swap a live
    pool's data device for another).
    """

    kind = "block"

    def __init__(self, pool_name, meta_segments, data_segments):
        self.pool_name = pool_name
        self.meta_segments = [list(seg) for seg in meta_segments]
        self.data_segments = [list(seg) for seg in data_segments]
        self.meta_name = f"{pool_name}-tmeta"
        self.data_name = f"{pool_name}-tdata"

    def config(self):
        return {"meta_segments": self.meta_segments, "data_segments": self.data_segments}

    def paths(self):
        """Every device path the pool uses."""
        return [seg[0] for seg in self.meta_segments + self.data_segments]

    @staticmethod
    def table(segments):
        """The linear table for ``segments``: starts by sector math.

        Raises:
            ValueError: a segment that does not fit on its device.
        """
        out, at = [], 0
        for path, start, length in segments:
            dev = open_block_device(path)
            size = dev.size // 512
            if length is None:
                length = size - start
            if start < 0 or length <= 0 or start + length > size:
                raise ValueError(f"segment {path} sectors {start}+{length} does not fit on "
                                 f"the device ({size} sectors)")
            out.append(Target(at, int(length), "linear", f"{dev.devno} {int(start)}"))
            at += int(length)
        return out

    def attach(self):
        made = []
        try:
            for name, segments in ((self.meta_name, self.meta_segments),
                                   (self.data_name, self.data_segments)):
                table = self.table(segments)
                if not exists_live(name):
                    ops.create(name, table)
                    made.append(name)
                    continue
                live = ops.table(name)
                if live == table:
                    continue
                if not _grows(live, table):
                    raise ValueError(
                        f"{name} is live with table {'; '.join(map(str, live))}, which the "
                        f"pool's stored segments ({'; '.join(map(str, table))}) do not extend")
                # The store already names the new segments (an extend or a
                # grown device interrupted before the reload): roll forward.
                ops.reload(name, table)
                ops.suspend(name, flush=False)
                ops.resume(name)
        except BaseException:
            for name in reversed(made):
                ops.remove(name)
            raise
        return _Devices(_mapped(self.meta_name), _mapped(self.data_name))

    def describe(self):
        def text(segments):
            return " + ".join(
                f"{path}" if start == 0 and length is None else
                f"{path} (sectors {start}+{'end' if length is None else length})"
                for path, start, length in segments)
        return {"Data file": text(self.data_segments), "Metadata file": text(self.meta_segments)}

    def teardown(self):
        for name in (self.data_name, self.meta_name):
            if ops.exists(name):
                ops.remove(name)

    def backing_filesystem_dir(self):
        return None


def _grows(live, table):
    """True if ``table`` keeps every live segment in place and only adds to
    the end (a longer last segment, or more segments)."""
    if len(table) < len(live):
        return False
    for old, new in zip(live, table):
        if (old.start, old.type) != (new.start, new.type) or old.params != new.params:
            return False
    return all(new.length >= old.length for old, new in zip(live, table)) and (
        all(new.length == old.length for old, new in zip(live[:-1], table[:-1])))


class _Mapped:
    """A device-mapper device as the pool table needs it."""

    def __init__(self, name):
        info = ops.info(name)
        self.path = ops.device_path(name)
        self.devno = f"{info.major}:{info.minor}"
        self.size = sum(t.length for t in ops.table(name)) * 512


def _mapped(name):
    return _Mapped(name)


def split_layout(device_sectors, block_size, thinp_percent, thinp_metapercent):
    """Sector math for one device split into metadata then data.

    Metadata takes ``thinp_metapercent`` of the device (at least 2 MiB,
    rounded down to 4 KiB); data starts right after it, aligned up to a
    whole data block, and takes ``thinp_percent`` of the device rounded
    down to whole data blocks (and never past the end).

    Returns:
        ``(meta_start, meta_len, data_start, data_len)`` in ``Sectors``.

    Raises:
        ValueError: percentages out of range or a device too small.
    """
    for what, pct in (("thinp_percent", thinp_percent), ("thinp_metapercent", thinp_metapercent)):
        if not 0 < pct < 100:
            raise ValueError(f"{what} must be between 0 and 100 (exclusive), got {pct}")
    if thinp_percent + thinp_metapercent > 100:
        raise ValueError(
            f"thinp_percent ({thinp_percent}) + thinp_metapercent ({thinp_metapercent}) exceed 100"
        )
    total = int(device_sectors)
    meta_len = max(total * thinp_metapercent // 100, 4096) // 8 * 8
    bs = int(block_size)
    data_start = -(-meta_len // bs) * bs
    data_len = min(total * thinp_percent // 100, total - data_start) // bs * bs
    if data_len <= 0:
        raise ValueError(
            f"the device ({total} sectors) is too small for {meta_len} sectors of metadata "
            f"and at least one {bs}-sector data block"
        )
    return Sectors(0), Sectors(meta_len), Sectors(data_start), Sectors(data_len)


class AdoptedBacking:
    """An existing thin-pool device that libdm provisions from but does not own."""

    kind = "adopted"

    def config(self):
        return {}

    def attach(self):
        raise RuntimeError("an adopted pool's devices are not libdm's to attach")

    def describe(self):
        return {"Data file": "", "Metadata file": ""}

    def teardown(self):
        """Nothing: the pool's devices belong to whoever made it."""

    def backing_filesystem_dir(self):
        return None


def from_config(kind, directory, pool_name, config):
    """Rebuild the backing recorded in a pool's state."""
    if kind == "loop":
        return LoopBacking(directory)
    if kind == "block":
        return LinearBacking(pool_name, config["meta_segments"], config["data_segments"])
    if kind == "adopted":
        return AdoptedBacking()
    raise ValueError(f"unknown pool kind {kind!r} in the state store")


def default_metadata_size(data_size, block_size):
    """The kernel's guideline: 48 bytes per data block, at least 2 MiB, at
    most the 16 GiB the pool can use; rounded up to 4 KiB.

    Args:
        data_size: ``Bytes`` of data.
        block_size: the data block size in ``Sectors``.

    Returns:
        ``Bytes``.
    """
    blocks = int(data_size) // int(Sectors(block_size).bytes())
    size = min(max(48 * blocks, 2 << 20), MAX_METADATA_BYTES)
    return Bytes(-(-size // 4096) * 4096)


# The kernel uses at most this much metadata (255 * 2^14 blocks of 4 KiB).
MAX_METADATA_BYTES = 255 * (1 << 14) * 4096
