"""The typed values hold what their annotations say, at run time too.

No kernel is needed: these build values and errors, and check the few
run-time checks that back the annotations up.
"""

from __future__ import annotations

import pickle

import pytest

import libdm
from libdm.dm.errors import DMError, NoSuchDeviceError
from libdm.dm.target import Target, check_table
from libdm.thin.errors import DeviceNotBlankError, PoolFullError, PoolLockedError, StateError
from libdm.thin.status import parse_pool_status, parse_thin_status
from libdm.thin.table import ThinPoolParams, check_block_size
from libdm.thin.units import Bytes, DataBlocks, MetaBlocks, Sectors


def test_target_fields_are_sectors() -> None:
    t = Target(0, 2048, "zero")
    assert type(t.start) is Sectors and type(t.length) is Sectors
    assert t == (0, 2048, "zero", "") and str(t) == "0 2048 zero"
    parsed = Target.parse("8 16 linear 7:0 0")
    assert type(parsed.start) is Sectors and type(parsed.length) is Sectors
    assert Target(Sectors(0), Sectors(8), "zero").length == Sectors(8)


def test_check_table_makes_plain_int_fields_sectors() -> None:
    # _replace goes around Target() and keeps a plain int.
    table = check_table([Target(0, 8, "zero")._replace(length=16), (16, 8, "error")])
    assert [type(f) for t in table for f in (t.start, t.length)] == [Sectors] * 4


@pytest.mark.parametrize("unit", [Bytes, DataBlocks, MetaBlocks])
def test_check_table_refuses_another_unit(unit: type[Bytes | DataBlocks | MetaBlocks]) -> None:
    with pytest.raises(
        TypeError, match=f"length must be an int number of sectors, not {unit.__name__}"
    ):
        check_table([(0, unit(8), "zero")])


def test_block_size_refuses_bytes() -> None:
    assert check_block_size(128) == Sectors(128)
    with pytest.raises(TypeError, match="must be Sectors, not Bytes"):
        check_block_size(Bytes(65536))


def test_status_failed_tells_the_types_apart() -> None:
    working = parse_pool_status("1 10/100 5/50 - rw discard_passdown queue_if_no_space - 10")
    failed = parse_pool_status("Fail")
    assert working.failed is False and failed.failed is True
    assert not working.failed and working.free_data == DataBlocks(45)
    assert working.free_meta == MetaBlocks(90)
    thin = parse_thin_status("128 127")
    assert not thin.failed and thin.mapped == Sectors(128)


def test_pool_params_keep_their_units() -> None:
    p = ThinPoolParams("7:0", "7:1", Sectors(128))
    assert type(p.low_water_mark) is DataBlocks and p.features == frozenset()
    q = p.replace(low_water_mark=DataBlocks(5), features=frozenset({"read_only"}))
    assert str(q) == "7:0 7:1 128 5 1 read_only"


@pytest.mark.parametrize(
    "exc",
    [
        NoSuchDeviceError(6, "No such device", "info", "d", ["line"]),
        PoolFullError("the pool is full", "create_thin", "pool"),
        PoolLockedError("locked", "extend"),
        StateError("no state", "open", "pool"),
        DeviceNotBlankError("an ext4 filesystem", "create", "/dev/x"),
    ],
)
def test_errors_pickle_whatever_their_signature(exc: DMError) -> None:
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert (copy.errno, copy.strerror, copy.operation, copy.device, copy.log_lines) == (
        exc.errno,
        exc.strerror,
        exc.operation,
        exc.device,
        exc.log_lines,
    )
    assert str(copy) == str(exc)


@pytest.mark.parametrize("delay", [0, -1.0])
def test_remove_needs_a_positive_retry_delay(delay: float) -> None:
    with pytest.raises(ValueError, match="retry_delay must be a positive number of seconds"):
        libdm.remove("any-name", retry_delay=delay)


def test_rounding_keeps_the_unit_and_refuses_a_unit_step() -> None:
    assert Sectors(9).round_up(8) == Sectors(16) and type(Sectors(9).round_up(8)) is Sectors
    assert Sectors(16).round_up(8) == Sectors(16) and Sectors(0).round_up(8) == Sectors(0)
    assert Sectors(15).round_down(8) == Sectors(8)
    assert Bytes(4097).round_up(4096) == Bytes(8192) and type(Bytes(1).round_up(2)) is Bytes
    with pytest.raises(TypeError, match="plain int"):
        Sectors(9).round_up(Sectors(8))
    with pytest.raises(ValueError, match="positive"):
        Bytes(9).round_down(0)


def test_bytes_to_whole_sectors_rounds_down_and_sectors_up_rounds_up() -> None:
    assert Bytes(1023).whole_sectors() == Sectors(1) and Bytes(1023).sectors_up() == Sectors(2)
    assert Bytes(1024).whole_sectors() == Sectors(2) == Bytes(1024).sectors_up()
    assert type(Bytes(0).sectors_up()) is Sectors and Bytes(0).sectors_up() == Sectors(0)
