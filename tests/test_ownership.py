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
from typing import Any, ClassVar, NamedTuple

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support import witness
from support.blockio import MiB, attach, read_at, write_pattern
from support.cli import run_cli

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
    table = witness.table(dm_name)
    # A pool device's contents are its thin devices', checked through them.
    pool = any(" thin-pool " in line for line in table)
    return Seen(
        info["uuid"],
        (info["major"], info["minor"]),
        table,
        "" if pool else witness.checksum(f"/dev/mapper/{dm_name}"),
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
    assert store_row(crowd.a.directory, "b-x").size == libdm.Bytes(16 * MiB).sectors()


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
    # It changed nothing, so it leaves nothing for the next change to settle.
    store = Store(crowd.a.directory)
    try:
        assert store.activation_intent() is None
    finally:
        store.close()
    with pytest.raises(libdm.ForeignDeviceError) as caught:
        crowd.a.device("b-x").deactivate()
    refusal_names_the_owner(caught.value, crowd)
    assert seen(crowd.theirs) == before
    assert not store_row(crowd.a.directory, "b-x").active


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
        assert not store_row(directory, "b-x").active
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
        assert theirs.dm_name in str(pool.unavailable["b-x"])
        assert f"pool {ab.name!r}" in str(pool.unavailable["b-x"])
    finally:
        pool.close()
    assert seen(theirs.dm_name) == before
    # The command says to free the name, not to delete the pool's device
    # (and its data) for a name only in the way.
    said = run_cli("pool", "open", a.directory)
    assert said.returncode == 1
    assert f"libdm thin activate b-x --pool {a.directory}" in said.stderr, said.stderr
    assert "thin delete" not in said.stderr, said.stderr
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
        assert not store_row(directory, "x").active  # not recorded as its own
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
    assert not store_row(directory, "x").active
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


# -- a crowded namespace, at random ---------------------------------------------


SLOTS = {"a": ("b-x", "b-y", "z"), "ab": ("x", "y", "w")}
REFUSED = (libdm.ForeignDeviceError, libdm.DeviceExistsError)


class CrowdedNamespace(RuleBasedStateMachine):
    """Pools ``a`` and ``a-b`` whose device names collide (a's ``b-x`` and
    a-b's ``x``), beside two devices made by someone else (``a-z`` with no
    uuid, ``a-b-w`` with a foreign uuid), in names each pool also uses.
    Each step is one pool's: create, activate, deactivate, delete, grow,
    shrink, snapshot, or taking the pool down and opening it again.  After
    it, every device the acting pool did not make is exactly as it was
    (uuid, device number, table, contents), and every live device of a
    pool holds what was written to it."""

    context: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        super().__init__()
        ctx = self.context
        base = ctx["dm_name"]("crowd")
        root = ctx["tmp_path"] / base
        root.mkdir()
        self.base = base
        self.root = root
        self.dirs = {"a": root / "a", "ab": root / "ab"}
        self.names = {"a": f"{base}-a", "ab": f"{base}-a-b"}
        self.data: dict[tuple[str, str], int] = {}  # what each device's first 64 KiB holds
        self.next_byte = 1
        self.pools: dict[str, libdm.Pool | None] = {}
        # The crowd to start from: a's b-x and z hold data and are
        # inactive; then a-b's x takes the name a-b-x, and someone else
        # takes a-z; a-b's w is inactive and someone else has a-b-w.
        a = self.pools["a"] = self.make("a")
        for name in ("b-x", "z"):
            self.new_device("a", a, name)
            a.device(name).deactivate()
        ab = self.pools["ab"] = self.make("ab")
        for name in ("x", "w"):
            self.new_device("ab", ab, name)
        ab.device("w").deactivate()
        self.tokens = {key: pool.config.token for key, pool in self.pools.items() if pool}
        self.uuids = {key: pool.uuid for key, pool in self.pools.items() if pool}
        self.foreign = {f"{self.names['a']}-z": None, f"{self.names['ab']}-w": f"SOMEONE-{base}"}
        for name, uuid in self.foreign.items():
            foreign_linear(root, name, uuid=uuid, size=MiB)

    def make(self, key: str) -> libdm.Pool:
        return libdm.Pool.create_loop(self.names[key], self.dirs[key], data_size="64M")

    def new_device(self, key: str, pool: libdm.Pool, name: str) -> None:
        dev = pool.create_thin(name, "1M")
        byte = self.next_byte
        self.next_byte = self.next_byte % 250 + 1
        write_pattern(dev.path, byte, 0, 1 << 16)
        self.data[key, name] = byte

    # -- the witnesses ---------------------------------------------------------

    def owner(self, uuid: str) -> str | None:
        for key in ("a", "ab"):
            if uuid == self.uuids[key] or uuid.startswith(f"LIBDM-THIN-{self.tokens[key]}-"):
                return key
        return None

    def everything(self) -> dict[str, Seen]:
        """Every device of this example, from one dmsetup info and one
        dmsetup table (a process each, slow in the test kernel)."""
        infos, tables = witness.infos(), witness.tables()
        out = {}
        for name, info in infos.items():
            if not name.startswith(f"{self.base}-"):
                continue
            assert info["attr"][2] != "s", f"{name} is left suspended"
            table = tables.get(name, [])
            pool = any(" thin-pool " in line for line in table)
            out[name] = Seen(
                info["uuid"],
                (info["major"], info["minor"]),
                table,
                "" if pool else witness.checksum(f"/dev/mapper/{name}"),
            )
        return out

    def step(self, key: str, action: Callable[[libdm.Pool], None]) -> None:
        pool = self.pools[key]
        assert pool is not None
        before = self.everything()
        try:
            action(pool)
        except REFUSED as exc:
            assert exc.device is not None and exc.device in str(exc)
        after = self.everything()
        for name, was in before.items():
            if self.owner(was.uuid) != key:
                assert after.get(name) == was, f"{key} touched {name}"
        for name, now in after.items():
            assert name in before or self.owner(now.uuid) == key, f"{key} made {name}"

    @invariant()
    def live_devices_hold_their_data(self) -> None:
        infos = witness.infos()
        for (key, name), byte in self.data.items():
            dm = f"{self.names[key]}-{name}"
            info = infos.get(dm)
            if info is not None and self.owner(info["uuid"]) == key:
                assert read_at(f"/dev/mapper/{dm}", 0, 1 << 16) == bytes([byte]) * (1 << 16)

    # -- the steps -------------------------------------------------------------

    @precondition(lambda self: any(self.pools.values()))
    @rule(which=st.sampled_from(["a", "ab"]), slot=st.integers(0, 2))
    def create(self, which: str, slot: int) -> None:
        key = which if self.pools[which] else ("ab" if which == "a" else "a")
        name = SLOTS[key][slot]

        def act(pool: libdm.Pool) -> None:
            if (key, name) not in self.data:
                self.new_device(key, pool, name)

        self.step(key, act)

    def on_existing(self, which: str, slot: int, act: Callable[[libdm.ThinDevice], object]):
        key = which if self.pools[which] else ("ab" if which == "a" else "a")
        name = SLOTS[key][slot]
        if (key, name) not in self.data:
            return
        self.step(key, lambda pool: act(pool.device(name)))

    @precondition(lambda self: any(self.pools.values()))
    @rule(which=st.sampled_from(["a", "ab"]), slot=st.integers(0, 2))
    def activate(self, which: str, slot: int) -> None:
        self.on_existing(which, slot, lambda dev: dev.activate())

    @precondition(lambda self: any(self.pools.values()))
    @rule(which=st.sampled_from(["a", "ab"]), slot=st.integers(0, 2))
    def deactivate(self, which: str, slot: int) -> None:
        self.on_existing(which, slot, lambda dev: dev.deactivate())

    @precondition(lambda self: any(self.pools.values()))
    @rule(which=st.sampled_from(["a", "ab"]), slot=st.integers(0, 2), grow=st.booleans())
    def resize(self, which: str, slot: int, grow: bool) -> None:
        self.on_existing(
            which, slot, lambda dev: dev.resize("2M" if grow else "512K", force=not grow)
        )

    @precondition(lambda self: any(self.pools.values()))
    @rule(which=st.sampled_from(["a", "ab"]), slot=st.integers(0, 2))
    def delete(self, which: str, slot: int) -> None:
        key = which if self.pools[which] else ("ab" if which == "a" else "a")
        name = SLOTS[key][slot]

        def act(dev: libdm.ThinDevice) -> None:
            dev.delete()
            del self.data[key, name]

        self.on_existing(which, slot, act)

    @precondition(lambda self: any(self.pools.values()))
    @rule(which=st.sampled_from(["a", "ab"]), slot=st.integers(0, 2), to=st.integers(0, 2))
    def snapshot(self, which: str, slot: int, to: int) -> None:
        key = which if self.pools[which] else ("ab" if which == "a" else "a")
        name, origin = SLOTS[key][to], SLOTS[key][slot]
        if (key, name) in self.data:
            return

        def act(dev: libdm.ThinDevice) -> None:
            dev.snapshot(name)
            self.data[key, name] = self.data[key, origin]

        self.on_existing(which, slot, act)

    @rule(which=st.sampled_from(["z", "w"]))
    def someone_else_takes_or_frees_a_name(self, which: str) -> None:
        """Someone else removes their device, or makes it again if the
        name is free (nothing of libdm's may change)."""
        name = next(n for n in self.foreign if n.endswith(f"-{which}"))
        before = self.everything()
        if name in before:
            witness.dmsetup("remove", name)
            del before[name]
        elif witness.info(name) is None:
            foreign_linear(self.root, name, uuid=self.foreign[name], size=MiB)
        after = self.everything()
        assert {n: v for n, v in after.items() if n != name} == before

    @rule(which=st.sampled_from(["a", "ab"]))
    def down_or_up(self, which: str) -> None:
        pool = self.pools[which]
        if pool is None:
            self.pools[which] = libdm.Pool.load(self.dirs[which])
            self.step(which, lambda loaded: self.reopen(which, loaded))
        else:
            self.step(which, lambda pool: pool.destroy())
            self.pools[which] = None

    def reopen(self, which: str, loaded: libdm.Pool) -> None:
        loaded.close()
        self.pools[which] = libdm.Pool.open(self.dirs[which])

    def teardown(self) -> None:
        for pool in self.pools.values():
            if pool is not None:
                pool.close()


def test_a_crowded_namespace_at_random(dm_name, tmp_path):
    CrowdedNamespace.context = {"dm_name": dm_name, "tmp_path": tmp_path}
    run_state_machine_as_test(
        CrowdedNamespace,
        settings=settings(
            max_examples=2,
            stateful_step_count=15,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=(Phase.explicit, Phase.generate),
        ),
    )


# -- the pool's own files --------------------------------------------------------


@pytest.mark.parametrize("replaced", ["data", "metadata"])
def test_destroy_remove_files_leaves_a_file_that_is_not_the_pools(make_pool, tmp_path, replaced):
    pool = make_pool(name="p", data_size="64M")
    directory = Path(pool.directory)
    pool.destroy()
    # Someone moves the pool's file away and puts another in its place.
    os.rename(directory / replaced, tmp_path / f"{replaced}.moved")
    theirs = directory / replaced
    theirs.write_bytes(os.urandom(MiB))
    theirs.chmod(0o600)
    contents = theirs.read_bytes()
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.load(directory).destroy(remove_files=True)
    assert str(theirs) in str(caught.value) and "not the pool's" in str(caught.value)
    assert theirs.read_bytes() == contents
    assert directory.is_dir()


def test_adopt_refuses_another_libdm_pool(make_pool, tmp_path):
    owner = make_pool(name="p", data_size="64M")
    before = seen(owner.name)
    with pytest.raises(libdm.ForeignDeviceError) as caught:
        libdm.Pool.adopt(owner.name, state_dir=tmp_path / "other")
    message = str(caught.value)
    assert owner.name in message and owner.uuid in message
    assert os.path.realpath(owner.directory) in message  # the directory that owns it
    assert not (tmp_path / "other").exists()
    assert seen(owner.name) == before
    # The owner's transactions are its own still.
    owner.create_thin("x", "8M")
    assert witness.info(f"{owner.name}-x") is not None


def test_a_pool_named_control_is_refused(tmp_path):
    # /dev/mapper/control is device-mapper's own control node, never a pool.
    node = os.stat("/dev/mapper/control")
    with pytest.raises(ValueError, match="/dev/mapper/control"):
        libdm.Pool.create_loop("control", tmp_path / "p", data_size="64M")
    assert not (tmp_path / "p").exists()
    assert witness.info("control") is None
    with pytest.raises(ValueError, match="/dev/mapper/control"):
        libdm.Pool.adopt("control", state_dir=tmp_path / "adopted")
    assert not (tmp_path / "adopted").exists()
    assert os.stat("/dev/mapper/control").st_rdev == node.st_rdev


@pytest.mark.parametrize("op", ["create_thin", "snapshot"])
def test_a_create_that_loses_its_name_to_another_program_leaves_nothing(
    make_pool, monkeypatch, op
):
    """Another program takes the new device's name after libdm checked it
    free and before its activation: the create fails, its thin id and
    record go again, and the other program's device is left alone.
    Found by an outside review."""
    from libdm.dm import ops

    pool = make_pool(data_size="64M")
    origin = pool.create_thin("a", "4M")
    target = pool.device_dm_name("r")
    real = ops.create

    def racing(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == target and witness.info(name) is None:
            witness.dmsetup("create", name, "--table", "0 8 zero")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ops, "create", racing)
    with pytest.raises(libdm.DMError) as caught:
        if op == "create_thin":
            pool.create_thin("r", "4M")
        else:
            origin.snapshot("r")
    assert target in str(caught.value)
    assert [d.name for d in pool.devices()] == ["a"]
    assert witness.thin_ids(pool.name) == {origin.thin_id}
    assert witness.table(target) == ["0 8 zero"]
    witness.dmsetup("remove", target)
    monkeypatch.undo()
    # The name free again, the create works.
    assert pool.create_thin("r", "4M").active


# -- files other programs put where a device's node goes -------------------------------


def test_no_node_is_made_over_another_programs_file(make_pool, tmp_path):
    """libdevmapper replaces a symlink or another block device's node at
    /dev/mapper/<name> when it makes the node, and quietly leaves a
    regular file, so that the path reported is not the device.  libdm
    refuses instead, naming what is there, and leaves it; a refused
    create leaves no thin id behind."""
    pool = make_pool(data_size="64M")
    a = pool.create_thin("a", "8M")
    ids = witness.thin_ids(pool.name)
    b_path = f"/dev/mapper/{pool.device_dm_name('b')}"
    os.symlink("/dev/loop7", b_path)
    try:
        with pytest.raises(libdm.DeviceExistsError, match="symbolic link to /dev/loop7"):
            pool.create_thin("b", "8M")
        assert os.readlink(b_path) == "/dev/loop7"
        assert witness.thin_ids(pool.name) == ids
        assert "b" not in {d.name for d in pool.devices()}
    finally:
        os.unlink(b_path)
    # A device whose deferred removal is pending has no node; another
    # program's file there stops its activation before the removal is
    # taken back.
    fd = os.open(a.path, os.O_RDONLY)
    try:
        a.deactivate()
        assert not os.path.lexists(a.path)
        Path(a.path).write_text("another program's data\n")
        with pytest.raises(libdm.DeviceExistsError, match="regular file"):
            a.activate()
        assert Path(a.path).read_text() == "another program's data\n"
        assert "DEFERRED REMOVE" in witness.dmsetup("info", a.dm_name)
        proc = run_cli("pool", "destroy", "--pool", pool.directory)
        assert proc.returncode == 1 and "fuser" not in proc.stderr, proc.stderr
        assert "waits for whatever still holds it open" in proc.stderr, proc.stderr
    finally:
        os.close(fd)
        os.unlink(a.path)
    # The generic call refuses too.
    name = f"{pool.name}z"
    Path(f"/dev/mapper/{name}").write_text("x")
    try:
        with pytest.raises(libdm.DeviceExistsError, match="regular file"):
            libdm.create(name, [libdm.Target(0, 8, "zero")])
        assert name not in witness.names()
    finally:
        os.unlink(f"/dev/mapper/{name}")
