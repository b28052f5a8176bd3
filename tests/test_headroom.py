"""The headroom a split device leaves free is usable: extend() takes the
free tail of a device the pool already sits on, and the monitor grows a
block pool's data and metadata into it, or onto spares, with no callback
(as LVM's autoextend takes from the volume group).

Witnesses: dmsetup table of the pool and its -tdata/-tmeta pieces, and
the pool's status.
"""

import pytest
from support import witness
from support.blockio import MiB, attach, devno, read_at, write_pattern

import libdm

pytestmark = pytest.mark.kernel


def sectors(line):
    return int(line.split()[1])


@pytest.fixture
def split_pool(dm_name, tmp_path):
    device = attach(tmp_path, "disk.img", 200 * MiB)
    pool = libdm.Pool.create_on_device(
        dm_name("pool"),
        device,
        thinp_percent=60,
        thinp_metapercent=2,
        state_dir=tmp_path / "state",
        min_free_space=0,
    )
    yield pool, device
    pool.close()


def test_extend_takes_the_free_tail_of_the_split_device(split_pool):
    # growing.rst: create_on_device leaves the rest free "for growing later".
    pool, device = split_pool
    dev = pool.create_thin("vol", "256M")
    write_pattern(dev.path, 0x44, length=4 * MiB)
    ((path, start, free),) = pool.free_regions()
    tdata = witness.table(f"{pool.name}-tdata")
    assert path == device and len(tdata) == 1
    data_start = int(tdata[0].split()[-1])
    assert int(start) == data_start + sectors(tdata[0])
    assert int(start) + int(free) == 200 * MiB // 512
    pool.extend(device)
    tdata = witness.table(f"{pool.name}-tdata")
    # One segment, lengthened to the end of the device.
    assert tdata == [f"0 {200 * MiB // 512 - data_start} linear {devno(device)} {data_start}"]
    grown = (200 * MiB // 512 - data_start) // 128 * 128
    assert sectors(witness.table(pool.name)[0]) == grown
    assert pool.free_regions() == []
    assert read_at(dev.path, 0, MiB) == b"\x44" * MiB
    with pytest.raises(libdm.RefusedError, match="already part of pool"):
        pool.extend(device, start=0, length="1M")


def test_a_region_of_the_tail_and_a_clash(split_pool):
    pool, device = split_pool
    ((_, start, _free),) = pool.free_regions()
    with pytest.raises(libdm.RefusedError, match=r"already part of pool .* in sectors"):
        pool.extend(device, start=int(start.bytes()) - 4096, length="8M")
    st = pool.extend(device, metadata=True, start=int(start.bytes()), length="4M")
    tmeta = witness.table(f"{pool.name}-tmeta")
    assert len(tmeta) == 2 and tmeta[1].endswith(f"{devno(device)} {int(start)}")
    assert int(st.total_meta) == sum(sectors(line) for line in tmeta) // 8
    ((_, rest, _),) = pool.free_regions()
    assert int(rest) == int(start) + 4 * MiB // 512


def test_the_monitor_grows_data_and_metadata_into_the_tail(split_pool):
    pool, _device = split_pool
    dev = pool.create_thin("vol", "256M")
    total = int(pool.status().total_data)
    write_pattern(dev.path, 0x45, length=(total * 9 // 10) * (64 << 10))
    monitor = pool.monitor(threshold=80, percent=20, metadata_threshold=1)
    steps = monitor.check()
    assert [(s.part, s.ok) for s in steps] == [("data", True), ("metadata", True)], steps
    assert int(pool.status().total_data) > total
    assert len(witness.table(f"{pool.name}-tdata")) == 1  # the tail lengthened it
    assert len(witness.table(f"{pool.name}-tmeta")) == 2
    assert pool.status().mode == "rw"


def test_the_monitor_grows_metadata_onto_a_spare(tmp_path, make_pool):
    data, meta = attach(tmp_path, "d", 64 * MiB), attach(tmp_path, "m", 4 * MiB)
    spare = attach(tmp_path, "s", 8 * MiB)
    pool = make_pool(data, meta)
    monitor = pool.monitor(threshold=90, metadata_threshold=1, spares=[spare])
    steps = monitor.check()
    assert [(s.part, s.ok) for s in steps] == [("metadata", True)]
    tmeta = witness.table(f"{pool.name}-tmeta")
    assert tmeta[-1].split()[3] == devno(spare)
    assert monitor.spares == []
