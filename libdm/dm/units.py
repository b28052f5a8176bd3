"""Units as types: bytes, sectors, data blocks and metadata blocks.

Each is an ``int`` subclass that refuses to be added to or compared with
another unit, so a sector count can never be silently mixed with a byte
count.  Plain ints mix freely (they are unit-less factors and literals).
All conversion between units lives here.

* ``Bytes``: bytes.
* ``Sectors``: 512-byte sectors, the kernel's unit for tables.
* ``DataBlocks``: a thin pool's data blocks (its block size is in sectors).
* ``MetaBlocks``: 4 KiB blocks of thin-pool metadata.

They live in layer 2 because a table line's start and length are already
sectors; :mod:`libdm.thin.units` re-exports them.

To a type checker the units are distinct too, and not ``int``: a checker
accepts any ``int`` subclass where an ``int`` is expected, so
``Sectors(1) + Bytes(512)`` would type-check against ``int.__add__``.
Instead, under ``TYPE_CHECKING`` the units derive from ``_Number``, a
class declaring only what a unit keeps of ``int`` (``__int__``,
``__index__``, ``__bool__``, the unit-less results of negation and true
division), while at run time ``_Number`` *is* ``int``.  The
arithmetic and comparisons are declared on ``_Unit`` with ``Self | int``,
so a checker rejects ``Sectors + Bytes``, ``Sectors < Bytes``,
``Sectors == Bytes`` and a ``Bytes`` passed where ``Sectors`` is
annotated, and accepts ``Sectors(8) + 8``, ``Sectors(8) * 2`` and
``Sectors // Sectors -> int``.  Where a plain ``int`` is needed (an
``os`` call, a struct), say so with ``int(x)``.  Declaring ``__eq__``
narrower than ``object`` breaks Liskov on purpose (equality across units
is always ``False`` at run time, never what was meant); it is the one
override the checker is told to accept.  This is a checker-only façade
over the same run-time classes, so nothing changes at run time, and the
run-time checks stay for callers without a checker.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Self, TypeAlias, overload

__all__ = [
    "MAX_SIZE",
    "META_BLOCK_SIZE",
    "SECTOR_SIZE",
    "Bytes",
    "DataBlocks",
    "MetaBlocks",
    "Sectors",
    "SizeLike",
    "format_size",
    "parse_size",
]

SECTOR_SIZE = 512
META_BLOCK_SIZE = 4096

if TYPE_CHECKING:

    class _Number:
        """What a checker sees of ``int`` in a unit (see the module docstring)."""

        def __new__(cls, value: int | str | Self = 0, /) -> Self: ...
        def __int__(self) -> int: ...
        def __index__(self) -> int: ...
        def __float__(self) -> float: ...
        def __bool__(self) -> bool: ...
        def __neg__(self) -> int: ...
        def __abs__(self) -> int: ...
        def __truediv__(self, other: Self | int, /) -> float: ...
        def bit_length(self) -> int: ...

else:
    _Number = int


class _Unit(_Number):
    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self)})"

    # Tables are built with f-strings: a unit prints as its bare number.
    def __str__(self) -> str:
        return str(int(self))

    def __format__(self, spec: str) -> str:
        return format(int(self), spec)

    def _other(self, other: object, op: str) -> int | None:
        """``other`` as an int, or None for NotImplemented; TypeError for another unit."""
        if isinstance(other, _Unit) and type(other) is not type(self):
            raise TypeError(
                f"cannot {op} {type(self).__name__} and {type(other).__name__}: convert one first"
            )
        if isinstance(other, bool) or not isinstance(other, int):
            return None
        return int(other)

    def __add__(self, other: Self | int) -> Self:
        o = self._other(other, "add")
        return NotImplemented if o is None else type(self)(int(self) + o)

    def __radd__(self, other: int) -> Self:
        return self.__add__(other)

    def __sub__(self, other: Self | int) -> Self:
        o = self._other(other, "subtract")
        return NotImplemented if o is None else type(self)(int(self) - o)

    def __rsub__(self, other: int) -> Self:
        o = self._other(other, "subtract")
        return NotImplemented if o is None else type(self)(o - int(self))

    def __mul__(self, other: int) -> Self:
        factor: object = other  # a caller without a checker may pass anything
        if isinstance(factor, _Unit):
            raise TypeError(f"cannot multiply {type(self).__name__} by a unit")
        if isinstance(factor, bool) or not isinstance(factor, int):
            return NotImplemented
        return type(self)(int(self) * factor)

    def __rmul__(self, other: int) -> Self:
        return self.__mul__(other)

    @overload
    def __floordiv__(self, other: Self) -> int: ...
    @overload
    def __floordiv__(self, other: int) -> Self: ...
    def __floordiv__(self, other: Self | int) -> Self | int:
        # Same unit / same unit is a plain count; unit / int stays a unit.
        if isinstance(other, _Unit):
            self._other(other, "divide")
            return int(self) // int(other)
        if isinstance(other, bool) or not isinstance(other, int):
            return NotImplemented
        return type(self)(int(self) // other)

    def __mod__(self, other: Self | int) -> Self:
        o = self._other(other, "take the remainder of")
        return NotImplemented if o is None else type(self)(int(self) % o)

    def __lt__(self, other: Self | int) -> bool:
        o = self._other(other, "compare")
        return NotImplemented if o is None else int(self) < o

    def __le__(self, other: Self | int) -> bool:
        o = self._other(other, "compare")
        return NotImplemented if o is None else int(self) <= o

    def __gt__(self, other: Self | int) -> bool:
        o = self._other(other, "compare")
        return NotImplemented if o is None else int(self) > o

    def __ge__(self, other: Self | int) -> bool:
        o = self._other(other, "compare")
        return NotImplemented if o is None else int(self) >= o

    # Narrower than object.__eq__ on purpose: see the module docstring.
    def __eq__(self, other: Self | int) -> bool:  # type: ignore[override]
        if isinstance(other, _Unit) and type(other) is not type(self):
            return False
        if not isinstance(other, int):
            return NotImplemented
        return int(self) == int(other)

    def __ne__(self, other: Self | int) -> bool:  # type: ignore[override]
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def __hash__(self) -> int:
        return hash(int(self))

    def round_up(self, step: int) -> Self:
        """The least multiple of ``step`` (a plain count of this unit) that
        is at least this: ``Sectors(9).round_up(8) == Sectors(16)``."""
        return type(self)(-(-int(self) // _step(step)) * step)

    def round_down(self, step: int) -> Self:
        """The greatest multiple of ``step`` that is at most this."""
        return type(self)(int(self) // _step(step) * step)


class Bytes(_Unit):
    """A size in bytes."""

    __slots__ = ()

    def sectors(self) -> Sectors:
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

    def whole_sectors(self) -> Sectors:
        """The whole sectors in this size (a part sector at its end left out)."""
        return Sectors(int(self) // SECTOR_SIZE)

    def sectors_up(self) -> Sectors:
        """The sectors this size takes (a part sector at its end counts)."""
        return Sectors(-(-int(self) // SECTOR_SIZE))


class Sectors(_Unit):
    """A count of 512-byte sectors."""

    __slots__ = ()

    def bytes(self) -> Bytes:
        """This size in bytes."""
        return Bytes(int(self) * SECTOR_SIZE)

    def data_blocks(self, block_size: Sectors) -> DataBlocks:
        """Whole data blocks of ``block_size`` sectors in this many sectors
        (rounded down)."""
        _require(block_size, Sectors, "block_size")
        return DataBlocks(int(self) // int(block_size))


class DataBlocks(_Unit):
    """A count of thin-pool data blocks (the block size is in sectors)."""

    __slots__ = ()

    def sectors(self, block_size: Sectors) -> Sectors:
        """These blocks in sectors, for blocks of ``block_size`` sectors."""
        _require(block_size, Sectors, "block_size")
        return Sectors(int(self) * int(block_size))


class MetaBlocks(_Unit):
    """A count of 4 KiB thin-pool metadata blocks."""

    __slots__ = ()

    def bytes(self) -> Bytes:
        """These metadata blocks in bytes."""
        return Bytes(int(self) * META_BLOCK_SIZE)


def _step(step: object) -> int:
    """A rounding step: a positive plain ``int`` (not a unit)."""
    if isinstance(step, _Unit | bool) or not isinstance(step, int):
        raise TypeError(f"a rounding step is a plain int, not {type(step).__name__}")
    if step <= 0:
        raise ValueError(f"a rounding step must be positive, not {step}")
    return step


def _require(value: object, cls: type[_Unit], what: str) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"{what} must be {cls.__name__}, not {type(value).__name__}")


_SUFFIXES: dict[str, int] = {
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
    "E": 1 << 60,
    "EB": 1 << 60,
    "EIB": 1 << 60,
    "S": SECTOR_SIZE,  # sectors, as in LVM's "s" suffix
}
_SIZE_RE = re.compile(r"\s*(\d+)(?:\.(\d+))?\s*([A-Za-z]*)\s*\Z", re.ASCII)

#: The largest size accepted: the kernel refuses a device that ends past
#: ``LLONG_MAX >> 9`` sectors ("too large device"), and a loop file's size
#: is a signed 64-bit offset.  That is 8 EiB less one sector.
MAX_SIZE: int = (((1 << 63) - 1) >> 9) * SECTOR_SIZE
# Digits beyond these can only give a size past MAX_SIZE (whole part) or
# a fraction of a byte (fraction part, trailing zeros dropped: a suffix
# multiplies by at most 2**60).  Checked before int() so that a long
# string costs nothing and never hits int()'s own digit limit.
_MAX_WHOLE_DIGITS = len(str(MAX_SIZE))
_MAX_FRACTION_DIGITS = 60


def _shown(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut short so that an error line stays one line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _not_a_size(value: str, what: str) -> ValueError:
    """The ValueError for a string that is not a size, saying why."""
    if not value.isascii():
        odd = next(c for c in value if not c.isascii())
        return ValueError(
            f"{what} {_shown(value)} is not a size: it has the non-ASCII character "
            f"{odd!a}; use ASCII digits 0-9, e.g. '512M'"
        )
    return ValueError(
        f"{what} {_shown(value)} is not a size: use bytes or a number with "
        f"K, M, G, T, P, E or s (sectors), e.g. '512M'"
    )


def _too_large(value: object, what: str) -> ValueError:
    return ValueError(
        f"{what} {_shown(value)} is too large: the largest device Linux can address "
        f"is {MAX_SIZE} bytes (8 EiB less one sector)"
    )


def _parse_size_text(value: str, what: str) -> Bytes:
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


#: What :func:`parse_size` takes: bytes as an ``int`` or ``Bytes``,
#: ``Sectors``, or a string such as ``"10G"``.  For parameters that take a
#: size from a user.
SizeLike: TypeAlias = int | str | Bytes | Sectors


def parse_size(value: SizeLike, *, what: str = "size") -> Bytes:
    """Turn ``value`` into ``Bytes``.

    Accepts an int (bytes), ``Bytes``, ``Sectors``, or a string such as
    ``"4096"``, ``"64K"``, ``"512M"``, ``"10G"``, ``"1.5G"`` or ``"2048s"``
    (sectors).  Suffixes are binary (K = 1024; K, M, G, T, P and E) and
    case-insensitive.  Strings are ASCII only: digits 0-9, an optional ``.`` fraction, an
    optional suffix, spaces around them.  No sign, exponent, underscore
    or non-ASCII digit.

    Raises:
        ValueError: unparsable, negative or zero, larger than
            :data:`MAX_SIZE` (8 EiB less one sector), or not a whole number
            of 512-byte sectors; the message names ``what`` and the value.
        TypeError: another type (for instance ``DataBlocks``, whose size
            depends on the pool).
    """
    return _checked_size(value, what)


def _checked_size(value: object, what: str) -> Bytes:
    # parse_size's body, on ``object``: callers without a checker pass anything.
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


def format_size(value: Bytes | int) -> str:
    """A short human-readable size: ``Bytes(1536) -> '1.5 KiB'``."""
    n = float(int(value))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    return f"{n} PiB"  # pragma: no cover
