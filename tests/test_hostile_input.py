"""Property-based tests: any input gives a value or a ValueError/TypeError,
never another exception, and what is accepted round-trips."""

import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import reliability

import libdm
from libdm.dm import validate
from libdm.thin.status import parse_pool_status, parse_thin_status
from libdm.thin.table import ThinParams, ThinPoolParams
from libdm.thin.units import Bytes, parse_size

SETTINGS = settings(
    max_examples=reliability.scale(300, 5000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TRIED = {"n": 0}


def tried():
    TRIED["n"] += 1


def teardown_module():
    reliability.record("hostile input", inputs=TRIED["n"], crashes=0)


ANY_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=160)
TOKENS = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "0",
                "1",
                "7:0",
                "254:1",
                "128",
                "-",
                "rw",
                "ro",
                "out_of_data_space",
                "discard_passdown",
                "no_discard_passdown",
                "ignore_discard",
                "queue_if_no_space",
                "error_if_no_space",
                "needs_check",
                "Fail",
                "1/2",
                "12/4096",
                "skip_block_zeroing",
                "read_only",
                "5",
            ]
        ),
        st.text(alphabet=string.printable, max_size=8),
    ),
    max_size=12,
).map(" ".join)


@SETTINGS
@given(ANY_TEXT)
def test_name_validation_accepts_or_says_why(text):
    tried()
    try:
        assert validate.check_name(text) == text
    except ValueError as exc:
        assert str(exc).startswith("device name")
        return
    # Accepted names are exactly the whitelist, 1..127 bytes, not . or ..
    assert 0 < len(text.encode()) <= 127 and text not in (".", "..")
    assert set(text) <= set(string.ascii_letters + string.digits + "#+-.:=@_")


@SETTINGS
@given(ANY_TEXT)
def test_uuid_validation_accepts_or_says_why(text):
    tried()
    try:
        validate.check_uuid(text)
    except ValueError as exc:
        assert str(exc).startswith("device uuid")


@SETTINGS
@given(st.one_of(ANY_TEXT, st.integers(min_value=-(1 << 70), max_value=1 << 70)))
def test_size_parsing(value):
    tried()
    try:
        size = parse_size(value)
    except ValueError as exc:
        assert "size" in str(exc)
        return
    assert isinstance(size, Bytes) and size > 0 and size % 512 == 0


# The kernel's largest device: LLONG_MAX >> 9 sectors.
MAX_SIZE = ((1 << 63) - 1) // 512 * 512
ACCEPTED_SIZE = re.compile(r"\s*[0-9.]+\s*([kmgtpe](i?b)?|b|s)?\s*", re.IGNORECASE)
# Sizes built from digits of every script, odd spaces, signs, exponents
# and suffixes: only ASCII digits may make a size, and none past MAX_SIZE.
SIZE_LIKE = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("0123456789.+-_eExX sSkKmMgGtTpPbBiI\t\n\x0b\x0c\x1c\x1f")),
        st.characters(categories=["Nd", "Zs", "Zl", "Zp", "No"]),
    ),
    max_size=40,
)


@SETTINGS
@given(st.one_of(SIZE_LIKE, st.integers(min_value=-(1 << 80), max_value=1 << 80)))
def test_sizes_are_ascii_and_addressable_or_a_value_error(value):
    tried()
    try:
        size = parse_size(value, what="data_size")
    except ValueError as exc:
        message = str(exc)
        assert message.startswith("data_size") and "\n" not in message
        if isinstance(value, str) and not value.isascii():
            assert "non-ASCII" in message
        return
    assert 0 < size <= MAX_SIZE
    if isinstance(value, str):
        assert value.isascii()
        # Plain decimal digits and a unit ("1E" is an exbibyte): no sign,
        # separator, exponent or hexadecimal.
        assert ACCEPTED_SIZE.fullmatch(value), value


@SETTINGS
@given(st.integers(min_value=1, max_value=1 << 50).map(lambda n: n * 512))
def test_accepted_sizes_round_trip_through_sectors(n):
    tried()
    assert parse_size(f"{n // 512}s") == Bytes(n) == parse_size(str(n))


@SETTINGS
@given(st.one_of(ANY_TEXT, TOKENS))
def test_pool_status_parser_never_raises_anything_else(text):
    tried()
    try:
        status = parse_pool_status(text)
    except ValueError:
        return
    if not status.failed:
        assert parse_pool_status(str(status)) == status


@SETTINGS
@given(st.one_of(ANY_TEXT, TOKENS))
def test_thin_status_parser_never_raises_anything_else(text):
    tried()
    try:
        status = parse_thin_status(text)
    except ValueError:
        return
    assert parse_thin_status(str(status)) == status


@SETTINGS
@given(st.one_of(ANY_TEXT, TOKENS))
def test_table_parsers_never_raise_anything_else(text):
    tried()
    for cls in (ThinPoolParams, ThinParams):
        try:
            params = cls.parse(text)
        except ValueError:
            continue
        assert cls.parse(str(params)) == params
    try:
        target = libdm.Target.parse(text)
    except ValueError:
        return
    assert libdm.Target.parse(str(target)) == target


@SETTINGS
@given(st.text(alphabet=string.printable + "\x00\x1b\u00e9", max_size=60))
def test_messages_with_injected_lines_or_controls_are_refused(text):
    tried()
    injected = f"create_thin 1{text}"
    try:
        validate.check_message(injected)
    except ValueError as exc:
        assert any(ch in injected for ch in "\n\r") or any(
            ord(ch) < 32 or ord(ch) == 127 for ch in injected
        ), exc
        return
    assert "\n" not in injected and "\r" not in injected


@pytest.mark.parametrize(
    "message",
    [
        "create_thin 1\ndelete 0",
        "delete 0\r",
        "set_transaction_id 0 1\x00",
        "\n",
    ],
)
def test_injection_attempts_never_reach_the_kernel(message):
    with pytest.raises(ValueError):
        libdm.message("pool", message)
