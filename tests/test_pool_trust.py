"""Growth that cannot wedge a pool, sizes the kernel cannot map, and
metadata that must never be formatted over (issue: trust).

Each case was a way to lose data or leave a pool unusable: a kill
between the pool's reload and resume, a data growth the metadata cannot
map, a device size the kernel refuses, a zeroed metadata superblock.
Witnesses: dmsetup (info, table, status), thin_dump, thin_repair, stat.
"""

import os
import signal
import subprocess

import pytest
from support import witness
from support.blockio import MiB, attach, read_at, write_at, write_pattern
from support.children import run_child

import libdm
from libdm.thin import capacity
from libdm.thin.store import Store

pytestmark = pytest.mark.kernel


def pool_is_healthy(pool_name, directory):
    """The pool itself, not only its devices: live, not suspended, no
    inactive table, read-write, no needs_check, and its table as long as
    whole data blocks of the data file."""
    attr = witness.info(pool_name)["attr"]
    assert attr[0] == "L" and attr[1] != "I" and attr[2] != "s", f"pool attr {attr}"
    fields = witness.pool_status(pool_name)
    assert fields[3] == "-" and fields[4] == "rw", fields  # held root, mode
    assert "needs_check" not in fields, fields
    table = witness.table(pool_name)[0].split()
    block = int(table[5])
    data = os.stat(os.path.join(directory, "data")).st_size // 512
    assert int(table[1]) == data // block * block, (table, data)
    meta = os.stat(os.path.join(directory, "metadata")).st_size // 4096
    assert int(fields[1].split("/")[1]) == meta, (fields, meta)  # metadata blocks


# -- a kill in the middle of a growth -------------------------------------------------

GROWTH = {
    "resize data": "p.resize(data_size='128M')\n",
    "resize metadata": "p.resize(metadata_size='4M')\n",
    "refresh": "p.refresh()\n",
    "low water mark": "p.set_low_water_mark(7)\n",
}
POINTS = ("grow:intent", "grow:backing", "grow:loaded", "grow:resumed")
CASES = (
    [("resize data", point) for point in (*POINTS, "grow:truncated")]
    + [("resize metadata", "grow:truncated")]
    + [(change, "grow:loaded") for change in GROWTH if change != "resize data"]
)


