"""The pool report: the fields of ``docker info``'s devicemapper listing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from libdm.dm import ops
from libdm.dm.errors import DMError
from libdm.dm.udev import udev_sync_supported
from libdm.thin.table import ThinPoolParams
from libdm.thin.units import Bytes, format_size

if TYPE_CHECKING:
    from libdm.thin.core import PoolCore
    from libdm.thin.device import ThinDevice

__all__ = ["PoolInfo", "backing_filesystem", "pool_info"]


@dataclass(frozen=True)
class PoolInfo:
    """A pool's report.  Sizes are ``Bytes``; ``str()`` prints the
    ``docker info``-style listing and :meth:`as_dict` gives its labels.

    ``data_available`` and ``metadata_available`` are clamped, for a loop
    pool, by the free space of the filesystem holding its files: a sparse
    file cannot grow past it, whatever the pool's nominal size.
    """

    pool_name: str
    pool_blocksize: Bytes
    base_device_size: Bytes | None
    backing_filesystem: str
    data_file: str
    metadata_file: str
    data_used: Bytes
    data_total: Bytes
    data_available: Bytes
    metadata_used: Bytes
    metadata_total: Bytes
    metadata_available: Bytes
    min_free_space: Bytes
    udev_sync_supported: bool
    deferred_removal: bool
    deferred_deletion: bool
    deferred_deleted_count: int
    library_version: str
    transaction_id: int
    devices: int
    state: str
    # Loop pools only: the files behind the loop devices, and their filesystem.
    data_loop_file: str | None = None
    metadata_loop_file: str | None = None
    loop_files_filesystem: str | None = None
    # Whether the monitor service watches the pool (libdm.thin.registry).
    monitored: str = "no"
    # The program the pool's thin devices were handed to (Pool.hand_over).
    handed_to: str | None = None

    def as_dict(self) -> dict[str, str]:
        """The report as ``{label: text}`` in ``docker info``'s order."""
        out = {
            "Pool Name": self.pool_name,
            "Pool Blocksize": format_size(self.pool_blocksize),
        }
        if self.base_device_size is not None:
            out["Base Device Size"] = format_size(self.base_device_size)
        out.update(
            {
                "Backing Filesystem": self.backing_filesystem,
                "Data file": self.data_file,
                "Metadata file": self.metadata_file,
            }
        )
        if self.data_loop_file is not None:
            out.update(
                {
                    "Data loop file": self.data_loop_file,
                    "Metadata loop file": self.metadata_loop_file or "",
                    "Loop Files Filesystem": self.loop_files_filesystem or "",
                }
            )
        out.update(
            {
                "Data Space Used": format_size(self.data_used),
                "Data Space Total": format_size(self.data_total),
                "Data Space Available": format_size(self.data_available),
                "Metadata Space Used": format_size(self.metadata_used),
                "Metadata Space Total": format_size(self.metadata_total),
                "Metadata Space Available": format_size(self.metadata_available),
                "Thin Pool Minimum Free Space": format_size(self.min_free_space),
                "Udev Sync Supported": str(self.udev_sync_supported).lower(),
                "Deferred Removal Enabled": str(self.deferred_removal).lower(),
                "Deferred Deletion Enabled": str(self.deferred_deletion).lower(),
                "Deferred Deleted Device Count": str(self.deferred_deleted_count),
                "Library Version": self.library_version,
                "Monitored": self.monitored,
            }
        )
        if self.handed_to is not None:
            out["Thin Devices Handed To"] = self.handed_to
        return out

    def __str__(self) -> str:
        return "\n".join(f" {k}: {v}" for k, v in self.as_dict().items())


def backing_filesystem(path: str) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mounts),
    or ``""``."""
    path = os.path.realpath(path)
    best, fstype = "", ""
    try:
        text = _read_all("/proc/self/mounts")
    except OSError:
        return ""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mnt = fields[1].replace("\\040", " ")
        inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, fstype = mnt, fields[2]
    return fstype


def _read_all(path: str) -> str:
    """The whole of a small file, in as few system calls as it takes (no
    buffered file object: the report is called often, and each call
    costs in a test kernel)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return os.fsdecode(b"".join(chunks))


