"""A table line as a value: start, length, target type and params.

Start and length are in 512-byte sectors, as the kernel counts them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Self, TypeAlias, cast

from libdm.dm.units import Sectors
from libdm.dm.validate import check_params, check_target_type

__all__ = ["MAX_SECTORS", "Target", "TargetLike", "check_table"]


class _TargetFields(NamedTuple):
    start: Sectors
    length: Sectors
    type: str
    params: str = ""


class Target(_TargetFields):
    """One line of a device-mapper table.

    Attributes:
        start: first sector of the device this target maps (``Sectors``;
            a plain ``int`` given here is taken as sectors).
        length: number of sectors it maps (``Sectors``, likewise).
        type: the target type, e.g. ``"linear"``, ``"zero"``, ``"thin-pool"``.
        params: the target's parameter string, as in a ``dmsetup`` table.
    """

    __slots__ = ()

    def __new__(
        cls, start: Sectors | int, length: Sectors | int, type: str, params: str = ""
    ) -> Self:
        # Anything but an int is kept as it is, for check_table to refuse.
        return super().__new__(cls, _sectors(start), _sectors(length), type, params)

    def __str__(self) -> str:
        return f"{self.start} {self.length} {self.type} {self.params}".rstrip()

    @classmethod
    def parse(cls, line: str) -> Self:
        """Parse one table line ``"<start> <length> <type> [params]"``.

        Raises:
            ValueError: naming the field (start, length or type) that is
                missing or not a number.
        """
        fields = line.strip().split(None, 3)
        if len(fields) < 3:
            raise ValueError(f"table line {line!r} needs at least start, length and type")
        for pos, field in enumerate(("start", "length")):
            if not (fields[pos].isascii() and fields[pos].isdigit()):
                raise ValueError(
                    f"table line {line!r}: {field} {fields[pos]!r} is not a "
                    f"whole number of sectors"
                )
        return cls(int(fields[0]), int(fields[1]), fields[2], fields[3] if len(fields) > 3 else "")


#: The kernel's limit: a table ends by this sector (its end in bytes must
#: fit a signed 64-bit offset); past it the kernel says "too large device".
MAX_SECTORS: int = (1 << 54) - 1


def _sectors(value: Sectors | int) -> Sectors:
    given: object = value
    if type(given) is int:
        return Sectors(given)
    # Sectors; or, from a caller without a checker, anything, kept as it is
    # so that check_table can say what is wrong with it.
    return cast(Sectors, given)


#: What :func:`check_table` takes for a target: a ``Target``, or a tuple of
#: its fields (start and length in sectors).
TargetLike: TypeAlias = (
    Target
    | tuple[Sectors | int, Sectors | int, str]
    | tuple[Sectors | int, Sectors | int, str, str]
)


def check_table(targets: Iterable[TargetLike]) -> tuple[Target, ...]:
    """Validate a table before it is loaded and return it as a tuple.

    The targets must be ``Target`` values (or 4-tuples) that start at
    sector 0 and follow each other with no gap or overlap, each with a
    positive length.

    Raises:
        ValueError: an empty table, a gap, an overlap, a non-positive
            length, a table ending past :data:`MAX_SECTORS`, or bad type
            or params (see :mod:`libdm.dm.validate`).
        TypeError: a target that is not a 3- or 4-tuple of the right types.
    """
    given: object = targets
    if isinstance(given, Target | str):
        raise TypeError("targets must be a sequence of Target values")
    # Target() again for a Target too: it makes any plain int field Sectors.
    table = tuple(Target(*t) for t in targets)
    if not table:
        raise ValueError("a table needs at least one target")
    expected = Sectors(0)
    for t in table:
        for field, value in (("start", t.start), ("length", t.length)):
            field_value: object = value
            if not isinstance(field_value, Sectors):
                raise TypeError(
                    f"target {field} must be an int number of sectors, "
                    f"not {type(field_value).__name__}"
                )
        if t.length <= 0:
            raise ValueError(f"target {t}: length must be a positive number of sectors")
        if t.start != expected:
            raise ValueError(
                f"target {t}: starts at sector {t.start}, expected {expected} "
                f"(targets must follow each other with no gap or overlap)"
            )
        check_target_type(t.type)
        check_params(t.params)
        expected = t.start + t.length
    if expected > MAX_SECTORS:
        raise ValueError(
            f"the table ends at sector {expected}, past the kernel's limit of "
            f"{MAX_SECTORS} sectors (8 EiB)"
        )
    return table
