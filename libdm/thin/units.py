"""Units as types: bytes, sectors, data blocks and metadata blocks.

Each is an ``int`` subclass that refuses to be added to or compared with
another unit, so a sector count can never be silently mixed with a byte
count.  Plain ints mix freely (they are unit-less factors and literals).
All conversion between units lives here.

* ``Bytes``: bytes.
* ``Sectors``: 512-byte sectors, the kernel's unit for tables.
* ``DataBlocks``: a thin pool's data blocks (its block size is in sectors).
* ``MetaBlocks``: 4 KiB blocks of thin-pool metadata.
"""

import re

__all__ = [
    "MAX_SIZE",
    "META_BLOCK_SIZE",
    "SECTOR_SIZE",
    "Bytes",
    "DataBlocks",
    "MetaBlocks",
    "Sectors",
    "format_size",
    "parse_size",
]

SECTOR_SIZE = 512
META_BLOCK_SIZE = 4096


class _Unit(int):
    __slots__ = ()

    def __repr__(self):
        return f"{type(self).__name__}({int(self)})"

    # Tables are built with f-strings: a unit prints as its bare number.
    def __str__(self):
        return int.__repr__(self)

    __format__ = int.__format__

    def _other(self, other, op):
        if isinstance(other, _Unit) and type(other) is not type(self):
            raise TypeError(
                f"cannot {op} {type(self).__name__} and {type(other).__name__}: convert one first"
            )
        if isinstance(other, bool) or not isinstance(other, int):
            return NotImplemented
        return int(other)

    def __add__(self, other):
        o = self._other(other, "add")
        return NotImplemented if o is NotImplemented else type(self)(int(self) + o)

    __radd__ = __add__

    def __sub__(self, other):
        o = self._other(other, "subtract")
        return NotImplemented if o is NotImplemented else type(self)(int(self) - o)

    def __rsub__(self, other):
        o = self._other(other, "subtract")
        return NotImplemented if o is NotImplemented else type(self)(o - int(self))

    def __mul__(self, other):
        if isinstance(other, _Unit):
            raise TypeError(f"cannot multiply {type(self).__name__} by a unit")
        if isinstance(other, bool) or not isinstance(other, int):
            return NotImplemented
        return type(self)(int(self) * other)

    __rmul__ = __mul__

    def __floordiv__(self, other):
        # Same unit / same unit is a plain count; unit / int stays a unit.
        if isinstance(other, _Unit):
            self._other(other, "divide")
            return int(self) // int(other)
        if isinstance(other, bool) or not isinstance(other, int):
            return NotImplemented
        return type(self)(int(self) // other)

    def __mod__(self, other):
        o = self._other(other, "take the remainder of")
        return NotImplemented if o is NotImplemented else type(self)(int(self) % o)

    def _cmp(self, other, op):
        o = self._other(other, "compare")
        return NotImplemented if o is NotImplemented else op(int(self), o)

    def __lt__(self, other):
        return self._cmp(other, int.__lt__)

    def __le__(self, other):
        return self._cmp(other, int.__le__)

    def __gt__(self, other):
        return self._cmp(other, int.__gt__)

    def __ge__(self, other):
        return self._cmp(other, int.__ge__)

    def __eq__(self, other):
        if isinstance(other, _Unit) and type(other) is not type(self):
            return False
        return int.__eq__(self, other)

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = int.__hash__


class Bytes(_Unit):
    """A size in bytes."""

    __slots__ = ()

    def sectors(self):
        """This size in sectors.

        Raises:
            ValueError: not a whole number of 512-byte sectors.
        """
        if int(self) % SECTOR_SIZE:
            raise ValueError(
                f"{format_size(self)} ({int(self)} bytes) is not a whole number "
                f"of {SECTOR_SIZE}-byte sectors"
            )
        return Sectors(int(self) // SECTOR_SIZE)


class Sectors(_Unit):
    """A count of 512-byte sectors."""

    __slots__ = ()

    def bytes(self):
        return Bytes(int(self) * SECTOR_SIZE)

    def data_blocks(self, block_size):
        """Whole data blocks of ``block_size`` sectors in this many sectors
        (rounded down)."""
        _require(block_size, Sectors, "block_size")
        return DataBlocks(int(self) // int(block_size))


class DataBlocks(_Unit):
    """A count of thin-pool data blocks (the block size is in sectors)."""

    __slots__ = ()

    def sectors(self, block_size):
        _require(block_size, Sectors, "block_size")
        return Sectors(int(self) * int(block_size))


class MetaBlocks(_Unit):
    """A count of 4 KiB thin-pool metadata blocks."""

    __slots__ = ()

    def bytes(self):
        return Bytes(int(self) * META_BLOCK_SIZE)


def _require(value, cls, what):
    if not isinstance(value, cls):
        raise TypeError(f"{what} must be {cls.__name__}, not {type(value).__name__}")


_SUFFIXES = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KB": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
    "GIB": 1 << 30,
    "T": 1 << 40,
    "TB": 1 << 40,
    "TIB": 1 << 40,
    "P": 1 << 50,
    "PB": 1 << 50,
    "PIB": 1 << 50,
    "S": SECTOR_SIZE,  # sectors, as in LVM's "s" suffix
}
_SIZE_RE = re.compile(r"\s*(\d+)(?:\.(\d+))?\s*([A-Za-z]*)\s*\Z", re.ASCII)

#: The largest size accepted: the kernel refuses a device that ends past
#: ``LLONG_MAX >> 9`` sectors ("too large device"), and a loop file's size
#: is a signed 64-bit offset.  That is 8 EiB less one sector.
MAX_SIZE = (((1 << 63) - 1) >> 9) * SECTOR_SIZE
# Digits beyond these can only give a size past MAX_SIZE (whole part) or
# a fraction of a byte (fraction part, trailing zeros dropped: a suffix
# multiplies by at most 2**50).  Checked before int() so that a long
# string costs nothing and never hits int()'s own digit limit.
_MAX_WHOLE_DIGITS = len(str(MAX_SIZE))
_MAX_FRACTION_DIGITS = 50


def _shown(value, limit=40):
    """``repr(value)``, cut short so that an error line stays one line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _not_a_size(value, what):
    """The ValueError for a string that is not a size, saying why."""
    if not value.isascii():
        odd = next(c for c in value if not c.isascii())
        return ValueError(
            f"{what} {_shown(value)} is not a size: it has the non-ASCII character "
            f"{odd!a}; use ASCII digits 0-9, e.g. '512M'"
        )
    return ValueError(
        f"{what} {_shown(value)} is not a size: use bytes or a number with "
        f"K, M, G, T or s (sectors), e.g. '512M'"
    )


def _too_large(value, what):
    return ValueError(
        f"{what} {_shown(value)} is too large: the largest device Linux can address "
        f"is {MAX_SIZE} bytes (8 EiB less one sector)"
    )


def _parse_size_text(value, what):
    """The bytes a size string such as ``"1.5G"`` stands for.

    Raises:
        ValueError: not ASCII digits with an optional fraction and suffix,
            too large, or not a whole number of bytes.
    """
    m = _SIZE_RE.match(value) if value.isascii() else None
    if not m or m.group(3).upper() not in _SUFFIXES:
        raise _not_a_size(value, what)
    whole, frac, suffix = m.groups()
    whole = whole.lstrip("0") or "0"
    frac = (frac or "").rstrip("0")
    if len(whole) > _MAX_WHOLE_DIGITS:
        raise _too_large(value, what)
    if len(frac) > _MAX_FRACTION_DIGITS:
        raise ValueError(f"{what} {_shown(value)} is not a whole number of bytes")
    numerator = int(whole + frac) * _SUFFIXES[suffix.upper()]
    denominator = 10 ** len(frac)
    if numerator % denominator:
        raise ValueError(f"{what} {_shown(value)} is not a whole number of bytes")
    return Bytes(numerator // denominator)


def parse_size(value, *, what="size"):
    """Turn ``value`` into ``Bytes``.

    Accepts an int (bytes), ``Bytes``, ``Sectors``, or a string such as
    ``"4096"``, ``"64K"``, ``"512M"``, ``"10G"``, ``"1.5G"`` or ``"2048s"``
    (sectors).  Suffixes are binary (K = 1024) and case-insensitive.
    Strings are ASCII only: digits 0-9, an optional ``.`` fraction, an
    optional suffix, spaces around them.  No sign, exponent, underscore
    or non-ASCII digit.

    Raises:
        ValueError: unparsable, negative or zero, larger than
            :data:`MAX_SIZE` (8 EiB less one sector), or not a whole number
            of 512-byte sectors; the message names ``what`` and the value.
        TypeError: another type (for instance ``DataBlocks``, whose size
            depends on the pool).
    """
    if isinstance(value, Sectors):
        result = value.bytes()
    elif isinstance(value, Bytes):
        result = value
    elif isinstance(value, _Unit):
        raise TypeError(f"{what}: {type(value).__name__} has no fixed size in bytes")
    elif isinstance(value, bool):
        raise TypeError(f"{what} must be an int or a string like '10G', not bool")
    elif isinstance(value, int):
        result = Bytes(value)
    elif isinstance(value, str):
        result = _parse_size_text(value, what)
    else:
        raise TypeError(
            f"{what} must be an int or a string like '10G', not {type(value).__name__}"
        )
    if result <= 0:
        raise ValueError(f"{what} must be positive, got {_shown(value)}")
    if result > MAX_SIZE:
        raise _too_large(value, what)
    try:
        result.sectors()
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    return result


def format_size(value):
    """A short human-readable size: ``Bytes(1536) -> '1.5 KiB'``."""
    n = float(int(value))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    return f"{n} PiB"  # pragma: no cover
