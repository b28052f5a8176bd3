"""libdm acts only on device-mapper devices it can prove it made.

A pool's device ``x`` is the device-mapper name ``<pool>-x``, so pool
``a``'s device ``b-x`` and pool ``a-b``'s device ``x`` share a name, and
anyone may ``dmsetup create`` a device called like one of ours.  Whatever
a pool does (delete, resize, format, mount, activate, deactivate,
snapshot, destroy, open), a device it did not make keeps its table, uuid
and contents, and a refusal names it and its owner.

Witnesses: dmsetup (info, table), SHA-256 of the contents, thin_dump's
thin ids, the state store read directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from support import witness
from support.blockio import MiB, attach, read_at, write_pattern

import libdm
from libdm.thin.store import Store

pytestmark = pytest.mark.kernel


class Seen(NamedTuple):
    """A device as the witnesses see it: what must not change."""

    uuid: str
    devno: tuple[int, int]
    table: list[str]
    checksum: str


def seen(dm_name: str) -> Seen:
    info = witness.info(dm_name)
    assert info is not None, f"{dm_name} is gone"
    assert info["attr"][2] != "s", f"{dm_name} is left suspended"
    return Seen(
        info["uuid"],
        (info["major"], info["minor"]),
        witness.table(dm_name),
        witness.checksum(f"/dev/mapper/{dm_name}"),
    )


def store_row(directory: str, name: str):
    store = Store(directory)
    try:
        return store.device(name)
    finally:
        store.close()


# -- two libdm pools whose names collide: a's "b-x" and a-b's "x" --------------


class Crowd(NamedTuple):
    a: libdm.Pool
    ab: libdm.Pool
    theirs: str  # a-b's device x, the device-mapper name a's b-x would have


@pytest.fixture
def crowd(make_pool) -> Crowd:
    """Pool ``a`` with an inactive device ``b-x`` holding data, and pool
    ``a-b`` with a live device ``x`` holding other data."""
    a = make_pool(name="a", data_size="128M")
    mine = a.create_thin("b-x", "16M")
    write_pattern(mine.path, 0xA1, 0, 4 * MiB)
    mine.deactivate()
    ab = make_pool(name="a-b", data_size="128M")
    assert ab.name == f"{a.name}-b"
    theirs = ab.create_thin("x", "16M")
    write_pattern(theirs.path, 0x5B, 0, 8 * MiB)
    assert theirs.dm_name == mine.dm_name
    return Crowd(a, ab, theirs.dm_name)


def refusal_names_the_owner(exc: BaseException, crowd: Crowd) -> None:
    assert isinstance(exc, libdm.StateError)
    text = str(exc)
    assert crowd.theirs in text
    assert f"pool {crowd.ab.name!r}" in text, text  # its owner


def test_delete_refuses_another_pools_device(crowd):
    before = seen(crowd.theirs)
    ids = witness.thin_ids(crowd.a.name)
    with pytest.raises(libdm.ForeignDeviceError) as caught:
        crowd.a.device("b-x").delete()
    refusal_names_the_owner(caught.value, crowd)
    assert seen(crowd.theirs) == before
    # Nothing of a's was lost either: record and thin id are there.
    assert witness.thin_ids(crowd.a.name) == ids
    assert store_row(crowd.a.directory, "b-x") is not None


@pytest.mark.parametrize(("size", "force"), [("32M", False), ("4M", True)])
def test_resize_refuses_another_pools_device(crowd, size, force):
    before = seen(crowd.theirs)
    with pytest.raises(libdm.ForeignDeviceError) as caught:
        crowd.a.device("b-x").resize(size, force=force)
    refusal_names_the_owner(caught.value, crowd)
    assert seen(crowd.theirs) == before
    assert store_row(crowd.a.directory, "b-x")["size"] == 16 * MiB // 512


def test_format_and_mount_refuse_another_pools_device(crowd, tmp_path):
    before = seen(crowd.theirs)
    mine = crowd.a.device("b-x")
    assert not mine.active  # a's b-x is not live: the live device is a-b's
    with pytest.raises(libdm.ForeignDeviceError) as caught:
        mine.format("ext4")
    refusal_names_the_owner(caught.value, crowd)
    point = tmp_path / "mnt"
    point.mkdir()
    with pytest.raises(libdm.ForeignDeviceError), mine.mount(str(point)):
        pass
    assert not os.path.ismount(point)
    assert seen(crowd.theirs) == before


def test_activate_and_deactivate_refuse_another_pools_device(crowd):
    before = seen(crowd.theirs)
    with pytest.raises(libdm.ForeignDeviceError) as caught:
        crowd.a.device("b-x").activate()
    refusal_names_the_owner(caught.value, crowd)
    with pytest.raises(libdm.ForeignDeviceError) as caught:
        crowd.a.device("b-x").deactivate()
    refusal_names_the_owner(caught.value, crowd)
    assert seen(crowd.theirs) == before
    assert not store_row(crowd.a.directory, "b-x")["active"]


def test_a_snapshot_refuses_another_pools_device_and_never_resumes_it(crowd):
    before = seen(crowd.theirs)
    witness.dmsetup("suspend", crowd.theirs)  # its owner is in the middle of a change
    try:
        with pytest.raises(libdm.ForeignDeviceError) as caught:
            crowd.a.device("b-x").snapshot("s")
        refusal_names_the_owner(caught.value, crowd)
        assert witness.info(crowd.theirs)["attr"][2] == "s"  # as its owner left it
    finally:
        witness.dmsetup("resume", crowd.theirs)
    assert seen(crowd.theirs) == before
    assert store_row(crowd.a.directory, "s") is None


def test_destroy_leaves_another_pools_device_alone(crowd):
    before = seen(crowd.theirs)
    a_name = crowd.a.name
    crowd.a.destroy()
    assert a_name not in witness.names()
    assert seen(crowd.theirs) == before


def test_open_neither_adopts_nor_touches_another_pools_device(crowd):
    before = seen(crowd.theirs)
    directory = crowd.a.directory
    crowd.a.close()
    pool = libdm.Pool.open(directory)
    try:
        assert not store_row(directory, "b-x")["active"]
        assert pool.unavailable == {}
    finally:
        pool.close()
    assert seen(crowd.theirs) == before


def test_open_reports_an_active_device_whose_name_another_pool_holds(make_pool):
    a = make_pool(name="a", data_size="128M")
    write_pattern(a.create_thin("b-x", "16M").path, 0xA1, 0, MiB)
    a.close()
    # a's b-x is recorded active but went down (by hand, say); then a-b's
    # x takes the name.
    witness.dmsetup("remove", f"{a.name}-b-x")
    ab = make_pool(name="a-b", data_size="128M")
    theirs = ab.create_thin("x", "16M")
    write_pattern(theirs.path, 0x5B, 0, MiB)
    before = seen(theirs.dm_name)
    pool = libdm.Pool.open(a.directory)
    try:
        assert set(pool.unavailable) == {"b-x"}
        assert theirs.dm_name in pool.unavailable["b-x"]
        assert f"pool {ab.name!r}" in pool.unavailable["b-x"]
    finally:
        pool.close()
    assert seen(theirs.dm_name) == before


def test_a_name_in_another_live_pools_namespace_is_refused_at_creation(make_pool):
    a = make_pool(name="a", data_size="128M")
    ab = make_pool(name="a-b", data_size="128M")
    with pytest.raises(libdm.DeviceExistsError) as caught:
        a.create_thin("b-y", "16M")
    assert f"pool {ab.name!r}" in str(caught.value)
    assert f"{ab.name}-y" not in witness.names()
    assert store_row(a.directory, "b-y") is None
    assert witness.thin_ids(a.name) == set()


# -- a plain device-mapper device, made by someone else, called like ours -------


def foreign_linear(
    tmp_path: Path, dm_name: str, *, uuid: str | None = None, size: int = 16 * MiB
) -> str:
    """``dmsetup create dm_name`` with a linear table over a loop device
    holding a pattern; returns the name."""
    loop = attach(tmp_path, f"foreign-{len(os.listdir(tmp_path))}", size)
    write_pattern(loop, 0x3C, 0, size)
    args = ["create", dm_name, "--table", f"0 {size // 512} linear {loop} 0"]
    if uuid is not None:
        args += ["--uuid", uuid]
    witness.dmsetup(*args)
    witness.dmsetup("mknodes", dm_name)  # no udev in the test kernel
    return dm_name


@pytest.fixture
def inactive_x(make_pool) -> libdm.Pool:
    """A pool whose device ``x`` holds data and is inactive."""
    pool = make_pool(name="p", data_size="128M")
    dev = pool.create_thin("x", "16M")
    write_pattern(dev.path, 0xA1, 0, 4 * MiB)
    dev.deactivate()
    return pool


OPERATIONS: dict[str, Callable[[libdm.Pool], object]] = {
    "delete": lambda pool: pool.device("x").delete(),
    "grow": lambda pool: pool.device("x").resize("32M"),
    "shrink": lambda pool: pool.device("x").resize("4M", force=True),
    "format": lambda pool: pool.device("x").format("ext4"),
    "activate": lambda pool: pool.device("x").activate(),
    "deactivate": lambda pool: pool.device("x").deactivate(),
}


@pytest.mark.parametrize("uuid", [None, "SOMEONE-ELSE-1"])
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_a_device_made_by_someone_else_is_refused(inactive_x, tmp_path, operation, uuid):
    theirs = foreign_linear(tmp_path, f"{inactive_x.name}-x", uuid=uuid)
    before = seen(theirs)
    with pytest.raises(libdm.ForeignDeviceError) as caught:
        OPERATIONS[operation](inactive_x)
    text = str(caught.value)
    assert theirs in text
    assert "not made by libdm" in text
    if uuid is not None:
        assert uuid in text
    assert seen(theirs) == before


def test_destroy_and_open_leave_a_device_made_by_someone_else(inactive_x, tmp_path):
    theirs = foreign_linear(tmp_path, f"{inactive_x.name}-x")
    before = seen(theirs)
    directory = inactive_x.directory
    inactive_x.close()
    pool = libdm.Pool.open(directory)
    try:
        assert not store_row(directory, "x")["active"]  # not recorded as its own
    finally:
        pool.close()
    assert seen(theirs) == before
    libdm.Pool.load(directory).destroy()
    assert seen(theirs) == before
    # Once the name is free again, the pool's own device comes back whole.
    witness.dmsetup("remove", theirs)
    pool = libdm.Pool.open(directory)
    try:
        assert read_at(pool.device("x").activate().path, 0, 4 * MiB) == b"\xa1" * (4 * MiB)
    finally:
        pool.close()


def test_open_does_not_record_a_foreign_device_as_active(inactive_x, tmp_path, caplog):
    theirs = foreign_linear(tmp_path, f"{inactive_x.name}-x", uuid="SOMEONE-ELSE-2")
    directory = inactive_x.directory
    inactive_x.close()
    with caplog.at_level(logging.WARNING, logger="libdm"):
        libdm.Pool.open(directory).close()
    assert not store_row(directory, "x")["active"]
    assert any(theirs in r.getMessage() for r in caplog.records), caplog.text


# -- the pool device itself ------------------------------------------------------


def test_open_and_destroy_refuse_a_foreign_device_in_the_pools_name(make_pool, tmp_path):
    pool = make_pool(name="p", data_size="64M")
    name, directory = pool.name, pool.directory
    pool.destroy()
    theirs = foreign_linear(tmp_path, name)
    before = seen(theirs)
    with pytest.raises(libdm.ForeignDeviceError) as caught:
        libdm.Pool.open(directory)
    assert name in str(caught.value) and "not made by libdm" in str(caught.value)
    libdm.Pool.load(directory).destroy()
    assert seen(theirs) == before


def test_a_pool_of_the_same_name_from_another_directory_is_not_ours(make_pool, tmp_path):
    first = make_pool(name="p", data_size="64M")
    write_pattern(first.create_thin("x", "16M").path, 0xA1, 0, MiB)
    name, directory = first.name, first.directory
    first.destroy()
    other = libdm.Pool.create_loop(name, tmp_path / "other", data_size="64M")
    try:
        write_pattern(other.create_thin("x", "16M").path, 0x5B, 0, MiB)
        before = {dm: seen(dm) for dm in (f"{name}-x",)}
        pool_table = witness.table(name)
        with pytest.raises(libdm.ForeignDeviceError) as caught:
            libdm.Pool.open(directory)
        assert "another libdm pool" in str(caught.value)
        libdm.Pool.load(directory).destroy()
        assert {dm: seen(dm) for dm in before} == before
        assert witness.table(name) == pool_table
    finally:
        other.close()
