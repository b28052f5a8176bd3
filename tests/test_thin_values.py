"""Units, sizes, thin tables and status lines (no kernel).

The status and table lines below were captured from the test kernel
(Linux 6.1, dm-thin-pool 1.22.0).
"""

import re

import pytest

from libdm.thin.status import (
    ThinFailed,
    ThinPoolFailed,
    ThinPoolStatus,
    ThinStatus,
    parse_pool_status,
    parse_thin_status,
)
from libdm.thin.table import ThinParams, ThinPoolParams, check_block_size, check_thin_id
from libdm.thin.units import (
    Bytes,
    DataBlocks,
    MetaBlocks,
    Sectors,
    format_size,
    parse_size,
)

POOL_LINES = [
    "0 213/2048 0/1024 - rw no_discard_passdown queue_if_no_space - 512",
    "1 215/2048 3/1024 25 rw no_discard_passdown queue_if_no_space - 512",
    "1 214/2048 3/1024 - rw no_discard_passdown error_if_no_space - 512",
    "0 214/2048 16/16 - out_of_data_space no_discard_passdown error_if_no_space - 512",
]
THIN_LINES = ["0 -", "384 1023", "2048 2047"]
TABLE_LINES = ["7:0 7:1 128 16 0", "7:0 7:1 128 16 2 no_discard_passdown error_if_no_space"]


# -- units -----------------------------------------------------------------


def test_units_do_not_mix():
    with pytest.raises(TypeError, match="cannot add Sectors and Bytes"):
        Sectors(1) + Bytes(512)
    with pytest.raises(TypeError, match="compare"):
        _ = Sectors(1) < DataBlocks(2)
    assert Sectors(1) != Bytes(1)
    assert Sectors(8) + 8 == Sectors(16) and isinstance(Sectors(8) + 8, Sectors)


def test_unit_conversions():
    assert Bytes(4096).sectors() == Sectors(8)
    assert Sectors(8).bytes() == Bytes(4096)
    assert Sectors(1000).data_blocks(Sectors(128)) == DataBlocks(7)  # rounds down
    assert DataBlocks(7).sectors(Sectors(128)) == Sectors(896)
    assert MetaBlocks(2).bytes() == Bytes(8192)
    with pytest.raises(TypeError, match="block_size must be Sectors"):
        Sectors(1000).data_blocks(128)
    with pytest.raises(ValueError, match="not a whole number of 512-byte sectors"):
        Bytes(1000).sectors()


def test_units_print_as_bare_numbers():
    assert f"{Sectors(2048)} {DataBlocks(3)}" == "2048 3"
    assert repr(Sectors(5)) == "Sectors(5)"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4096", 4096),
        ("64K", 65536),
        ("64k", 65536),
        ("512M", 512 << 20),
        ("10G", 10 << 30),
        ("1.5G", 3 << 29),
        ("2048s", 1 << 20),
        ("1T", 1 << 40),
        (" 8 MiB ", 8 << 20),
        (1024, 1024),
        (Sectors(2), 1024),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == Bytes(expected)


@pytest.mark.parametrize(
    "bad, rule",
    [
        ("100", "whole number of 512-byte sectors"),
        (100, "whole number"),
        ("", "not a size"),
        ("10X", "not a size"),
        ("-5G", "not a size"),
        ("0", "positive"),
        (0, "positive"),
        ("1.0000001K", "whole number of bytes"),
    ],
)
def test_parse_size_refuses(bad, rule):
    with pytest.raises(ValueError, match=rule):
        parse_size(bad, what="data_size")


def test_parse_size_names_the_argument_and_refuses_other_types():
    with pytest.raises(ValueError, match=r"^data_size"):
        parse_size("lots", what="data_size")
    with pytest.raises(TypeError):
        parse_size(1.5)
    with pytest.raises(TypeError):
        parse_size(DataBlocks(3))
    with pytest.raises(TypeError):
        parse_size(True)


# Python's int() and re's \d take any Unicode digit; a size must not.
NON_ASCII_SIZES = [
    "\u0661\u0660M",  # Arabic-Indic ten
    "\uff11\uff10G",  # fullwidth ten
    "\u0967\u0966",  # Devanagari ten
    "1\u0660M",  # an ASCII digit, then an Arabic-Indic one
    "10\u00a0M",  # no-break space
    "\u200310M",  # em space
    "10M\u2028",  # line separator
    "10M\u3000",  # ideographic space
    "10\u1d0d",  # a letter that looks like M
    "\U0001d7cf\U0001d7ceM",  # mathematical bold ten
]


