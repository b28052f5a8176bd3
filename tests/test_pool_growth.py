"""Growing pools online: data and metadata, with devices mounted and busy."""

import hashlib
import os
import threading

import pytest
from support import witness

import libdm

pytestmark = pytest.mark.kernel


@pytest.fixture
def pool(make_pool):
    return make_pool(data_size="64M", metadata_size="2M")


def sha(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_resize_data_while_a_device_is_mounted_and_written(pool):
    dev = pool.create_thin("vol", "256M").format("ext4")
    with dev.mount() as root:
        files = {}
        stop = threading.Event()
        errors = []

        def writer():
            n = 0
            try:
                while not stop.is_set() and n < 40:
                    path = os.path.join(root, f"f{n}")
                    with open(path, "wb") as fh:
                        fh.write(os.urandom(256 << 10))
                        fh.flush()
                        os.fsync(fh.fileno())
                    files[path] = sha(path)
                    n += 1
            except OSError as exc:
                errors.append(exc)

        t = threading.Thread(target=writer)
        t.start()
        st = pool.resize(data_size="128M")
        stop.set()
        t.join()
        assert errors == []
        assert int(st.total_data) == 2048  # 128 MiB / 64 KiB
        for path, digest in files.items():
            assert sha(path) == digest
    fields = witness.table(pool.name)[0].split()
    assert fields[1] == str(128 << 11)
    assert os.stat(os.path.join(pool.directory, "data")).st_size == 128 << 20
    assert witness.pool_status(pool.name)[2].endswith("/2048")
    assert dev.active and witness.sysfs(dev.dm_name, "suspended") == "0"
    # The stored size follows, so a reopen loads the grown pool.
    again = libdm.Pool.open(pool.directory)
    try:
        assert again.info().data_total == 128 << 20
    finally:
        again.close()


def test_resize_metadata_is_picked_up_on_reload(pool):
    before = int(witness.pool_status(pool.name)[1].split("/")[1])
    pool.resize(metadata_size="8M")
    after = int(witness.pool_status(pool.name)[1].split("/")[1])
    assert before == 512 and after == 2048  # 4 KiB metadata blocks


def test_resize_rounds_down_to_whole_data_blocks(pool):
    pool.resize(data_size=(64 << 20) + (64 << 10) + 4096)  # one block and a bit
    assert witness.table(pool.name)[0].split()[1] == str((64 << 11) + 128)


def test_shrink_is_refused_and_nothing_changes(pool):
    with pytest.raises(ValueError, match="cannot shrink: it is 64 MiB, asked 32 MiB"):
        pool.resize(data_size="32M")
    with pytest.raises(ValueError, match="metadata cannot shrink"):
        pool.resize(metadata_size=1 << 20)
    assert witness.table(pool.name)[0].split()[1] == str(64 << 11)
    assert os.stat(os.path.join(pool.directory, "data")).st_size == 64 << 20


def test_resize_brings_an_out_of_space_pool_back(tmp_path, make_pool):
    p = make_pool(directory=tmp_path / "p", data_size="16M", min_free_space=0)
    dev = p.create_thin("vol", "64M")
    done = []

    def fill():
        # Queues in the kernel once the pool is full (queue_if_no_space)
        # and completes after the resize.
        fd = os.open(dev.path, os.O_WRONLY)
        try:
            for i in range(24):
                os.pwrite(fd, bytes([i]) * (1 << 20), i << 20)
            os.fsync(fd)
            done.append(True)
        finally:
            os.close(fd)

    t = threading.Thread(target=fill)
    t.start()
    for _ in range(600):
        if p.status().mode == "out_of_data_space":
            break
        t.join(0.05)
    assert p.status().mode == "out_of_data_space"
    p.resize(data_size="64M")
    t.join(120)
    assert done == [True]
    assert p.status().mode == "rw"
    with open(dev.path, "rb") as fh:
        fh.seek(23 << 20)
        assert fh.read(1 << 20) == bytes([23]) * (1 << 20)


def test_set_low_water_mark_reaches_the_table(pool):
    pool.set_low_water_mark(100)
    assert witness.table(pool.name)[0].split()[6] == "100"
    again = libdm.Pool.open(pool.directory)  # the live table matches the store
    again.close()