def _table_devices(pool_name: str) -> tuple[str, str] | None:
    """The ``(data, metadata)`` devices (``major:minor``) the live pool's
    table names, or ``None`` where it is not live or not a thin-pool."""
    try:
        targets = ops.table(pool_name)
        params = ThinPoolParams.parse(targets[0].params)
    except (DMError, ValueError, IndexError):
        return None
    return params.data_dev, params.metadata_dev


def _base_filesystem(base: ThinDevice | None) -> str:
    """Docker's Backing Filesystem: the filesystem on the base device
    (``""`` without an active base device or a filesystem on it)."""
    if base is None or not base.active:
        return ""
    from libdm.thin import fs

    return fs.filesystem_type(base.path) or ""


def _monitored(pool: PoolCore) -> str:
    from libdm.thin import registry

    state = registry.watch_state(pool.directory)
    if state is None:
        return "no"
    how = f"grow by {state.percent}% at {state.threshold}% used"
    if state.watched:
        return f"yes, by libdm monitor ({how})"
    return f"registered ({how}), but the monitor service is not watching it"


def pool_info(pool: PoolCore, base: ThinDevice | None, base_size: Bytes) -> PoolInfo:
    """Build the :class:`PoolInfo` of ``pool`` from the kernel and its store;
    ``base`` is its base device, and ``base_size`` the size of new devices."""
    st = pool.status()
    block = pool.block_size.bytes()
    store = pool.store
    if st.failed:
        used_d = total_d = used_m = total_m = Bytes(0)
        state = st.state
    else:
        used_d = Bytes(int(st.used_data) * int(block))
        total_d = Bytes(int(st.total_data) * int(block))
        used_m, total_m = st.used_meta.bytes(), st.total_meta.bytes()
        # A suspended pool's status still says rw, but no I/O gets through.
        suspended = ops.info(pool.name).suspended
        state = "needs_check" if st.needs_check else "suspended" if suspended else st.mode
    avail_d, avail_m = total_d - used_d, total_m - used_m
    fs_dir = pool.backing.backing_filesystem_dir()
    files_fstype: str | None = None
    if fs_dir is not None:
        vfs = os.statvfs(fs_dir)
        fs_free = Bytes(vfs.f_bavail * vfs.f_frsize)
        avail_d, avail_m = min(avail_d, fs_free), min(avail_m, fs_free)
        files_fstype = backing_filesystem(fs_dir)
    data_file, meta_file, data_loop_file, meta_loop_file = pool.backing.report(
        lambda: _table_devices(pool.name)
    )
    return PoolInfo(
        pool_name=pool.name,
        pool_blocksize=block,
        base_device_size=base_size if base is None else base.size,
        backing_filesystem=_base_filesystem(base),
        data_file=data_file,
        metadata_file=meta_file,
        data_loop_file=data_loop_file,
        metadata_loop_file=meta_loop_file,
        loop_files_filesystem=files_fstype,
        monitored=_monitored(pool),
        handed_to=pool.config.handed_to,
        data_used=used_d,
        data_total=total_d,
        data_available=avail_d,
        metadata_used=used_m,
        metadata_total=total_m,
        metadata_available=avail_m,
        min_free_space=Bytes(int(int(total_d) * pool.config.min_free_space // 100)),
        udev_sync_supported=udev_sync_supported(),
        deferred_removal=pool.config.deferred_removal,
        deferred_deletion=pool.config.deferred_deletion,
        deferred_deleted_count=len(store.deferred_deletes()),
        library_version=ops.library_version(),
        transaction_id=-1 if st.failed else st.transaction_id,
        devices=store.count_devices(),
        state=state,
    )
