"""Thin pools on block devices: direct mode, one split device, adopted pools.

The block devices are loop devices the test attaches itself with
``losetup`` over sparse files; signatures are made with the real tools
(mkfs, mkswap) or written by hand, and every outcome is checked against
dmsetup, sysfs, blkid and thin_dump rather than against libdm.
"""

import os
import struct
import subprocess
import uuid as uuidlib
import zlib

import pytest
from support import witness
from support.blockio import attach, devno, read_at, write_at, write_pattern

import libdm
from libdm.thin.backing import split_layout
from libdm.thin.label import RESERVED

kernel = pytest.mark.kernel

MiB = 1 << 20
R = int(RESERVED)  # sectors before a labelled device's first mapped one


# -- helpers ---------------------------------------------------------------------------


def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout


def sectors_of(path):
    return int(run("blockdev", "--getsz", path).strip())


def blkid(path, tag):
    proc = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", tag, path], capture_output=True, text=True
    )
    return proc.stdout.strip()


def holds_block(file_path, block):
    """True if ``block`` (bytes) appears at a block-aligned offset of the file."""
    with open(file_path, "rb") as fh:
        while True:
            chunk = fh.read(MiB)
            if not chunk:
                return False
            for off in range(0, len(chunk), len(block)):
                if chunk[off : off + len(block)] == block:
                    return True


def make_gpt(path):
    """A valid, empty GPT (protective MBR, primary and backup headers with
    correct CRCs), written by hand: sgdisk and parted are not installed."""
    sectors = sectors_of(path)
    last = sectors - 1
    entries = bytes(128 * 128)
    disk_guid = uuidlib.uuid4().bytes_le

    def header(current, backup, entries_lba):
        fields = [
            b"EFI PART",
            0x00010000,
            92,
            0,
            0,
            current,
            backup,
            34,
            last - 33,
            disk_guid,
            entries_lba,
            128,
            128,
            zlib.crc32(entries),
        ]
        raw = struct.pack("<8sIIIIQQQQ16sQIII", *fields)
        fields[3] = zlib.crc32(raw)
        return struct.pack("<8sIIIIQQQQ16sQIII", *fields).ljust(512, b"\0")

    mbr = bytearray(512)
    mbr[446:462] = struct.pack(
        "<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, min(sectors - 1, 0xFFFFFFFF)
    )
    mbr[510:512] = b"\x55\xaa"
    write_at(path, 0, bytes(mbr) + header(1, last, 2) + entries)
    write_at(path, (last - 32) * 512, entries + header(last, 1, last - 32))


def make_lvm_label(path):
    """An LVM2 label as pvcreate writes it: "LABELONE" at sector 1 and
    "LVM2 001" at offset 24 of the label."""
    label = b"LABELONE" + struct.pack("<QII", 1, 0, 32) + b"LVM2 001"
    write_at(path, 512, label)


def assert_nothing_created(name, state_dir):
    assert not any(n.startswith(name) for n in witness.names())
    assert not os.path.exists(state_dir)


@pytest.fixture
def two_loops(tmp_path):
    """(data, metadata) loop devices: 256 MiB and 16 MiB."""
    return attach(tmp_path, "data.img", 256 * MiB), attach(tmp_path, "meta.img", 16 * MiB)


def assert_pool_on(name, meta, data):
    """The pool's table names its -tmeta and -tdata linear devices, and
    those map the whole of ``meta`` and ``data``."""
    mi, di = witness.info(f"{name}-tmeta"), witness.info(f"{name}-tdata")
    assert witness.table(name)[0].split()[3:5] == [
        f"{mi['major']}:{mi['minor']}",
        f"{di['major']}:{di['minor']}",
    ]
    assert witness.table(f"{name}-tmeta")[0].split()[3:] == [devno(meta), str(R)]
    assert witness.table(f"{name}-tdata")[0].split()[3:] == [devno(data), str(R)]


# -- split_layout: the sector math, checked against numbers computed here -----------------


