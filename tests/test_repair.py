"""Repairing a pool's metadata (lvconvert --repair's part): the devices
come back with their data, or the repair names each device and what it
lost (or that it cannot vouch for it) and swaps nothing in; both copies
are kept either way.

Witnesses: thin_check, thin_dump and thin_ls on both copies (through
read-only loop devices), the metadata's blocks read by hand to find what
to damage, dmsetup, and the devices' contents by checksum.
"""

import mmap
import os
import pathlib
import random
import re
import signal
import struct
import subprocess
import sys

import pytest
from support import witness
from support.blockio import MiB, attach, devno, read_at, write_at, write_pattern

import libdm
from libdm.thin.config import Segment
from libdm.thin.label import RESERVED

pytestmark = pytest.mark.kernel

R = int(RESERVED)  # sectors before a labelled device's first mapped one


def used_pool(name, directory):
    pool = libdm.Pool.create_loop(name, directory, data_size="128M")
    for n in range(3):
        write_pattern(pool.create_thin(f"vol{n}", "8M").path, 0x30 + n)
    pool.device("vol2").deactivate()
    pool.destroy()  # a reboot: nothing live, files and store kept
    return directory / "metadata"


def thin_tool(tool, path, *, check=True, offset=0, size=None):
    """A thin-provisioning-tools command's output on the metadata file
    ``path`` (``size`` bytes at ``offset``: all of it by default), read
    through a read-only loop device (the tools open with O_DIRECT, which
    the kernel's host filesystem refuses)."""
    region = ["--offset", str(offset)] + ([] if size is None else ["--sizelimit", str(size)])
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", *region, str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        proc = subprocess.run([tool, dev], capture_output=True, text=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
    if check and proc.returncode:
        raise AssertionError(f"{tool} {path}: {proc.stderr or proc.stdout}")
    return proc


def mappings(meta, offset=0, size=None):
    """thin id -> its mappings ``[(origin block, data block), ...]`` in
    thin_dump's XML of the metadata file ``meta``."""
    out = {}
    dev = None
    for line in thin_tool("thin_dump", meta, offset=offset, size=size).stdout.splitlines():
        if m := re.search(r'<device dev_id="(\d+)"', line):
            dev = int(m[1])
            out[dev] = []
        elif m := re.search(r'origin_begin="(\d+)" data_begin="(\d+)" length="(\d+)"', line):
            origin, data, length = (int(v) for v in m.groups())
            out[dev] += [(origin + i, data + i) for i in range(length)]
        elif m := re.search(r'<single_mapping origin_block="(\d+)" data_block="(\d+)"', line):
            out[dev].append((int(m[1]), int(m[2])))
    return out


def mapped_blocks(meta, offset=0, size=None):
    """thin id -> the blocks its mappings cover, counted in thin_dump's
    XML of the metadata file ``meta`` (not from its device details)."""
    return {dev: len(pairs) for dev, pairs in mappings(meta, offset, size).items()}


