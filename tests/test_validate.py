"""Validation rules for names, uuids, params and messages (no kernel)."""

import pytest

import libdm
from libdm.dm import validate


@pytest.mark.parametrize(
    "bad, rule",
    [
        ("", "must not be empty"),
        (".", "'.' or '..'"),
        ("..", "'.' or '..'"),
        ("a/b", "must not contain '/'"),
        ("a b", "whitespace"),
        ("a\tb", "whitespace"),
        ("a\x01b", "control characters"),
        ("a\x7fb", "control characters"),
        ("caf\u00e9", "must be ASCII"),
        ("a!b", "only letters, digits"),
        ("x" * 128, "at most 127"),
    ],
)
def test_bad_names_are_refused_with_the_rule(bad, rule):
    with pytest.raises(ValueError, match=rule):
        validate.check_name(bad)


def test_name_limit_is_exactly_127_bytes():
    assert validate.check_name("x" * 127) == "x" * 127


def test_uuid_limit_is_128_bytes():
    assert validate.check_uuid("U" * 128) == "U" * 128
    with pytest.raises(ValueError, match="uuid is 129 bytes long; at most 128"):
        validate.check_uuid("U" * 129)


@pytest.mark.parametrize("bad", ["", ".", "a/b", "a b", "\x00", "\u00fc"])
def test_bad_uuids_are_refused(bad):
    with pytest.raises(ValueError, match="device uuid"):
        validate.check_uuid(bad)


def test_non_str_name_is_a_type_error():
    with pytest.raises(TypeError, match="must be a str"):
        validate.check_name(b"abc")


def test_allowed_characters_pass():
    assert validate.check_name("LVM-vg_01.thin#2+x:y=z@w") == "LVM-vg_01.thin#2+x:y=z@w"


@pytest.mark.parametrize(
    "bad, rule", [("a\nb", "newline"), ("a\rb", "newline"), ("a\x1bb", "control")]
)
def test_params_with_newlines_or_control_chars_are_refused(bad, rule):
    with pytest.raises(ValueError, match=rule):
        validate.check_params(bad)


@pytest.mark.parametrize(
    "bad, rule",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("create_thin 1\ndelete 1", "newline"),
        ("x\x00", "control"),
    ],
)
def test_bad_messages_are_refused(bad, rule):
    with pytest.raises(ValueError, match=rule):
        validate.check_message(bad)


@pytest.mark.parametrize(
    "bad, rule", [("", "one word"), ("thin pool", "one word"), ("a" * 16, "longer than 15")]
)
def test_bad_target_types_are_refused(bad, rule):
    with pytest.raises(ValueError, match=rule):
        validate.check_target_type(bad)


# The public operations validate before touching libdevmapper, so these
# raise ValueError even on a machine without device-mapper.
@pytest.mark.parametrize(
    "call",
    [
        lambda: libdm.create("bad name", [libdm.Target(0, 8, "zero")]),
        lambda: libdm.create("ok", [libdm.Target(0, 8, "zero")], uuid="a/b"),
        lambda: libdm.create("ok", [libdm.Target(0, 8, "linear", "1:2 0\n")]),
        lambda: libdm.reload("..", [libdm.Target(0, 8, "zero")]),
        lambda: libdm.remove(""),
        lambda: libdm.info("x" * 200),
        lambda: libdm.message("ok", "delete 1\ncreate_thin 2"),
        lambda: libdm.rename("ok", "new/name"),
        lambda: libdm.set_uuid("ok", "bad uuid"),
        lambda: libdm.suspend("a\x00"),
        lambda: libdm.resume("a b"),
        lambda: libdm.table("/"),
        lambda: libdm.status(" "),
        lambda: libdm.deps("."),
        lambda: libdm.wait_event("x y", 0, timeout=0),
        lambda: libdm.device_path("a/b"),
    ],
)
def test_operations_refuse_bad_input_before_any_ioctl(call):
    with pytest.raises(ValueError):
        call()