def expected_split(total, bs, pct, metapct, reserved=0):
    meta = max(total * metapct // 100, 4096)
    meta -= meta % 8
    data_start = (reserved + meta + bs - 1) // bs * bs
    data_len = total * pct // 100
    data_len -= data_len % bs
    while data_start + data_len > total:
        data_len -= bs
    return reserved, meta, data_start, data_len


@pytest.mark.parametrize(
    "total, bs, pct, metapct",
    [
        (1 << 20, 128, 95, 1),  # 512 MiB: 1% = 10485 -> 10480; data at 10496
        (1 << 20, 128, 99, 1),  # 99%: clipped at the end of the device
        (1 << 20, 256, 90, 2),  # 128 KiB blocks
        (200_000, 128, 95, 1),  # 1% below the 2 MiB floor: 4096
        (10_000_000 + 3, 2048, 50, 5),
        (4096 + 128, 128, 95, 1),  # exactly one data block fits
        (1 << 21, 128, 1, 1),
    ],
)
def test_split_layout_matches_the_documented_math(total, bs, pct, metapct):
    layout = split_layout(libdm.Sectors(total), libdm.Sectors(bs), pct, metapct)
    got = tuple(int(v) for v in layout)
    assert got == expected_split(total, bs, pct, metapct)
    meta_start, meta_len, data_start, data_len = got
    assert meta_len % 8 == 0 and meta_len >= 4096
    assert data_start % bs == 0 and data_start >= meta_start + meta_len
    assert data_len % bs == 0 and data_len > 0 and data_start + data_len <= total


def test_split_layout_numbers_for_512_mib():
    got = tuple(int(v) for v in split_layout(libdm.Sectors(1 << 20), libdm.Sectors(128), 95, 1))
    assert got == (0, 10480, 10496, 996096)
    got = tuple(int(v) for v in split_layout(libdm.Sectors(1 << 20), libdm.Sectors(128), 99, 1))
    assert got == (0, 10480, 10496, (1 << 20) - 10496)


@pytest.mark.parametrize(
    "pct, metapct, message",
    [
        (0, 1, "thinp_percent must be between 0 and 100"),
        (100, 1, "thinp_percent must be between 0 and 100"),
        (-5, 1, "thinp_percent must be between 0 and 100"),
        (95, 0, "thinp_metapercent must be between 0 and 100"),
        (95, 100, "thinp_metapercent must be between 0 and 100"),
        (95, 6, "exceed 100"),
    ],
)
def test_split_layout_refuses_bad_percentages(pct, metapct, message):
    with pytest.raises(ValueError, match=message):
        split_layout(libdm.Sectors(1 << 20), libdm.Sectors(128), pct, metapct)


@pytest.mark.parametrize("total", [0, 4096, 4096 + 127, 4200])
def test_split_layout_refuses_a_device_too_small(total):
    with pytest.raises(ValueError, match="too small"):
        split_layout(libdm.Sectors(total), libdm.Sectors(128), 95, 1)


# -- direct mode: Pool.create on two block devices ------------------------------------


@kernel
def test_create_on_two_block_devices(dm_name, tmp_path, two_loops):
    data, meta = two_loops
    write_at(meta, 0, b"\xff" * 4096)  # stale bytes: must be zeroed before the kernel looks
    pool = libdm.Pool.create(dm_name("pool"), data, meta, state_dir=tmp_path / "state")
    try:
        assert pool.kind == "block"
        # As LVM does: the pool sits on linear devices over the two given.
        tmeta, tdata = f"{pool.name}-tmeta", f"{pool.name}-tdata"
        assert witness.table(tmeta) == [f"0 {16 * MiB // 512 - R} linear {devno(meta)} {R}"]
        assert witness.table(tdata) == [f"0 {256 * MiB // 512 - R} linear {devno(data)} {R}"]
        # Each device carries the pool's label in the sectors before.
        for loopdev in (meta, data):
            assert pool.config.token.encode() in read_at(loopdev, 0, 4096)
        mi, di = witness.info(tmeta), witness.info(tdata)
        assert witness.table(pool.name) == [
            f"0 {256 * MiB // 512 - R} thin-pool {mi['major']}:{mi['minor']} "
            f"{di['major']}:{di['minor']} 128 0 0"
        ]
        # The linear devices hold the loops (sysfs), and the metadata is a real pool's.
        info = witness.info(pool.name)
        for loopdev, piece in ((data, di), (meta, mi)):
            holders = os.listdir(f"/sys/block/{os.path.basename(loopdev)}/holders")
            assert holders == [f"dm-{piece['minor']}"]
        assert witness.transaction_id(pool.name) == 0
        dev = pool.create_thin("vol", "16M")
        assert witness.table(dev.dm_name) == [
            f"0 {16 * MiB // 512} thin {info['major']}:{info['minor']} 0"
        ]
        assert witness.thin_ids(pool.name) == {0}
        write_pattern(dev.path, 0xA5, length=4 * MiB)
        assert read_at(dev.path, 0, 4 * MiB) == b"\xa5" * (4 * MiB)
        assert int(dev.status().mapped) == 4 * MiB // 512
        # The bytes went to the data device, through the loop to its file.
        assert holds_block(tmp_path / "data.img", b"\xa5" * 65536)
        report = pool.info().as_dict()
        assert report["Data file"] == data and report["Metadata file"] == meta
        assert report["Data Space Total"] == "255 MiB"
    finally:
        pool.destroy(remove_files=True)
    assert not any(n.startswith(pool.name) for n in witness.names())
    assert not (tmp_path / "state").exists()
    for loopdev in (data, meta):  # the caller's devices stay, released
        assert os.listdir(f"/sys/block/{os.path.basename(loopdev)}/holders") == []


@kernel
def test_create_with_block_size_and_options(two_loops, make_pool):
    data, meta = two_loops
    pool = make_pool(
        data, meta, block_size="512K", low_water_mark=3, features=["skip_block_zeroing"]
    )
    mi, di = witness.info(f"{pool.name}-tmeta"), witness.info(f"{pool.name}-tdata")
    assert witness.table(pool.name) == [
        f"0 {256 * MiB // 512 - R} thin-pool {mi['major']}:{mi['minor']} "
        f"{di['major']}:{di['minor']} 1024 3 1 skip_block_zeroing"
    ]


SIGNATURES = {
    "ext4": (
        lambda dev: run("mkfs.ext4", "-q", "-F", dev),
        "TYPE",
        "ext4",
        "an ext2/ext3/ext4 filesystem",
    ),
    "xfs": (lambda dev: run("mkfs.xfs", "-q", "-f", dev), "TYPE", "xfs", "an XFS filesystem"),
    "swap": (lambda dev: run("mkswap", dev), "TYPE", "swap", "a swap area"),
    "gpt": (make_gpt, "PTTYPE", "gpt", "a GPT partition table"),
    "lvm": (make_lvm_label, None, None, "an LVM2 physical volume label"),
}


@kernel
@pytest.mark.parametrize("kind", sorted(SIGNATURES))
def test_create_refuses_a_data_device_with_a_signature(dm_name, tmp_path, kind):
    make, tag, value, phrase = SIGNATURES[kind]
    data = attach(tmp_path, "data.img", 512 * MiB)  # mkfs.xfs wants 300 MiB
    meta = attach(tmp_path, "meta.img", 16 * MiB)
    make(data)
    if tag is not None:
        assert blkid(data, tag) == value  # the signature is real
    name, state = dm_name("pool"), tmp_path / "state"
    with pytest.raises(libdm.DeviceNotBlankError) as caught:
        libdm.Pool.create(name, data, meta, state_dir=state)
    assert f"{data} holds {phrase}" in str(caught.value)
    assert "force=True" in str(caught.value)
    assert_nothing_created(name, state)
    if tag is not None:
        assert blkid(data, tag) == value  # and it is untouched
    pool = libdm.Pool.create(name, data, meta, state_dir=state, force=True)
    try:
        assert_pool_on(name, meta, data)
        dev = pool.create_thin("vol", "8M")
        write_pattern(dev.path, 0x3C)
        assert read_at(dev.path) == b"\x3c" * MiB
    finally:
        pool.close()


@kernel
def test_create_refuses_a_metadata_device_with_a_signature(dm_name, tmp_path, two_loops):
    data, meta = two_loops
    run("mkfs.ext4", "-q", "-F", meta)
    name, state = dm_name("pool"), tmp_path / "state"
    with pytest.raises(
        libdm.DeviceNotBlankError, match=f"{meta} holds an ext2/ext3/ext4 filesystem"
    ):
        libdm.Pool.create(name, data, meta, state_dir=state)
    assert_nothing_created(name, state)
    assert blkid(meta, "TYPE") == "ext4"


@kernel
def test_old_pool_metadata_is_a_signature_and_force_starts_afresh(dm_name, tmp_path, two_loops):
    data, meta = two_loops
    name, state = dm_name("pool"), tmp_path / "state"
    first = libdm.Pool.create(name, data, meta, state_dir=state)
    first.create_thin("old", "4M")
    first.destroy(remove_files=True)
    # The old metadata is there, after the label, which names the pool.
    assert read_at(meta, R * 512 + 32, 8) == struct.pack("<Q", 27022010)
    with pytest.raises(libdm.DeviceNotBlankError, match=f"{meta} is the meta device #0 of libdm"):
        libdm.Pool.create(name, data, meta, state_dir=state)
    assert_nothing_created(name, state)
    again = libdm.Pool.create(name, data, meta, state_dir=state, force=True)
    try:
        assert witness.thin_ids(name) == set()  # the metadata was started anew
        assert witness.transaction_id(name) == 0
        assert again.create_thin("new", "4M").thin_id == 0
    finally:
        again.close()


@kernel
@pytest.mark.parametrize("force", [False, True])
def test_create_refuses_a_mounted_device(dm_name, tmp_path, two_loops, force):
    data, meta = two_loops
    run("mkfs.ext4", "-q", "-F", data)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", data, str(mnt))
    try:
        name, state = dm_name("pool"), tmp_path / "state"
        with pytest.raises(libdm.DeviceBusyError) as caught:
            libdm.Pool.create(name, data, meta, state_dir=state, force=force)
        assert f"{data} is in use" in str(caught.value)
        assert_nothing_created(name, state)
        assert os.path.ismount(mnt)
    finally:
        run("umount", str(mnt))


@kernel
@pytest.mark.parametrize("which", ["data", "metadata"])
def test_create_refuses_a_device_held_by_another_dm_device(dm_name, tmp_path, two_loops, which):
    data, meta = two_loops
    held = data if which == "data" else meta
    linear = dm_name("holder")
    witness.dmsetup("create", linear, "--table", f"0 2048 linear {devno(held)} 0")
    minor = witness.info(linear)["minor"]
    holders = os.listdir(f"/sys/block/{os.path.basename(held)}/holders")
    assert holders == [f"dm-{minor}"]
    name, state = dm_name("pool"), tmp_path / "state"
    with pytest.raises(libdm.DeviceBusyError) as caught:
        libdm.Pool.create(name, data, meta, state_dir=state, force=True)
    assert f"{held} is in use (held by dm-{minor})" in str(caught.value)
    assert_nothing_created(name, state)
    assert witness.table(linear) == [f"0 2048 linear {devno(held)} 0"]


@kernel
def test_create_refuses_paths_that_are_not_usable_devices(dm_name, tmp_path, two_loops):
    data, meta = two_loops
    name, state = dm_name("pool"), tmp_path / "state"
    regular = tmp_path / "plain-file"
    regular.write_bytes(bytes(MiB))
    with pytest.raises(ValueError, match="not a block device"):
        libdm.Pool.create(name, str(regular), meta, state_dir=state)
    with pytest.raises(ValueError, match="not a block device"):
        libdm.Pool.create(name, data, str(regular), state_dir=state)
    with pytest.raises(FileNotFoundError):
        libdm.Pool.create(name, str(tmp_path / "missing"), meta, state_dir=state)
    with pytest.raises(FileNotFoundError):
        libdm.Pool.create(name, data, "/dev/no-such-device", state_dir=state)
    with pytest.raises(ValueError, match="must be different devices"):
        libdm.Pool.create(name, data, data, state_dir=state)
    link = tmp_path / "data-link"
    os.symlink(data, link)
    with pytest.raises(ValueError, match="must be different devices"):
        libdm.Pool.create(name, data, str(link), state_dir=state)
    assert_nothing_created(name, state)


@kernel
def test_create_refuses_the_same_device_under_another_node(dm_name, tmp_path, two_loops):
    # Another device node with the same device number is the same disk:
    # metadata and data would overwrite each other.
    data, _meta = two_loops
    alias = tmp_path / "alias"
    st = os.stat(data)
    try:
        os.mknod(alias, 0o600 | (st.st_mode & 0o170000), st.st_rdev)
    except OSError as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    assert devno(str(alias)) == devno(data)
    write_at(data, 0, b"\xc3" * 4096)  # the caller's bytes, in no known format
    name, state = dm_name("pool"), tmp_path / "state"
    with pytest.raises(ValueError, match="must be different devices"):
        libdm.Pool.create(name, data, str(alias), state_dir=state)
    assert_nothing_created(name, state)
    assert read_at(data, 0, 4096) == b"\xc3" * 4096  # refused before writing anything


@kernel
def test_block_pool_reopens_after_teardown(dm_name, tmp_path, two_loops):
    data, meta = two_loops
    name, state = dm_name("pool"), tmp_path / "state"
    pool = libdm.Pool.create(
        name, data, meta, state_dir=state, block_size="128K", features=["skip_block_zeroing"]
    )
    a = pool.create_thin("a", "32M")
    b = pool.create_thin("b", "8M")
    write_pattern(a.path, 0x11, length=8 * MiB)
    write_pattern(b.path, 0x22)
    sums = {d.name: witness.checksum(d.path) for d in (a, b)}
    b.deactivate()
    table_before = witness.table(name)
    pool.close()
    for dev in (f"{name}-a", name, f"{name}-tdata", f"{name}-tmeta"):  # as a reboot would
        witness.dmsetup("remove", dev)
    assert not any(n.startswith(name) for n in witness.names())
    reopened = libdm.Pool.open(state)
    try:
        assert witness.table(name)[0].split()[5:] == table_before[0].split()[5:]
        assert witness.table(name)[0].split()[5:] == ["256", "0", "1", "skip_block_zeroing"]
        assert_pool_on(name, meta, data)
        assert f"{name}-a" in witness.names() and f"{name}-b" not in witness.names()
        assert witness.checksum(reopened.device("a").path) == sums["a"]
        reopened.device("b").activate()
        assert witness.checksum(reopened.device("b").path) == sums["b"]
        assert witness.thin_ids(name) == {0, 1}
        assert witness.transaction_id(name) == 2
    finally:
        reopened.close()


# -- one device split into metadata and data ------------------------------------------


@kernel
def test_create_on_device_splits_it_with_linear_pieces(dm_name, tmp_path):
    device = attach(tmp_path, "disk.img", 512 * MiB)
    total = sectors_of(device)
    assert total == 1 << 20
    write_at(device, 0, b"\xee" * 4096)  # no known signature, but not zero
    name, state = dm_name("pool"), tmp_path / "state"
    pool = libdm.Pool.create_on_device(
        name, device, thinp_percent=95, thinp_metapercent=1, state_dir=state
    )
    try:
        assert pool.kind == "block"
        _, meta_len, data_start, data_len = expected_split(total, 128, 95, 1, R)
        assert (meta_len, data_start, data_len) == (10480, 12544, 996096)
        assert witness.table(f"{name}-tmeta") == [f"0 {meta_len} linear {devno(device)} {R}"]
        assert witness.table(f"{name}-tdata") == [
            f"0 {data_len} linear {devno(device)} {data_start}"
        ]
        tmeta, tdata = witness.info(f"{name}-tmeta"), witness.info(f"{name}-tdata")
        assert witness.table(name) == [
            f"0 {data_len} thin-pool {tmeta['major']}:{tmeta['minor']} "
            f"{tdata['major']}:{tdata['minor']} 128 0 0"
        ]
        assert sorted(os.listdir(f"/sys/block/{os.path.basename(device)}/holders")) == sorted(
            [f"dm-{tmeta['minor']}", f"dm-{tdata['minor']}"]
        )
        dev = pool.create_thin("vol", "64M")
        assert witness.thin_ids(name) == {0}  # thin_dump reads the metadata piece
        write_pattern(dev.path, 0x5A, length=2 * MiB)
        assert read_at(dev.path, 0, 2 * MiB) == b"\x5a" * (2 * MiB)
        # Data lands in the data piece: past data_start on the raw device.
        with open(tmp_path / "disk.img", "rb") as fh:
            fh.seek(data_start * 512)
            tail = fh.read(data_len * 512)
        assert b"\x5a" * 65536 in tail
        report = pool.info().as_dict()
        assert report["Data file"] == f"{device} (sectors {data_start}+{data_len})"
        assert report["Metadata file"] == f"{device} (sectors {R}+{meta_len})"
    finally:
        pool.destroy(remove_files=True)
    assert not any(n.startswith(name) for n in witness.names())
    assert os.listdir(f"/sys/block/{os.path.basename(device)}/holders") == []


@kernel
def test_create_on_device_with_other_percentages_and_block_size(dm_name, tmp_path):
    device = attach(tmp_path, "disk.img", 300 * MiB)
    total = sectors_of(device)
    name = dm_name("pool")
    pool = libdm.Pool.create_on_device(
        name,
        device,
        thinp_percent=97,
        thinp_metapercent=3,
        state_dir=tmp_path / "state",
        block_size="128K",
    )
    try:
        _, meta_len, data_start, data_len = expected_split(total, 256, 97, 3, R)
        assert data_start + data_len <= total
        assert witness.table(f"{name}-tmeta") == [f"0 {meta_len} linear {devno(device)} {R}"]
        assert witness.table(f"{name}-tdata") == [
            f"0 {data_len} linear {devno(device)} {data_start}"
        ]
        assert witness.table(name)[0].split()[1] == str(data_len)
        assert witness.table(name)[0].split()[5] == "256"
    finally:
        pool.close()


@kernel
def test_create_on_device_refusals_leave_nothing(dm_name, tmp_path):
    device = attach(tmp_path, "disk.img", 64 * MiB)
    name, state = dm_name("pool"), tmp_path / "state"
    with pytest.raises(ValueError, match="thinp_percent"):
        libdm.Pool.create_on_device(name, device, thinp_percent=100, state_dir=state)
    assert_nothing_created(name, state)
    run("mkswap", device)
    with pytest.raises(libdm.DeviceNotBlankError, match="a swap area"):
        libdm.Pool.create_on_device(name, device, state_dir=state)
    assert_nothing_created(name, state)
    linear = dm_name("holder")
    witness.dmsetup("create", linear, "--table", f"0 128 linear {devno(device)} 0")
    minor = witness.info(linear)["minor"]
    with pytest.raises(libdm.DeviceBusyError, match=f"in use \\(held by dm-{minor}\\)"):
        libdm.Pool.create_on_device(name, device, state_dir=state, force=True)
    assert_nothing_created(name, state)
    witness.dmsetup("remove", linear)
    small = attach(tmp_path, "small.img", 2 * MiB)
    with pytest.raises(ValueError, match="too small"):
        libdm.Pool.create_on_device(name, small, state_dir=state)
    assert_nothing_created(name, state)
    # A piece's name taken by someone else.
    witness.dmsetup("create", f"{name}-tmeta", "--table", f"0 128 linear {devno(small)} 0")
    with pytest.raises(libdm.DeviceExistsError, match="-tmeta"):
        libdm.Pool.create_on_device(name, device, state_dir=state, force=True)
    assert name not in witness.names() and f"{name}-tdata" not in witness.names()
    assert not os.path.exists(state)


@kernel
def test_split_pool_reopens_after_teardown(dm_name, tmp_path):
    device = attach(tmp_path, "disk.img", 256 * MiB)
    name, state = dm_name("pool"), tmp_path / "state"
    pool = libdm.Pool.create_on_device(name, device, state_dir=state)
    a = pool.create_thin("a", "32M")
    write_pattern(a.path, 0x77, length=4 * MiB)
    snap = a.snapshot("snap")
    write_pattern(snap.path, 0x88, offset=MiB)
    write_pattern(a.path, 0x99, offset=2 * MiB)
    sums = {d.name: witness.checksum(d.path) for d in (a, snap)}
    tables = {n: witness.table(n) for n in (name, f"{name}-tmeta", f"{name}-tdata")}
    pool.close()
    for dev in (f"{name}-snap", f"{name}-a", name, f"{name}-tdata", f"{name}-tmeta"):
        witness.dmsetup("remove", dev)
    assert not any(n.startswith(name) for n in witness.names())
    reopened = libdm.Pool.open(state)
    try:
        for n, tbl in tables.items():
            assert witness.table(n) == tbl
        assert witness.checksum(reopened.device("a").path) == sums["a"]
        assert witness.checksum(reopened.device("snap").path) == sums["snap"]
        assert read_at(reopened.device("snap").path, 0, MiB) == b"\x77" * MiB
        assert witness.thin_ids(name) == {0, 1}
    finally:
        reopened.close()


# -- adopting a pool made by someone else ------------------------------------------------


def make_pool_by_hand(dm_name, tmp_path, extra="0 0"):
    data = attach(tmp_path, "data.img", 128 * MiB)
    meta = attach(tmp_path, "meta.img", 8 * MiB)
    write_at(meta, 0, bytes(4096))
    name = dm_name("pool")
    witness.dmsetup(
        "create",
        name,
        "--table",
        f"0 {128 * MiB // 512} thin-pool {devno(meta)} {devno(data)} 128 {extra}",
    )
    return name


@kernel
def test_adopt_an_unused_pool(dm_name, tmp_path):
    name = make_pool_by_hand(dm_name, tmp_path, extra="7 1 skip_block_zeroing")
    table = witness.table(name)
    state = tmp_path / "state"
    pool = libdm.Pool.adopt(name, state_dir=state)
    assert pool.kind == "adopted" and pool.name == name
    info = witness.info(name)
    dev = pool.create_thin("vol", "16M")
    assert witness.table(dev.dm_name) == [
        f"0 {16 * MiB // 512} thin {info['major']}:{info['minor']} 0"
    ]
    assert witness.thin_ids(name) == {0}
    assert witness.transaction_id(name) == 1
    write_pattern(dev.path, 0x42)
    assert read_at(dev.path) == b"\x42" * MiB
    pool.close()
    # Reopening checks the live table against what adopt read from it.
    again = libdm.Pool.open(state)
    assert [d.name for d in again.devices()] == ["vol"]
    again.destroy()
    assert dev.dm_name not in witness.names()
    assert witness.info(name) is not None  # the adopted pool is not libdm's to remove
    assert witness.table(name) == table
    assert witness.thin_ids(name) == {0}  # destroy removes devices, not their data
    witness.dmsetup("remove", name)
    assert name not in witness.names()


@kernel
def test_adopt_refuses_a_pool_in_use(dm_name, tmp_path):
    name = make_pool_by_hand(dm_name, tmp_path)
    witness.dmsetup("message", name, "0", "create_thin 0")
    witness.dmsetup("message", name, "0", "set_transaction_id 0 1")
    state = tmp_path / "state"
    with pytest.raises(libdm.StateError, match="transaction id 1"):
        libdm.Pool.adopt(name, state_dir=state)
    assert not os.path.exists(state)
    assert witness.transaction_id(name) == 1 and witness.thin_ids(name) == {0}


@kernel
def test_adopt_refuses_a_pool_with_data_in_use(dm_name, tmp_path):
    name = make_pool_by_hand(dm_name, tmp_path)
    witness.dmsetup("message", name, "0", "create_thin 0")
    info = witness.info(name)
    thin = dm_name("thin")
    witness.dmsetup("create", thin, "--table", f"0 8192 thin {info['major']}:{info['minor']} 0")
    write_pattern(
        witness.devnode(f"{witness.info(thin)['major']}:{witness.info(thin)['minor']}"),
        1,
        length=65536,
    )
    witness.dmsetup("remove", thin)
    used = witness.pool_status(name)[2].split("/")[0]
    assert int(used) > 0 and witness.transaction_id(name) == 0
    state = tmp_path / "state"
    with pytest.raises(libdm.StateError, match="data blocks used"):
        libdm.Pool.adopt(name, state_dir=state)
    assert not os.path.exists(state)


@kernel
def test_adopt_refuses_what_is_not_a_pool(dm_name, tmp_path):
    loopdev = attach(tmp_path, "disk.img", 8 * MiB)
    linear = dm_name("linear")
    witness.dmsetup("create", linear, "--table", f"0 8192 linear {devno(loopdev)} 0")
    state = tmp_path / "state"
    with pytest.raises(libdm.RefusedError, match="not a thin-pool device"):
        libdm.Pool.adopt(linear, state_dir=state)
    with pytest.raises(libdm.NoSuchDeviceError):
        libdm.Pool.adopt(dm_name("missing"), state_dir=state)
    assert not os.path.exists(state)
    assert witness.table(linear) == [f"0 8192 linear {devno(loopdev)} 0"]