def mapping_leaf(meta, pairs, offset=0, size=None):
    """The metadata block that is the btree leaf holding exactly a
    device's mappings ``pairs`` (a leaf by its header, with 8-byte values:
    data block << 24 | time), found by scanning the file."""
    with open(meta, "rb") as fh:
        fh.seek(offset)
        image = fh.read(size if size is not None else -1)
    found = []
    for block in range(1, len(image) // 4096):
        node = image[block * 4096 : (block + 1) * 4096]
        _csum, flags, blocknr, nr, max_entries, value_size = struct.unpack_from("<IIQIII", node)
        if not (flags & 2 and blocknr == block and value_size == 8 and nr == len(pairs)):
            continue
        keys = struct.unpack_from(f"<{nr}Q", node, 32)
        values = struct.unpack_from(f"<{nr}Q", node, 32 + 8 * max_entries)
        if list(zip(keys, (v >> 24 for v in values), strict=True)) == pairs:
            found.append(block)
    assert len(found) == 1, found
    return found[0]


def damage_leaf_of(meta, thin_id, offset=0, size=None):
    """Damage the mapping leaf of device ``thin_id`` (see mapping_leaf) in
    the metadata ``size`` bytes at ``offset`` of file ``meta``; return how
    many blocks it mapped."""
    pairs = mappings(meta, offset, size)[thin_id]
    block = mapping_leaf(meta, pairs, offset, size)
    write_at(meta, offset + block * 4096 + 64, b"\xff" * 32)
    assert thin_tool("thin_check", meta, check=False, offset=offset, size=size).returncode
    return len(pairs)


def details_leaf(meta, counts):
    """The metadata block that is the device details leaf recording
    ``counts`` (thin id -> mapped blocks): a leaf by its header, with
    24-byte values whose first field is the mapped blocks."""
    with open(meta, "rb") as fh:
        image = fh.read()
    found = []
    for block in range(1, len(image) // 4096):
        node = image[block * 4096 : (block + 1) * 4096]
        _csum, flags, blocknr, nr, max_entries, value_size = struct.unpack_from("<IIQIII", node)
        if not (flags & 2 and blocknr == block and value_size == 24 and nr == len(counts)):
            continue
        keys = struct.unpack_from(f"<{nr}Q", node, 32)
        mapped = [
            struct.unpack_from("<Q", node, 32 + 8 * max_entries + 24 * i)[0] for i in range(nr)
        ]
        if dict(zip(keys, mapped, strict=True)) == counts:
            found.append(block)
    assert len(found) == 1, found
    return found[0]


def through_flakey(path, dm_name, byte):
    """Rewrite the superblock of the metadata file ``path`` through a
    dm-flakey device that corrupts byte ``byte`` (1-based) of every write,
    as a failing disk would."""
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    name = dm_name("flakey")
    try:
        sectors = os.stat(path).st_size // 512
        witness.dmsetup(
            "create",
            name,
            "--table",
            f"0 {sectors} flakey {loop} 0 0 1 5 corrupt_bio_byte {byte} w 255 0",
        )
        witness.dmsetup("mknodes", name)
        block = mmap.mmap(-1, 4096)
        fd = os.open(loop, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [block], 0)
        finally:
            os.close(fd)
        fd = os.open(f"/dev/mapper/{name}", os.O_WRONLY | os.O_DIRECT)
        try:
            os.pwrite(fd, block, 0)
        finally:
            os.close(fd)
    finally:
        witness.dmsetup("remove", name, check=False)
        subprocess.run(["losetup", "-d", loop], check=False)


@pytest.mark.parametrize(
    "how", ["zeroed superblock", "bad superblock checksum", "dm-flakey corrupted the superblock"]
)
def test_repair_brings_every_device_back(dm_name, tmp_path, how):
    directory = tmp_path / "pool"
    name = dm_name("pool")
    meta = used_pool(name, directory)
    if how == "zeroed superblock":
        write_at(meta, 0, bytes(4096))
    elif how == "bad superblock checksum":
        write_at(meta, 0, b"\xde\xad\xbe\xef")  # the superblock's checksum
    else:
        through_flakey(meta, dm_name, 33)  # a byte of the magic number
    with pytest.raises(libdm.PoolFailedError):
        libdm.Pool.open(directory)
    assert witness.info(name) is None
    damaged_sum = witness.checksum(meta)

    pool = libdm.Pool.load(directory)
    try:
        if how == "bad superblock checksum":
            # Only the checksum is wrong: the copy resealed checks clean,
            # and every device is verified.
            result = pool.repair()
            assert result.whole and [d.before for d in result.devices] == [16] * 3
        else:
            # A damaged superblock hides what each device mapped before,
            # and thin_repair may have found an older generation of the
            # trees: nothing is swapped in until the caller accepts it.
            with pytest.raises(libdm.MetadataLossError, match="not verified") as err:
                pool.repair()
            refused = err.value.result
            assert not refused.swapped and not refused.lost
            assert [(d.name, d.before, d.after) for d in refused.unverified] == [
                (f"vol{n}", None, 16) for n in range(3)
            ]
            assert witness.checksum(meta) == damaged_sum
            result = pool.repair(partial=True)
            assert [d.name for d in result.unverified] == ["vol0", "vol1", "vol2"]
        damaged = result.damaged
        assert result.swapped and not result.lost
        # The damaged copy is kept, the repaired one checks clean.
        assert os.path.basename(damaged).startswith("metadata.damaged-")
        with open(damaged, "rb") as fh:
            head = fh.read(40)
        assert {
            "zeroed superblock": head == bytes(40),
            "bad superblock checksum": head[:4] == b"\xde\xad\xbe\xef",
            "dm-flakey corrupted the superblock": head[32] == 0xFF,
        }[how]
        assert witness.thin_ids(name) == {0, 1, 2}
        assert witness.transaction_id(name) == 3
        for n in range(2):
            assert read_at(pool.device(f"vol{n}").path, 0, MiB) == bytes([0x30 + n]) * MiB
        assert witness.info(f"{name}-vol2") is None  # it was inactive: it stays so
        pool.device("vol2").activate()
        assert read_at(pool.device("vol2").path, 0, MiB) == bytes([0x32]) * MiB
        fields = witness.pool_status(name)
        assert fields[4] == "rw" and "needs_check" not in fields
        pool.create_thin("after", "4M")
        pool.destroy()  # and it reopens as any pool does
    finally:
        pool.close()
    again = libdm.Pool.open(directory)
    try:
        assert {d.name for d in again.devices()} == {"vol0", "vol1", "vol2", "after"}
    finally:
        again.close()


def test_repair_refuses_while_a_device_is_open(make_pool):
    pool = make_pool(data_size="64M")
    dev = pool.create_thin("vol", "4M")
    fd = os.open(dev.path, os.O_RDONLY)
    try:
        with pytest.raises(libdm.DeviceBusyError, match="in use"):
            pool.repair()
    finally:
        os.close(fd)
    assert witness.info(dev.dm_name) is not None  # nothing was taken down
    assert not [f for f in os.listdir(pool.directory) if f.startswith("metadata.")]


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_spare_libdm_did_not_make_is_refused(make_pool, kind):
    """A ``metadata.repair`` in the state directory that the pool did not
    record as its spare (an admin's own thin_repair output, say) is
    neither deleted nor written: the repair refuses, naming it, before
    the pool is taken down."""
    pool = make_pool(data_size="64M")
    dev = pool.create_thin("vol", "4M")
    write_pattern(dev.path, 0x41)
    theirs = pathlib.Path(pool.directory, "metadata.repair")
    if kind == "file":
        theirs.write_bytes(b"an admin's own thin_repair output")
    else:
        theirs.mkdir()
        (theirs / "notes").write_text("kept")
    with pytest.raises(libdm.StateError, match=re.escape(str(theirs))):
        pool.repair()
    if kind == "file":
        assert theirs.read_bytes() == b"an admin's own thin_repair output"
    else:
        assert (theirs / "notes").read_text() == "kept"
    assert witness.info(pool.name) is not None  # nothing was taken down
    assert witness.info(dev.dm_name) is not None
    assert [f for f in os.listdir(pool.directory) if f.startswith("metadata.")] == [
        "metadata.repair"
    ]


def test_repairs_in_one_second_keep_every_copy(dm_name, tmp_path, monkeypatch):
    """Copies are named by the UTC second; repairs within one second
    (the clock held still here) each keep their own copy."""
    monkeypatch.setattr(libdm.thin.repair, "_stamp", lambda: "20260101T000000Z")
    directory = tmp_path / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    write_pattern(pool.create_thin("vol", "8M").path, 0x52)
    pool.destroy()  # a reboot: nothing live, files and store kept
    meta = directory / "metadata"
    write_at(meta, 0, bytes(4096))
    damaged = witness.checksum(meta)
    pool = libdm.Pool.load(directory)
    try:
        repaired = []
        for _ in range(2):  # not verified: kept beside the damaged copy
            with pytest.raises(libdm.MetadataLossError) as err:
                pool.repair()
            repaired.append(err.value.result.repaired)
        assert len(set(repaired)) == 2
        sums = {witness.checksum(path) for path in repaired}
        assert len(sums) == 1 and witness.checksum(meta) == damaged
        kept = [pool.repair(partial=True).damaged for _ in range(2)]
        assert len(set(kept)) == 2
        assert witness.checksum(kept[0]) == damaged
        thin_tool("thin_check", kept[1])  # the first repair's copy
        assert read_at(pool.device("vol").path, 0, MiB) == bytes([0x52]) * MiB
    finally:
        pool.close()


def test_repair_takes_down_only_the_pools_own_devices(dm_name, tmp_path):
    """A device-mapper device someone else made under the name of one of
    the pool's devices is left alone, and the repair refused."""
    directory = tmp_path / "pool"
    name = dm_name("pool")
    meta = used_pool(name, directory)
    write_at(meta, 0, bytes(4096))
    damaged = witness.checksum(meta)
    witness.dmsetup("create", f"{name}-vol1", "--table", "0 2048 zero")
    before = witness.dmsetup("table", f"{name}-vol1")
    pool = libdm.Pool.load(directory)
    try:
        with pytest.raises(libdm.StateError, match=f"{name}-vol1.*is not device"):
            pool.repair()
    finally:
        pool.close()
    assert witness.dmsetup("table", f"{name}-vol1") == before
    assert witness.checksum(meta) == damaged
    witness.dmsetup("remove", f"{name}-vol1")


def test_a_device_whose_delete_was_interrupted_is_not_a_loss(dm_name, tmp_path):
    """Killed after the kernel deleted vol2's thin id, before the store
    recorded it; then the machine stops and the superblock checksum is
    damaged.  vol2 is missing from the metadata because it was being
    deleted: the repair swaps in, and the delete is finished."""
    directory = tmp_path / "pool"
    name = dm_name("pool")
    pool = libdm.Pool.create_loop(name, directory, data_size="128M")
    for n in range(3):
        write_pattern(pool.create_thin(f"vol{n}", "8M").path, 0x30 + n)
    pool.close()
    code = f"import libdm\nlibdm.Pool.open({str(directory)!r}).device('vol2').delete()\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, LIBDM_CRASH_AT="delete:transaction"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    for dev in (f"{name}-vol0", f"{name}-vol1", name):  # the machine stops
        witness.dmsetup("remove", dev)
    meta = directory / "metadata"
    assert mapped_blocks(meta).keys() == {0, 1}
    write_at(meta, 0, b"\xde\xad\xbe\xef")  # the superblock's checksum
    pool = libdm.Pool.load(directory)
    try:
        result = pool.repair()
        assert [(d.name, d.after, d.deleting, d.lost) for d in result.devices] == [
            ("vol0", 16, False, False),
            ("vol1", 16, False, False),
            ("vol2", None, True, False),
        ]
        assert result.swapped and result.whole
        assert {d.name for d in pool.devices()} == {"vol0", "vol1"}
        assert read_at(pool.device("vol1").path, 0, MiB) == bytes([0x31]) * MiB
        assert witness.thin_ids(name) == {0, 1}
    finally:
        pool.close()


def test_a_damaged_details_tree_is_not_trusted_to_a_scan(dm_name, tmp_path):
    """With the device details leaf damaged, thin_dump --repair and
    thin_repair both find an older generation by scanning: vol1 with 16
    of its 32 blocks, the second MiB written gone.  The older count must
    not pass for what vol1 mapped: nothing is swapped in."""
    directory = tmp_path / "pool"
    name = dm_name("pool")
    pool = libdm.Pool.create_loop(name, directory, data_size="128M")
    vol0, vol1 = pool.create_thin("vol0", "8M"), pool.create_thin("vol1", "8M")
    for n, (dev, at) in enumerate([(vol0, 0), (vol1, 0), (vol0, 2), (vol1, 2)]):
        write_pattern(dev.path, 0x60 + n, at * MiB, MiB)
        pool.status()  # a commit: a new generation of the trees
    sums = {dev.name: witness.checksum(dev.path) for dev in (vol0, vol1)}
    pool.destroy()
    meta = directory / "metadata"
    assert mapped_blocks(meta) == {0: 32, 1: 32}
    write_at(meta, details_leaf(meta, {0: 32, 1: 32}) * 4096 + 200, b"\xff" * 16)
    damaged = witness.checksum(meta)
    pool = libdm.Pool.load(directory)
    try:
        with pytest.raises(libdm.MetadataLossError) as err:
            pool.repair()
        result = err.value.result
        assert not result.swapped and witness.checksum(meta) == damaged
        vol1_result = result.devices[1]
        assert vol1_result.name == "vol1" and not vol1_result.verified
        assert vol1_result in result.lost + result.unverified
        # Accepted all the same, what the repair could not vouch for differs.
        result = pool.repair(partial=True)
        if witness.checksum(pool.device("vol1").path) != sums["vol1"]:
            assert "vol1" in {d.name for d in result.lost + result.unverified}
    finally:
        pool.close()


def test_a_repair_thin_repair_cannot_do_changes_nothing(dm_name, tmp_path):
    directory = tmp_path / "pool"
    meta = used_pool(dm_name("pool"), directory)
    write_at(meta, 0, os.urandom(64 * 4096))  # superblock and more: beyond repair
    before = subprocess.run(["sha256sum", str(meta)], capture_output=True, text=True).stdout
    pool = libdm.Pool.load(directory)
    try:
        with pytest.raises(libdm.PoolFailedError, match="nothing was swapped in") as err:
            pool.repair()
        for n in range(3):
            assert f"vol{n} (thin id {n}): missing from the repaired copy" in str(err.value)
    finally:
        pool.close()
    after = subprocess.run(["sha256sum", str(meta)], capture_output=True, text=True).stdout
    assert before == after
    # The repaired copy, empty as it is, is kept beside the damaged one.
    names = sorted(os.listdir(directory))
    assert names[:4] == ["data", "lock", "metadata", "metadata.repaired-" + names[3][18:]]
    assert names[4:] == ["state.db"]


def test_pool_repair_at_a_shell(dm_name, tmp_path):
    directory = tmp_path / "pool"
    meta = used_pool(dm_name("pool"), directory)
    write_at(meta, 0, bytes(4096))
    damaged = witness.checksum(meta)
    proc = subprocess.run(
        [sys.executable, "-m", "libdm", "pool", "repair", "--pool", str(directory)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout
    assert "not verified" in proc.stderr and "--partial" in proc.stderr
    assert witness.checksum(meta) == damaged
    proc = subprocess.run(
        [sys.executable, "-m", "libdm", "pool", "repair", "--partial", "--pool", str(directory)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "metadata repaired" in proc.stdout
    for n in range(3):
        assert f"not verified: vol{n} (thin id {n}): unknown mapped blocks before, 16 after" in (
            proc.stdout
        )
    pool = libdm.Pool.load(directory)
    try:
        assert read_at(pool.device("vol0").path, 0, MiB) == bytes([0x30]) * MiB
    finally:
        pool.close()


def test_a_lost_mapping_leaf_is_reported_and_nothing_swapped_in(dm_name, tmp_path):
    directory = tmp_path / "pool"
    name = dm_name("pool")
    meta = used_pool(name, directory)
    before = mapped_blocks(meta)
    lost = damage_leaf_of(meta, 0)
    assert lost == before[0] > 0
    damaged = witness.checksum(meta)
    # At a shell: the loss is reported, the exit is non-zero, nothing changed.
    proc = subprocess.run(
        [sys.executable, "-m", "libdm", "pool", "repair", "--pool", str(directory)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout
    assert "metadata repaired" not in proc.stdout + proc.stderr
    assert f"vol0 (thin id 0): {lost} mapped blocks before, 0 after" in proc.stderr
    assert witness.checksum(meta) == damaged

    pool = libdm.Pool.load(directory)
    try:
        with pytest.raises(libdm.MetadataLossError) as err:
            pool.repair()
    finally:
        pool.close()
    # In the library: a typed result per device, what the damaged copy
    # mapped and what the repaired one does.
    result = err.value.result
    assert [(d.name, d.thin_id, d.before, d.after) for d in result.devices] == [
        ("vol0", 0, before[0], 0),
        ("vol1", 1, before[1], before[1]),
        ("vol2", 2, before[2], before[2]),
    ]
    assert [d.name for d in result.lost] == ["vol0"]
    assert not result.swapped
    assert f"vol0 (thin id 0): {lost} mapped blocks before, 0 after" in str(err.value)
    # Both copies are kept: the damaged one in place, the repaired one beside it.
    assert witness.checksum(meta) == damaged
    assert result.damaged == str(meta)
    assert os.path.dirname(result.repaired) == str(directory)
    assert os.path.basename(result.repaired).startswith("metadata.repaired-")
    thin_tool("thin_check", result.repaired)
    assert mapped_blocks(result.repaired) == {0: 0, 1: before[1], 2: before[2]}
    assert witness.info(name) is None  # the pool stays down

    # Accepting the loss swaps the repaired copy in; the exit still says so.
    proc = subprocess.run(
        [sys.executable, "-m", "libdm", "pool", "repair", "--partial", "--pool", str(directory)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"vol0 (thin id 0): {lost} mapped blocks before, 0 after" in proc.stdout
    kept = [f for f in os.listdir(directory) if f.startswith("metadata.damaged-")]
    assert len(kept) == 1 and witness.checksum(directory / kept[0]) == damaged
    assert mapped_blocks(meta) == {0: 0, 1: before[1], 2: before[2]}
    pool = libdm.Pool.open(directory)
    try:
        assert read_at(pool.device("vol1").path, 0, MiB) == bytes([0x31]) * MiB
        witness.assert_pool_healthy(directory)
    finally:
        pool.close()


def test_a_handed_over_devices_loss_is_reported(dm_name, tmp_path):
    """A pool handed to another program holds no device libdm records:
    every thin id the damaged copy lists is compared all the same, and a
    device that lost its mappings stops the swap."""
    directory = tmp_path / "pool"
    name = dm_name("pool")
    pool = libdm.Pool.create_loop(name, directory, data_size="64M")
    pool.hand_over("docker")
    # The other program's device, made as Docker's driver makes one.
    witness.dmsetup("message", name, "0", "create_thin 0")
    witness.dmsetup("message", name, "0", "set_transaction_id 0 1")
    theirs = dm_name("theirs")
    witness.dmsetup("create", theirs, "--table", f"0 16384 thin {devno(pool.path)} 0")
    witness.dmsetup("mknodes", theirs)
    write_pattern(f"/dev/mapper/{theirs}", 0x5A, 0, 2 * MiB)
    witness.dmsetup("remove", theirs)
    pool.destroy()  # a reboot: nothing live, files and store kept
    meta = directory / "metadata"
    lost = damage_leaf_of(meta, 0)
    damaged = witness.checksum(meta)
    pool = libdm.Pool.load(directory)
    try:
        with pytest.raises(
            libdm.MetadataLossError, match=f"thin id 0: {lost} mapped blocks before, 0 after"
        ) as err:
            pool.repair()
    finally:
        pool.close()
    result = err.value.result
    assert [(d.name, d.thin_id, d.before, d.after) for d in result.devices] == [("", 0, lost, 0)]
    assert not result.swapped and witness.checksum(meta) == damaged


def test_a_block_pool_is_repaired_into_a_spare_it_owns(dm_name, tmp_path):
    """A pool on one split device: the spare comes from the device's free
    part, becomes the metadata, and the damaged region stays reserved;
    then a loss is reported and a spare device given is used."""
    disk_file = tmp_path / "disk"
    disk = attach(tmp_path, "disk", 256 * MiB)
    state = tmp_path / "state"
    name = dm_name("pool")
    pool = libdm.Pool.create_on_device(name, disk, thinp_percent=80, state_dir=state)
    sums = {}
    for n in range(3):
        dev = pool.create_thin(f"vol{n}", "8M")
        write_pattern(dev.path, 0x40 + n)
        sums[f"vol{n}"] = witness.checksum(dev.path)
    meta_start, meta_len = (int(v) for v in pool.config.backing.meta_segments[0][1:])
    pool.destroy()
    write_at(disk_file, meta_start * 512, bytes(4096))  # a zeroed superblock
    damaged = witness.checksum(disk_file, (meta_start + meta_len) * 512)
    with pytest.raises(libdm.PoolFailedError):
        libdm.Pool.open(state)

    pool = libdm.Pool.load(state)
    try:
        # The blank superblock hides what the devices mapped: the spare
        # keeps the repaired copy until the caller accepts it.
        with pytest.raises(libdm.MetadataLossError, match="not verified") as err:
            pool.repair()
        [(spare_path, spare_start, spare_len)] = pool.config.backing.spare_segments
        assert err.value.result.repaired == f"{disk} sectors {spare_start}+{meta_len}"
        assert witness.checksum(disk_file, (meta_start + meta_len) * 512) == damaged
        result = pool.repair(partial=True)  # into the spare recorded
        assert result.swapped and not result.lost
        assert [d.name for d in result.unverified] == ["vol0", "vol1", "vol2"]
        # The repaired copy is on the device's free part, past the data.
        (path, start, length), *rest = pool.config.backing.meta_segments
        _, data_start, data_len = pool.config.backing.data_segments[0]
        assert not rest and path == disk and start >= data_start + data_len
        assert (
            (path, start, length)
            == (spare_path, spare_start, meta_len)
            == (
                disk,
                spare_start,
                spare_len,
            )
        )
        tmeta = witness.table(f"{name}-tmeta")
        assert tmeta == [f"0 {meta_len} linear {devno(disk)} {start}"]
        assert witness.thin_ids(name) == {0, 1, 2}
        for n in range(3):
            assert witness.checksum(pool.device(f"vol{n}").path) == sums[f"vol{n}"]
        # The damaged copy is kept as it was, and reserved.
        assert witness.checksum(disk_file, (meta_start + meta_len) * 512) == damaged
        assert pool.config.backing.damaged_meta_segments == (Segment(disk, meta_start, meta_len),)
        assert f"{disk} sectors {meta_start}+{meta_len}" == result.damaged
        # Nothing is offered for growth over either copy.
        assert [r[1] for r in pool.free_regions()] == [start + meta_len]
        witness.assert_pool_healthy(state)
        pool.destroy()
    finally:
        pool.close()

    # A mapping leaf of the repaired metadata: the loss is reported, and
    # the spare device given keeps the repaired copy; nothing moved.
    lost = damage_leaf_of(disk_file, 1, start * 512, meta_len * 512)
    spare = attach(tmp_path, "spare", 8 * MiB)
    pool = libdm.Pool.load(state)
    try:
        with pytest.raises(libdm.MetadataLossError) as err:
            pool.repair(spare=spare)
        result = err.value.result
        assert [(d.name, d.before, d.after) for d in result.devices] == [
            ("vol0", lost, lost),
            ("vol1", lost, 0),
            ("vol2", lost, lost),
        ]
        assert not result.swapped
        assert pool.config.backing.meta_segments == (Segment(disk, start, meta_len),)
        # After the label that makes the spare the pool's own.
        assert pool.config.backing.spare_segments == (Segment(spare, R, meta_len),)
        assert mapped_blocks(spare, R * 512, meta_len * 512) == {0: lost, 1: 0, 2: lost}
        assert witness.info(name) is None
    finally:
        pool.close()
    # The same at a shell, and nothing moved.
    proc = subprocess.run(
        [sys.executable, "-m", "libdm", "pool", "repair", "--pool", str(state), "--spare", spare],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout
    assert f"vol1 (thin id 1): {lost} mapped blocks before, 0 after" in proc.stderr
    assert f"is kept ({spare} sectors {R}+{meta_len})" in proc.stderr
    pool = libdm.Pool.load(state)
    try:
        assert pool.config.backing.meta_segments == (Segment(disk, start, meta_len),)
    finally:
        pool.close()


def region_sum(path, offset, size):
    """SHA-256 of ``size`` bytes at ``offset`` of ``path``."""
    import hashlib

    with open(path, "rb") as fh:
        fh.seek(offset)
        return hashlib.sha256(fh.read(size)).hexdigest()


def segment_region(segment):
    """A one-segment side's ``(offset, size)`` in bytes."""
    _, start, length = segment
    return start * 512, length * 512


@pytest.mark.parametrize("kind", ["loop", "block"])
def test_metadata_damaged_anywhere_is_repaired_or_the_loss_reported(dm_name, tmp_path, kind):
    """One block of the metadata damaged at a time (the superblock, each
    device's mapping leaf, and a seeded sample of every block ever
    written), then open, else repair: every device reads back as the
    model says, or the repair names it with what it mapped before (as
    thin_dump counted on the undamaged metadata) and after.  Never a
    device that reads differently without a word.  ``LIBDM_REPAIR_SEED``
    picks the blocks and the bytes (17 by default).  A block pool's
    metadata moves to its spare at each repair swapped in: each round
    damages it where the pool has it then."""
    directory = tmp_path / "pool"
    name = dm_name("pool")
    if kind == "loop":
        pool = libdm.Pool.create_loop(name, directory, data_size="128M")
        meta = directory / "metadata"
    else:
        disk = attach(tmp_path, "disk", 256 * MiB)
        meta = tmp_path / "disk"  # the file under the pool's one device
        pool = libdm.Pool.create_on_device(name, disk, thinp_percent=50, state_dir=directory)
    write_pattern(pool.create_thin("vol0", "8M").path, 0x50, 0, 2 * MiB)
    write_pattern(pool.create_thin("vol1", "8M").path, 0x51, 3 * MiB, MiB)
    snap = pool.device("vol0").snapshot("snap")
    write_pattern(snap.path, 0x52, MiB, MiB)  # half shared with vol0, half its own
    write_pattern(pool.create_thin("idle", "8M").path, 0x53)
    pool.device("idle").deactivate()
    model = {}
    for dev in pool.devices():
        dev.activate()
        model[dev.name] = witness.checksum(dev.path)
    ids = {dev.name: dev.thin_id for dev in pool.devices()}
    pool.destroy()

    def where():
        """Where the pool has its metadata now: (offset, size) in ``meta``."""
        if kind == "loop":
            return 0, os.stat(meta).st_size
        pool = libdm.Pool.load(directory)
        try:
            [segment] = pool.config.backing.meta_segments
        finally:
            pool.close()
        return segment_region(segment)

    offset, size = where()
    with open(meta, "rb") as fh:
        fh.seek(offset)
        pristine = fh.read(size)
    written = [b for b in range(1, size // 4096) if any(pristine[b * 4096 : b * 4096 + 4096])]
    pairs = mappings(meta, offset, size)
    counts = {dev: len(p) for dev, p in pairs.items()}
    leaves = [
        mapping_leaf(meta, pairs[ids[name]], offset, size) for name in ("vol0", "vol1", "snap")
    ]
    rng = random.Random(int(os.environ.get("LIBDM_REPAIR_SEED", "17")))
    blocks = [0, *leaves, *rng.sample([b for b in written if b not in leaves], 8)]
    outcomes = []
    for block in blocks:
        if kind == "loop":
            for leftover in os.listdir(directory):
                if leftover.startswith("metadata."):
                    os.unlink(directory / leftover)
        offset, size = where()
        write_at(meta, offset, pristine)
        write_at(meta, offset + block * 4096 + rng.randrange(4096 - 32), rng.randbytes(32))
        damaged = region_sum(meta, offset, size)
        unverified = set()
        try:
            pool = libdm.Pool.open(directory)
        except libdm.PoolError:
            pool = None
        if pool is not None:
            outcome = "opened"
            reported = set(pool.unavailable)
        else:
            pool = libdm.Pool.load(directory)
            try:
                result = pool.repair()
                outcome = "repaired"
                reported = set()
            except libdm.MetadataLossError as exc:
                result = exc.result
                outcome = "loss reported"
                assert region_sum(meta, offset, size) == damaged  # nothing swapped in
                assert where() == (offset, size)
                if kind == "loop":
                    repaired = mapped_blocks(result.repaired)
                else:
                    [spare] = pool.config.backing.spare_segments
                    repaired = mapped_blocks(meta, *segment_region(spare))
                for d in result.devices:
                    assert d.after == repaired.get(d.thin_id), (block, d)
                    if d.before is not None and not d.scanned:
                        assert d.before == counts[d.thin_id], (block, d)
                # A device lost, or one whose count before was unreadable
                # (then its contents are checked all the same, below).
                reported = {d.name for d in result.lost}
                unverified = {d.name for d in result.unverified}
                assert reported or unverified, (block, result)
                if not reported:
                    outcome = "not verified"
                pool.repair(partial=True)
            except libdm.PoolFailedError as exc:
                assert "nothing was swapped in" in str(exc), (block, exc)
                assert region_sum(meta, offset, size) == damaged
                outcomes.append((block, f"refused: {exc}"))
                pool.close()
                continue
        try:
            for dev in pool.devices():
                if dev.name in reported:
                    continue
                dev.activate()
                if witness.checksum(dev.path) != model[dev.name]:
                    # Only a device the repair said it could not verify may
                    # differ without being reported lost.
                    assert dev.name in unverified, (block, outcome, dev.name)
                    outcome += ", differs"
            pool.destroy()
        finally:
            pool.close()
        outcomes.append((block, outcome))
    # The damage was seen where it mattered: every leaf lost its device's mappings.
    assert [o for b, o in outcomes if b in leaves] == ["loss reported"] * len(leaves), outcomes
