"""Repairing a pool's metadata, as ``lvconvert --repair`` does for LVM.

The pool is taken down (none of its devices may be open), ``thin_repair``
writes what it can recover from the damaged metadata into a fresh spare
of the same size, ``thin_check`` must pass on the result, and only then
is the spare swapped in.  The damaged metadata is kept beside it for
inspection (``metadata.damaged-<UTC time>`` for a loop pool), never
deleted.  Then the pool is brought up as :meth:`Pool.open` would: the
journal is reconciled against the repaired metadata and the devices that
were active come back.

A blank or damaged superblock may have lost the transaction id, the data
block size and the number of data blocks; when thin_repair asks for
them, it is given them from the pool's store.  The tools open their
devices with O_DIRECT, so both metadata copies are reached through loop
devices.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import time
from typing import TYPE_CHECKING

from libdm.dm import loop, ops
from libdm.dm.errors import DeviceBusyError
from libdm.thin.backing import LoopBacking
from libdm.thin.errors import PoolFailedError

if TYPE_CHECKING:
    from libdm.thin.pool import Pool

__all__ = ["finish_swap", "repair_loop_pool"]

SPARE = "metadata.repair"


def _run(argv: list[str], what: str, pool: Pool) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PoolFailedError(
            f"{what} failed on the metadata of pool {pool.name!r}: "
            f"{(proc.stderr or proc.stdout).strip() or f'exit status {proc.returncode}'}; "
            f"nothing was swapped in",
            "repair",
            pool.name,
        )
    return proc.stdout


def _take_down(pool: Pool) -> None:
    """Remove the pool's thin devices and the pool device.

    Raises:
        DeviceBusyError: a thin device is open (named).
    """
    proven = pool._live_devices(pool._store.devices(), "repair")  # only the pool's own
    live = [pool.device_dm_name(name) for name in proven]
    busy = [pool.device_dm_name(name) for name, dev in proven.items() if dev.info.open_count]
    if busy:
        raise DeviceBusyError(
            errno.EBUSY,
            f"{', '.join(busy)} are in use: close them before the pool's metadata is repaired",
            "repair",
            pool.name,
        )
    for name in live:
        ops.remove(name)
    if pool._pool_is_live("repair"):
        ops.remove(pool.name)


def repair_loop_pool(pool: Pool, partial: bool = False) -> str:
    """Repair a loop pool's metadata file (see the module doc).  Unless
    ``partial``, the repaired copy must hold every thin device the store
    records, or nothing is swapped in.

    Returns:
        The damaged metadata's new file name, in the state directory.

    Raises:
        DeviceBusyError: a device of the pool is open.
        PoolFailedError: thin_repair or thin_check failed (the message has
            their words), or the repaired copy lacks devices; nothing was
            swapped in.
        FileNotFoundError: thin-provisioning-tools is not installed.
        ValueError: not a loop pool.
    """
    backing = pool._backing
    if not isinstance(backing, LoopBacking):
        raise ValueError(f"pool {pool.name!r} is a {pool.kind} pool, not a loop pool")
    for tool in ("thin_repair", "thin_check"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(
                errno.ENOENT, f"{tool} is not installed (package thin-provisioning-tools)", tool
            )
    statedir = pool._store.statedir
    _take_down(pool)
    size = backing.sizes()[1]  # checked: the pool's own file, no symlink
    statedir.unlink(SPARE)  # a spare a crashed repair left is libdm's own
    fd = statedir.make_file(SPARE, "repair", "spare metadata file")
    try:
        os.ftruncate(fd, int(size))
    finally:
        os.close(fd)
    spare = statedir.join(SPARE)
    try:
        with (
            loop.attach(backing.metadata_file, read_only=True, follow_symlinks=False) as source,
            loop.attach(spare, follow_symlinks=False) as target,
        ):
            try:
                _run(["thin_repair", "-i", source.path, "-o", target.path], "thin_repair", pool)
            except PoolFailedError as exc:
                if "provided on the command line" not in str(exc):
                    raise
                # The superblock lost fields thin_repair cannot guess: the
                # store has them.
                _run(
                    ["thin_repair", "-i", source.path, *_lost_fields(pool), "-o", target.path],
                    "thin_repair",
                    pool,
                )
            _run(["thin_check", target.path], "thin_check of the repaired copy", pool)
            _check_recovered(pool, target.path, partial)
    except BaseException:
        statedir.unlink(SPARE)
        raise
    damaged = f"metadata.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    # The swap is recorded first, so a crash amid the renames is finished
    # by Pool.open (finish_swap) rather than leaving a file it refuses.
    spare_st = statedir.lstat(SPARE)
    if spare_st is None:
        raise PoolFailedError(
            f"the repaired copy {spare} of pool {pool.name!r}'s metadata vanished before "
            f"it was swapped in; nothing was swapped in",
            "repair",
            pool.name,
        )
    inodes = dict(pool._config.get("file_inodes") or {})
    inodes["metadata"] = spare_st.st_ino
    pool._update_config(file_inodes=inodes, repair={"damaged": damaged})
    finish_swap(pool)
    return damaged


def finish_swap(pool: Pool) -> None:
    """Put a repaired spare in place of the damaged metadata, as recorded
    by :func:`repair_loop_pool`; idempotent (Pool.open calls it after a
    crash amid the renames)."""
    record = pool._config.get("repair")
    if not record:
        return
    statedir = pool._store.statedir
    if statedir.lstat(SPARE) is not None:
        current = statedir.lstat("metadata")
        if current is not None and current.st_ino != pool._config["file_inodes"]["metadata"]:
            os.rename(
                "metadata", record["damaged"], src_dir_fd=statedir.fd, dst_dir_fd=statedir.fd
            )
        os.rename(SPARE, "metadata", src_dir_fd=statedir.fd, dst_dir_fd=statedir.fd)
        os.fsync(statedir.fd)
    pool._update_config(repair=None)


def _check_recovered(pool: Pool, path: str, partial: bool) -> None:
    """Refuse a repaired copy that lacks thin devices the store records."""
    found = {
        int(m)
        for m in re.findall(
            r'<device dev_id="(\d+)"', _run(["thin_dump", path], "thin_dump", pool)
        )
    }
    store = pool._store
    wanted = {row["thin_id"]: row["name"] for row in store.devices()}
    wanted.update({row["thin_id"]: row["name"] for row in store.deferred_deletes()})
    missing = sorted(name for thin_id, name in wanted.items() if thin_id not in found)
    if missing and not partial:
        raise PoolFailedError(
            f"thin_repair recovered {len(wanted) - len(missing)} of the {len(wanted)} devices "
            f"of pool {pool.name!r}; lost: {', '.join(missing)}; nothing was swapped in "
            f"(repair(partial=True), or --partial, accepts what it recovered)",
            "repair",
            pool.name,
        )


def _lost_fields(pool: Pool) -> list[str]:
    """thin_repair's flags for what a damaged superblock lost, from the
    store: the transaction id, the data block size and the number of data
    blocks."""
    blocks = pool._data_sectors(pool._config) // int(pool.block_size)
    return [
        "--transaction-id",
        str(pool._store.transaction_id()),
        "--data-block-size",
        str(int(pool.block_size)),
        "--nr-data-blocks",
        str(blocks),
    ]