@pytest.mark.parametrize("text", NON_ASCII_SIZES)
def test_parse_size_takes_only_ascii(text):
    with pytest.raises(ValueError, match="non-ASCII") as caught:
        parse_size(text, what="data_size")
    message = str(caught.value)
    assert message.startswith(f"data_size {text!r} is not a size")


@pytest.mark.parametrize(
    "text",
    [
        "1e3",
        "1E3",
        "1e3M",
        "+5M",
        "-1",
        "- 1",
        "1_000",
        "0x10",
        "0b1",
        "0o7",
        "1,5G",
        ".5G",
        "5.G",
        "1..5G",
        "1.5.5G",
        "10MM",
        "10 M B",
        "10M 5",
        "inf",
        "nan",
        "NaN",
        "1e999",
        "10\x00",
        "\x0010M",
        "10\x1cM",
        "10\x85M",
        "10/2M",
        "(10)",
        "10K-",
    ],
)
def test_parse_size_refuses_hostile_ascii(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["10M", " 10M", "10M ", "\t10 M\n", "10\tM", "010M"])
def test_parse_size_keeps_its_ascii_syntax(text):
    assert parse_size(text) == Bytes(10 << 20)


def test_parse_size_largest():
    largest = Bytes(((1 << 63) - 1) // 512 * 512)  # the kernel's LLONG_MAX >> 9 sectors
    assert parse_size(f"{(1 << 54) - 1}s") == largest
    assert parse_size(int(largest)) == largest
    assert parse_size(Sectors((1 << 54) - 1)) == largest
    assert parse_size("8191.5P") == Bytes(16383 << 49)


@pytest.mark.parametrize(
    "value",
    [
        f"{1 << 54}s",
        str(1 << 63),
        1 << 63,
        "8192P",
        "8388608T",
        str(2**63 * 512),
        f"{2**63}s",
        2**200,
        "1" + "0" * 30 + "P",
        "9" * 5000,
        "9" * 100_000 + "M",
        Sectors(1 << 54),
        Bytes(1 << 70),
    ],
)
def test_parse_size_too_large_is_a_value_error_saying_so(value):
    with pytest.raises(ValueError, match="too large") as caught:
        parse_size(value, what="data_size")
    message = str(caught.value)
    assert message.startswith("data_size ") and len(message) < 200


@pytest.mark.parametrize("text", ["1." + "0" * 5000 + "1G", "1." + "3" * 100_000])
def test_parse_size_long_fractions_are_refused_quickly(text):
    with pytest.raises(ValueError, match="whole number of bytes") as caught:
        parse_size(text)
    assert len(str(caught.value)) < 200


def test_parse_size_trailing_zeros_of_a_fraction_are_harmless():
    assert parse_size("1." + "0" * 5000 + "G") == Bytes(1 << 30)
    assert parse_size("0" * 5000 + "1G") == Bytes(1 << 30)


def test_format_size():
    assert format_size(Bytes(1536)) == "1.5 KiB"
    assert format_size(parse_size("10G")) == "10 GiB"
    assert format_size(Bytes(100)) == "100 B"


# -- tables ----------------------------------------------------------------


@pytest.mark.parametrize("line", TABLE_LINES)
def test_pool_params_round_trip_kernel_tables(line):
    params = ThinPoolParams.parse(line + " ")  # the kernel leaves a trailing space
    assert str(params) == line


def test_pool_params_all_features_in_kernel_order():
    params = ThinPoolParams(
        "7:0",
        "7:1",
        Sectors(256),
        DataBlocks(10),
        {
            "error_if_no_space",
            "skip_block_zeroing",
            "read_only",
            "ignore_discard",
            "no_discard_passdown",
        },
    )
    assert str(params) == (
        "7:0 7:1 256 10 5 skip_block_zeroing ignore_discard "
        "no_discard_passdown read_only error_if_no_space"
    )
    assert ThinPoolParams.parse(str(params)) == params


@pytest.mark.parametrize("size", [0, 64, 127, 129, 192, 2097152 + 128, 4194304])
def test_block_size_rule(size):
    with pytest.raises(ValueError, match="multiple of 128 sectors"):
        check_block_size(size)


def test_block_size_extremes_are_accepted():
    assert check_block_size(128) == Sectors(128)
    assert check_block_size(2097152) == Sectors(2097152)


@pytest.mark.parametrize(
    "text, field",
    [
        ("7:0 7:1 x 0 0", "field 3 (data block size)"),
        ("7:0 7:1 128 y 0", "field 4 (low water mark)"),
        ("7:0 7:1 128 0 z", "field 5 (feature count)"),
        ("7:0 7:1 128 0 2 read_only", "says 2 feature args but 1 follow"),
        ("7:0 7:1 128", "need metadata dev"),
        ("7:0 7:1 128 0 1 bogus", "unknown thin-pool feature bogus"),
        ("/dev/loop0 7:1 128 0 0", "metadata device"),
    ],
)
def test_pool_params_errors_name_the_field(text, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        ThinPoolParams.parse(text)


def test_thin_params_round_trip():
    for line in ("254:0 0", "254:0 16777215", "254:0 5 7:3"):
        assert str(ThinParams.parse(line)) == line
    with pytest.raises(ValueError, match="field 2 \\(device id\\)"):
        ThinParams.parse("254:0 x")
    with pytest.raises(ValueError, match="24 bits"):
        ThinParams("254:0", 1 << 24)
    with pytest.raises(ValueError):
        check_thin_id(-1)


# -- status ----------------------------------------------------------------


@pytest.mark.parametrize("line", POOL_LINES)
def test_pool_status_round_trips_kernel_lines(line):
    status = parse_pool_status(line + " ")
    assert isinstance(status, ThinPoolStatus) and not status.failed
    assert str(status) == line


def test_pool_status_fields():
    st = parse_pool_status(POOL_LINES[1])
    assert st.transaction_id == 1
    assert (st.used_meta, st.total_meta) == (MetaBlocks(215), MetaBlocks(2048))
    assert (st.used_data, st.total_data) == (DataBlocks(3), DataBlocks(1024))
    assert st.free_data == DataBlocks(1021) and st.free_meta == MetaBlocks(1833)
    assert st.held_root == 25 and st.mode == "rw" and not st.needs_check
    assert st.discard == "no_discard_passdown" and st.no_space == "queue_if_no_space"
    assert st.meta_low_water == MetaBlocks(512)
    assert parse_pool_status(POOL_LINES[3]).mode == "out_of_data_space"


def test_pool_status_fail_and_error():
    assert parse_pool_status("Fail") == ThinPoolFailed("Fail")
    assert parse_pool_status("Error").failed


def test_pool_status_needs_check_and_read_only():
    st = parse_pool_status(
        "3 300/2048 10/1024 - ro no_discard_passdown queue_if_no_space needs_check 512"
    )
    assert st.mode == "ro" and st.needs_check


@pytest.mark.parametrize(
    "line, field",
    [
        ("x 1/2 3/4 - rw discard_passdown queue_if_no_space -", "field 1 (transaction id)"),
        ("0 1-2 3/4 - rw discard_passdown queue_if_no_space -", "field 2 (metadata used/total)"),
        ("0 1/2 3/x - rw discard_passdown queue_if_no_space -", "field 3 (data used/total)"),
        ("0 1/2 3/4 q rw discard_passdown queue_if_no_space -", "field 4 (held metadata root)"),
        ("0 1/2 3/4 - rx discard_passdown queue_if_no_space -", "field 5 (mode)"),
        ("0 1/2 3/4 - rw discard queue_if_no_space -", "field 6 (discard mode)"),
        ("0 1/2 3/4 - rw discard_passdown queue -", "field 7 (no-space policy)"),
        ("0 1/2 3/4 - rw discard_passdown queue_if_no_space y", "field 8 (needs_check)"),
        ("0 1/2 3/4 - rw discard_passdown queue_if_no_space - z", "field 9"),
        ("0 1/2 3/4 - rw", "field 6 (discard mode) is missing"),
        ("", "field 1 (transaction id) is missing"),
    ],
)
def test_pool_status_errors_name_the_field(line, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        parse_pool_status(line)


@pytest.mark.parametrize("line", THIN_LINES)
def test_thin_status_round_trips_kernel_lines(line):
    assert str(parse_thin_status(line)) == line


def test_thin_status_fields():
    assert parse_thin_status("384 1023") == ThinStatus(Sectors(384), Sectors(1023))
    assert parse_thin_status("0 -").highest_mapped is None
    assert parse_thin_status("Fail") == ThinFailed("Fail")
    with pytest.raises(ValueError, match="field 2 \\(highest mapped sector\\)"):
        parse_thin_status("384 x")
    with pytest.raises(ValueError, match="expected"):
        parse_thin_status("1 2 3")