@pytest.mark.parametrize("change, point", CASES)
def test_a_kill_mid_growth_is_finished_by_open(dm_name, tmp_path, change, point):
    directory = tmp_path / "pool"
    name = dm_name("pool")
    pool = libdm.Pool.create_loop(name, directory, data_size="64M", metadata_size="2M")
    dev = pool.create_thin("vol", "16M")
    write_pattern(dev.path, 0x5A)
    pool.close()
    proc = run_child(directory, GROWTH[change], crash_at=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # it really died there
    if point == "grow:loaded":
        # The window of the defect: suspended with the new table loaded.
        assert witness.info(name)["attr"][:3] == "LIs"
    pool = libdm.Pool.open(directory)
    try:
        pool_is_healthy(pool.name, directory)
        store = Store(directory)
        try:
            assert store.growth_intent() is None
            config = store.pool().config.to_record()
        finally:
            store.close()
        # All or nothing, and the store agrees with the kernel.
        table = witness.table(pool.name)[0].split()
        assert int(table[1]) * 512 == config["data_size"]
        assert os.stat(directory / "metadata").st_size == config["metadata_size"]
        assert int(table[6]) == config["low_water_mark"]
        if change == "resize data" and point != "grow:intent":
            assert config["data_size"] == 128 * MiB  # the files grew: rolled forward
        assert read_at(pool.device("vol").path, 0, MiB) == bytes([0x5A]) * MiB
        pool.create_thin("after", "4M")
        assert witness.thin_ids(pool.name) == {0, 1}
    finally:
        pool.close()


def test_a_running_monitor_settles_a_growth_killed_with_the_pool_suspended(dm_name, tmp_path):
    """Another process's growth killed with the pool suspended: a monitor
    already watching settles it at its next check, instead of leaving
    every device's I/O blocked until someone's next change.  Found by an
    outside review."""
    directory = tmp_path / "pool"
    name = dm_name("pool")
    pool = libdm.Pool.create_loop(name, directory, data_size="64M", metadata_size="2M")
    try:
        dev = pool.create_thin("vol", "16M")
        write_pattern(dev.path, 0x3C)
        monitor = pool.monitor(95, 20)
        assert monitor.check() == []
        proc = run_child(directory, GROWTH["resize data"], crash_at="grow:loaded")
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert witness.info(name)["attr"][:3] == "LIs"
        monitor.check()
        assert witness.info(name)["attr"][:3] != "LIs"
        pool_is_healthy(name, directory)
        assert read_at(dev.path, 0, MiB) == bytes([0x3C]) * MiB
        assert pool.settle() is None  # nothing left
    finally:
        pool.close()


def test_open_refuses_a_pool_left_suspended_without_an_intent(dm_name, tmp_path):
    # A pool suspended with a table loaded by something libdm never
    # recorded (another program, or an older libdm killed mid-resize):
    # libdm cannot prove the table its own, so open leaves it and names
    # the state; once it is cleared and resumed, the pool opens.
    directory = tmp_path / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    pool.create_thin("vol", "8M")
    live = witness.table(pool.name)[0]
    pool.close()
    _start, length, rest = live.split(" ", 2)
    witness.dmsetup("suspend", "--noflush", pool.name)
    theirs = f"0 {int(length) // 2} {rest}"
    witness.dmsetup("reload", pool.name, "--table", theirs)
    assert witness.info(pool.name)["attr"][:3] == "LIs"
    with pytest.raises(libdm.StateError, match="suspended, carrying an inactive table"):
        libdm.Pool.open(directory)
    assert witness.info(pool.name)["attr"][:3] == "LIs"
    assert witness.table(pool.name, inactive=True)[0] == theirs
    witness.dmsetup("clear", pool.name)
    witness.dmsetup("resume", pool.name)
    pool = libdm.Pool.open(directory)
    try:
        pool_is_healthy(pool.name, directory)
        assert witness.table(pool.name)[0] == live
        pool.create_thin("after", "4M")
    finally:
        pool.close()


# -- data the metadata cannot map ------------------------------------------------------


@pytest.mark.parametrize("size", ["15T", "4T"])
def test_growing_data_past_what_the_metadata_maps_is_refused_first(dm_name, tmp_path, size):
    directory = tmp_path / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M", metadata_size="2M")
    try:
        dev = pool.create_thin("vol", "8M")
        write_pattern(dev.path, 0x33)
        before = witness.table(pool.name)
        with pytest.raises(libdm.PoolFullError, match="metadata must be at least") as err:
            pool.resize(data_size=size)
        assert "; Pool.resize(metadata_size=" in str(err.value)
        assert isinstance(err.value.remedy, libdm.RemedyCall)
        assert err.value.remedy.method == "resize"
        assert witness.table(pool.name) == before
        assert os.stat(directory / "data").st_size == 64 * MiB
        pool_is_healthy(pool.name, directory)
    finally:
        pool.close()
    # And after a reboot-like reopen, nothing is left half done.
    again = libdm.Pool.open(directory)
    try:
        pool_is_healthy(again.name, directory)
        assert read_at(again.device("vol").path, 0, MiB) == bytes([0x33]) * MiB
    finally:
        again.close()


def test_resize_with_the_metadata_it_needs_grows_the_metadata_first(tmp_path, make_pool):
    directory = tmp_path / "pool"
    pool = make_pool(directory=directory, data_size="64M", metadata_size="2M")
    with pytest.raises(libdm.PoolFullError) as err:
        pool.resize(data_size="4T")
    # The remedy is data: its call's arguments, not words to parse.
    remedy = err.value.remedy
    assert isinstance(remedy, libdm.RemedyCall) and remedy.method == "resize"
    want = dict(remedy.arguments)["metadata_size"]
    assert f"metadata must be at least {want}" in str(err.value)
    st = pool.resize(data_size="4T", metadata_size=want)
    assert int(st.total_data) == (4 << 40) // (64 << 10)
    assert st.mode == "rw" and not st.needs_check
    assert os.stat(directory / "metadata").st_size == libdm.parse_size(want)
    pool_is_healthy(pool.name, directory)
    pool.create_thin("vol", "8M")


def test_a_growth_the_kernel_refuses_anyway_is_rolled_back(tmp_path, monkeypatch, make_pool):
    # Past libdm's own check (switched off here), the kernel refuses the
    # resume with ENOSPC and flags the metadata needs_check: the pool must
    # come back exactly as it was, not suspended, read-write, checked.
    monkeypatch.setattr(capacity, "blocks_needed", lambda old, new: 0)
    directory = tmp_path / "pool"
    pool = make_pool(directory=directory, data_size="64M", metadata_size="2M")
    dev = pool.create_thin("vol", "8M")
    write_pattern(dev.path, 0x77)
    before = witness.table(pool.name)
    with pytest.raises(libdm.DMError) as err:
        pool.resize(data_size="1T")
    assert err.value.errno == 28  # ENOSPC, the kernel's own refusal
    assert witness.table(pool.name) == before
    assert os.stat(directory / "data").st_size == 64 * MiB
    pool_is_healthy(pool.name, directory)
    assert read_at(pool.device("vol").path, 0, MiB) == bytes([0x77]) * MiB
    store = Store(directory)
    try:
        assert store.growth_intent() is None
        assert store.pool().config.to_record()["data_size"] == 64 * MiB
    finally:
        store.close()
    pool.create_thin("after", "4M")


# -- sizes the kernel cannot map ---------------------------------------------------------


@pytest.mark.parametrize("size", ["16777216T", 2**63, 2**63 * 512])
def test_a_size_past_the_kernels_limit_is_refused_before_any_change(size, make_pool):
    pool = make_pool(data_size="64M")
    with pytest.raises(ValueError, match=r"too large|limit"):
        pool.create_thin("huge", size)
    assert pool.devices() == []
    assert witness.thin_ids(pool.name) == set()
    assert witness.transaction_id(pool.name) == 0


def test_the_largest_size_the_kernel_maps_works(make_pool):
    pool = make_pool(data_size="64M")
    dev = pool.create_thin("big", libdm.dm.target.MAX_SECTORS * 512)
    assert int(witness.table(dev.dm_name)[0].split()[1]) == libdm.dm.target.MAX_SECTORS


def test_a_table_the_kernel_refuses_is_undone(monkeypatch, make_pool):
    # The kernel refuses a thin table (here one naming a thin id the
    # metadata does not hold): the new device's thin id and record go
    # again, through the journal, and the pool is as before.
    from libdm.dm.target import Target
    from libdm.thin.core import PoolCore

    pool = make_pool(data_size="64M")
    monkeypatch.setattr(
        PoolCore,
        "thin_table",
        lambda self, row, devno: [Target(0, row.size, "thin", f"{devno} {row.thin_id + 1000}")],
    )
    with pytest.raises(libdm.DMError):
        pool.create_thin("refused", "4M")
    monkeypatch.undo()
    assert pool.devices() == []
    assert witness.thin_ids(pool.name) == set()
    store = Store(pool.directory)
    try:
        assert store.intents() == []
        assert store.transaction_id() == witness.transaction_id(pool.name)
    finally:
        store.close()
    pool.create_thin("ok", "4M")
    assert witness.thin_ids(pool.name) == {0}


def test_a_device_the_kernel_refuses_does_not_keep_the_others_down(dm_name, tmp_path):
    # A record an older libdm left behind: an active device whose size the
    # kernel refuses.  Open brings the pool and the other devices up and
    # names the bad one.
    directory = tmp_path / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    good = pool.create_thin("good", "8M")
    write_pattern(good.path, 0x11)
    pool.create_thin("bad", "8M")
    pool.destroy()  # every device down, files and store kept: a reboot
    store = Store(directory)
    try:
        with store.transaction():
            store.db.execute("UPDATE devices SET size = ? WHERE name = 'bad'", (1 << 55,))
    finally:
        store.close()
    pool = libdm.Pool.open(directory)
    try:
        assert set(pool.unavailable) == {"bad"}
        assert read_at(pool.device("good").path, 0, MiB) == bytes([0x11]) * MiB
        assert witness.info(f"{pool.name}-bad") is None
        pool_is_healthy(pool.name, directory)
        pool.device("bad").delete()
        assert witness.thin_ids(pool.name) == {0}
    finally:
        pool.close()


# -- metadata that must not be formatted over --------------------------------------------


def test_a_bad_magic_is_named_by_the_file_and_the_repair_command(dm_name, tmp_path):
    """The refusal names what lasts (the metadata file) and what to run,
    not the loop device attached for the check, which is gone after it."""
    directory = tmp_path / "pool"
    name = dm_name("pool")
    pool = libdm.Pool.create_loop(name, directory, data_size="64M")
    write_pattern(pool.create_thin("vol", "8M").path, 0x41)
    pool.destroy()  # a reboot: nothing live, files kept
    meta = directory / "metadata"
    write_at(meta, 32, b"\xff" * 8)  # the superblock's magic number
    loops_before = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    with pytest.raises(libdm.PoolFailedError, match="bad magic") as err:
        libdm.Pool.open(directory)
    said = str(err.value)
    assert str(meta) in said and "; Pool.repair() tries to recover it" in said, said
    assert err.value.remedy == libdm.RemedyCall(
        "repair", "tries to recover it and keeps the damaged copy", str(directory)
    )
    assert "/dev/loop" not in said, said
    assert witness.info(name) is None
    loops_after = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert loops_after == loops_before


def test_open_refuses_a_zeroed_superblock_of_a_used_pool(dm_name, tmp_path):
    directory = tmp_path / "pool"
    name = dm_name("pool")
    pool = libdm.Pool.create_loop(name, directory, data_size="64M")
    for n in range(3):
        write_pattern(pool.create_thin(f"vol{n}", "8M").path, 0x40 + n)
    pool.destroy()  # a reboot: nothing live, files kept
    meta = directory / "metadata"
    write_at(meta, 0, bytes(4096))
    with pytest.raises(libdm.PoolFailedError, match="thin_repair") as err:
        libdm.Pool.open(directory)
    assert "blank" in str(err.value)
    # The message carries what thin_repair needs to know of the pool.
    flags = str(err.value).split("thin_repair -i ")[1].split(" -o ")[0].split()[1:]
    assert flags == [
        "--transaction-id",
        "3",
        "--data-block-size",
        "128",
        "--nr-data-blocks",
        "1024",
    ]
    assert witness.info(name) is None  # no table was loaded
    # Nothing was formatted: thin_repair still finds all three devices.
    # (Through loop devices: the tools open with O_DIRECT.)
    source = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(meta)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = attach(tmp_path, "repaired", os.stat(meta).st_size)
    proc = subprocess.run(
        ["thin_repair", "-i", source, *flags, "-o", target], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run(["thin_dump", target], capture_output=True, text=True, check=True).stdout
    assert out.count("<device dev_id=") == 3


def test_a_blank_superblock_of_a_pool_never_used_is_formatted(dm_name, tmp_path):
    directory = tmp_path / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    pool.destroy()
    write_at(directory / "metadata", 0, bytes(4096))
    pool = libdm.Pool.open(directory)
    try:
        pool_is_healthy(pool.name, directory)
        pool.create_thin("vol", "4M")
    finally:
        pool.close()


def test_open_refuses_metadata_that_is_not_a_thin_superblock(dm_name, tmp_path):
    directory = tmp_path / "pool"
    name = dm_name("pool")
    pool = libdm.Pool.create_loop(name, directory, data_size="64M")
    pool.destroy()
    write_at(directory / "metadata", 0, b"not a superblock" * 256)
    with pytest.raises(libdm.PoolFailedError, match="superblock"):
        libdm.Pool.open(directory)
    assert witness.info(name) is None


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_mid_extend_of_a_block_pool_is_finished_by_open(dm_name, tmp_path, point):
    data = attach(tmp_path, "data.img", 64 * MiB)
    meta = attach(tmp_path, "meta.img", 4 * MiB)
    extra = attach(tmp_path, "extra.img", 64 * MiB)
    state = tmp_path / "state"
    name = dm_name("pool")
    pool = libdm.Pool.create(name, data, meta, state_dir=state)
    write_pattern(pool.create_thin("vol", "16M").path, 0x6B)
    pool.close()
    proc = run_child(state, f"p.extend({extra!r})\n", crash_at=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pool = libdm.Pool.open(state)
    try:
        attr = witness.info(name)["attr"]
        assert attr[1] != "I" and attr[2] != "s", attr
        fields = witness.pool_status(name)
        assert fields[4] == "rw" and "needs_check" not in fields, fields
        length = int(witness.table(name)[0].split()[1])
        tdata = sum(int(line.split()[1]) for line in witness.table(f"{name}-tdata"))
        store = Store(state)
        try:
            assert store.growth_intent() is None
            segments = store.pool().config.to_record()["data_segments"]
        finally:
            store.close()
        # All or nothing: the recorded segments are what the kernel maps.
        # Each device loses its first MiB to the pool's label.
        assert length == tdata == (126 if len(segments) == 2 else 63) * MiB // 512
        if point != "grow:intent":
            assert len(segments) == 2
        assert read_at(pool.device("vol").path, 0, MiB) == bytes([0x6B]) * MiB
        pool.create_thin("after", "4M")
    finally:
        pool.close()


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["data", "metadata"])
def test_a_file_cut_outside_libdm_is_named_at_open(make_pool, name):
    """A loop pool's file truncated while the pool was down: open refuses
    it naming the file and both sizes, instead of passing on the kernel's
    notice about discard passdown as the reason."""
    pool = make_pool(data_size="64M")
    directory = pool.directory
    pool.destroy()
    path = os.path.join(directory, name)
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(libdm.StateError, match=f"{name} file .* is .*shorter than"):
        libdm.Pool.open(directory)
