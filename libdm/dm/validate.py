"""Checks made before any ioctl: names, uuids, target lines, messages.

Each check raises ``ValueError`` naming the rule that was broken, so bad
input never reaches the kernel (where it would fail with a bare EINVAL, or
worse, be mangled by libdevmapper into a different name).
"""

from __future__ import annotations

import re
import string

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_TARGET_TYPE_BYTES",
    "MAX_UUID_BYTES",
    "check_message",
    "check_name",
    "check_params",
    "check_target_type",
    "check_uuid",
]

# DM_NAME_LEN, DM_UUID_LEN and DM_MAX_TYPE_NAME include the trailing NUL.
MAX_NAME_BYTES: int = 127
MAX_UUID_BYTES: int = 128
MAX_TARGET_TYPE_BYTES: int = 15

# udev's and libdevmapper's whitelist.  Any other character would be
# hex-mangled by libdevmapper, so the kernel would hold a different name
# from the one the caller gave.
_ALLOWED = frozenset(string.ascii_letters + string.digits + "#+-.:=@_")
# The common case, checked in C: an allowed identifier is one match.  Only
# a value that fails it is walked character by character, for the message.
_IDENTIFIER = re.compile(r"[A-Za-z0-9#+\-.:=@_]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_identifier(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"device {what} must be a str, not {type(value).__name__}")
    if len(value) <= limit and value not in (".", "..") and _IDENTIFIER.fullmatch(value):
        return value
    if value == "":
        raise ValueError(f"device {what} must not be empty")
    if value in (".", ".."):
        raise ValueError(f"device {what} must not be '.' or '..'")
    for ch in value:
        if ch == "/":
            raise ValueError(f"device {what} {value!r} must not contain '/'")
        if ch.isspace():
            raise ValueError(f"device {what} {value!r} must not contain whitespace")
        if ord(ch) < 32 or ord(ch) == 127:
            raise ValueError(f"device {what} {value!r} must not contain control characters")
        if ord(ch) > 127:
            raise ValueError(f"device {what} {value!r} must be ASCII")
        if ch not in _ALLOWED:
            raise ValueError(
                f"device {what} {value!r} contains {ch!r}: only letters, digits "
                f"and '#+-.:=@_' are allowed"
            )
    if len(value) > limit:
        raise ValueError(f"device {what} is {len(value)} bytes long; at most {limit} are allowed")
    return value


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid device-mapper device name.

    Raises:
        TypeError: not a str.
        ValueError: empty, ``.``/``..``, contains ``/``, whitespace, control
            or non-ASCII characters, or any character outside
            ``[A-Za-z0-9#+-.:=@_]``, or longer than 127 bytes.
    """
    return _check_identifier(name, "name", MAX_NAME_BYTES)


def check_uuid(uuid: str) -> str:
    """Return ``uuid`` if it is a valid device-mapper uuid (same rules as
    :func:`check_name`, at most 128 bytes)."""
    return _check_identifier(uuid, "uuid", MAX_UUID_BYTES)


def _check_line(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if _CONTROL.search(value) is None:
        return value
    for ch in value:
        if ch == "\n" or ch == "\r":
            raise ValueError(f"{what} {value!r} must not contain a newline")
        if ord(ch) < 32 or ord(ch) == 127:
            raise ValueError(f"{what} {value!r} must not contain control characters")
    return value


def check_target_type(ttype: str) -> str:
    """Return ``ttype`` if it is a plausible target type name (non-empty,
    no whitespace or control characters, at most 15 bytes)."""
    ttype = _check_line(ttype, "target type")
    if not ttype or any(ch.isspace() for ch in ttype):
        raise ValueError(f"target type {ttype!r} must be one word")
    if len(ttype.encode()) > MAX_TARGET_TYPE_BYTES:
        raise ValueError(f"target type {ttype!r} is longer than {MAX_TARGET_TYPE_BYTES} bytes")
    return ttype


def check_params(params: str) -> str:
    """Return ``params`` if it holds no newline or control character."""
    return _check_line(params, "target params")


def check_message(message: str) -> str:
    """Return ``message`` if it is non-empty and holds no newline or
    control character."""
    message = _check_line(message, "message")
    if not message.strip():
        raise ValueError("message must not be empty")
    return message
