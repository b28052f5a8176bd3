"""Where a pool's data and metadata live, and how to bring them up.

Each backing knows how to produce the two block devices a ``thin-pool``
table names, how to describe itself for the pool report, and what to
tear down.  The pool does not care which one it has, so any block device
can back a pool (a file through a loop device, a disk, a partition, an
LVM volume, another device-mapper device).

* :class:`LoopBacking`: sparse files in the state directory, attached to
  loop devices (the guide's loop-lvm mode, the embedded default).
* :class:`BlockBacking`: two block devices given by the caller.
* :class:`SplitBacking`: one raw block device split into metadata and
  data by two ``linear`` device-mapper devices (the guide's
  ``dm.directlvm_device`` with ``thinp_percent`` / ``thinp_metapercent``).
* :class:`AdoptedBacking`: an existing thin-pool device (``dm.thinpooldev``);
  libdm does not own its devices.
"""

import os

from libdm.dm import loop
from libdm.dm import ops
from libdm.dm.blockdev import open_block_device
from libdm.dm.target import Target
from libdm.thin.units import Bytes, Sectors, format_size

__all__ = ["LoopBacking", "BlockBacking", "SplitBacking", "AdoptedBacking", "from_config"]

DATA_FILE = "data"
METADATA_FILE = "metadata"


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


class BlockBacking:
    """Two block devices given by path."""

    kind = "block"

    def __init__(self, data_device, metadata_device):
        self.data_device, self.metadata_device = data_device, metadata_device

    def config(self):
        return {"data_device": self.data_device, "metadata_device": self.metadata_device}

    def attach(self):
        return _Devices(open_block_device(self.metadata_device),
                        open_block_device(self.data_device))

    def describe(self):
        return {"Data file": self.data_device, "Metadata file": self.metadata_device}

    def teardown(self):
        """Nothing: the devices belong to the caller."""

    def backing_filesystem_dir(self):
        return None


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


class SplitBacking:
    """One block device split into ``<pool>-tmeta`` and ``<pool>-tdata``
    linear devices."""

    kind = "split"

    def __init__(self, pool_name, device, layout):
        self.pool_name, self.device = pool_name, device
        self.meta_start, self.meta_len, self.data_start, self.data_len = (
            Sectors(v) for v in layout)
        self.meta_name = f"{pool_name}-tmeta"
        self.data_name = f"{pool_name}-tdata"

    def config(self):
        return {"device": self.device,
                "layout": [int(self.meta_start), int(self.meta_len),
                           int(self.data_start), int(self.data_len)]}

    def attach(self):
        dev = open_block_device(self.device)
        made = []
        try:
            for name, start, length in ((self.meta_name, self.meta_start, self.meta_len),
                                        (self.data_name, self.data_start, self.data_len)):
                table = [Target(0, int(length), "linear", f"{dev.devno} {int(start)}")]
                if ops.exists(name):
                    live = ops.table(name)
                    if live != table:
                        raise ValueError(
                            f"{name} exists with table {live[0] if live else '(none)'}, "
                            f"expected {table[0]}"
                        )
                else:
                    ops.create(name, table)
                    made.append(name)
        except BaseException:
            for name in reversed(made):
                ops.remove(name)
            raise
        return _Devices(open_block_device(ops.device_path(self.meta_name)),
                        open_block_device(ops.device_path(self.data_name)))

    def describe(self):
        return {"Data file": f"{self.device} (sectors {int(self.data_start)}+{int(self.data_len)})",
                "Metadata file": f"{self.device} (sectors {int(self.meta_start)}+{int(self.meta_len)})"}

    def teardown(self):
        for name in (self.data_name, self.meta_name):
            if ops.exists(name):
                ops.remove(name)

    def backing_filesystem_dir(self):
        return None


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
        return BlockBacking(config["data_device"], config["metadata_device"])
    if kind == "split":
        return SplitBacking(pool_name, config["device"], config["layout"])
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
