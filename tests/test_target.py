"""Target values and table checks (no kernel)."""

import pytest

from libdm import Target
from libdm.dm.target import check_table


def test_target_formats_like_a_table_line():
    assert str(Target(0, 2048, "linear", "7:0 0")) == "0 2048 linear 7:0 0"
    assert str(Target(0, 8, "zero")) == "0 8 zero"


@pytest.mark.parametrize(
    "line",
    ["0 2048 linear 7:0 0", "0 8 zero", "0 409600 thin-pool 7:1 7:0 128 0 1 skip_block_zeroing"],
)
def test_target_round_trips_through_its_string(line):
    assert str(Target.parse(line)) == line


@pytest.mark.parametrize(
    "line, field", [("x 8 zero", "start"), ("0 -8 zero", "length"), ("0 8", "at least")]
)
def test_parse_names_the_bad_field(line, field):
    with pytest.raises(ValueError, match=field):
        Target.parse(line)


def test_table_must_start_at_zero_without_gaps():
    with pytest.raises(ValueError, match="starts at sector 8, expected 0"):
        check_table([Target(8, 8, "zero")])
    with pytest.raises(ValueError, match="starts at sector 20, expected 16"):
        check_table([Target(0, 16, "zero"), Target(20, 4, "zero")])
    with pytest.raises(ValueError, match="starts at sector 10, expected 16"):
        check_table([Target(0, 16, "zero"), Target(10, 4, "zero")])


def test_table_rejects_empty_and_zero_length():
    with pytest.raises(ValueError, match="at least one target"):
        check_table([])
    with pytest.raises(ValueError, match="positive"):
        check_table([Target(0, 0, "zero")])


def test_table_rejects_non_int_sectors():
    with pytest.raises(TypeError, match="int number of sectors"):
        check_table([Target(0, 8.0, "zero")])
    with pytest.raises(TypeError, match="sequence of Target"):
        check_table(Target(0, 8, "zero"))


def test_table_accepts_plain_tuples():
    assert check_table([(0, 8, "zero", ""), (8, 8, "error")]) == (
        Target(0, 8, "zero"),
        Target(8, 8, "error"),
    )
