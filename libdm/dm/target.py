"""A table line as a value: start, length, target type and params.

Start and length are in 512-byte sectors, as the kernel counts them.
"""

from typing import NamedTuple

from libdm.dm.validate import check_params, check_target_type

__all__ = ["MAX_SECTORS", "Target", "check_table"]


class Target(NamedTuple):
    """One line of a device-mapper table.

    Attributes:
        start: first sector of the device this target maps (512-byte sectors).
        length: number of sectors it maps.
        type: the target type, e.g. ``"linear"``, ``"zero"``, ``"thin-pool"``.
        params: the target's parameter string, as in a ``dmsetup`` table.
    """

    start: int
    length: int
    type: str
    params: str = ""

    def __str__(self):
        return f"{self.start} {self.length} {self.type} {self.params}".rstrip()

    @classmethod
    def parse(cls, line):
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
MAX_SECTORS = (1 << 54) - 1


def check_table(targets):
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
    if isinstance(targets, (Target, str)):
        raise TypeError("targets must be a sequence of Target values")
    table = tuple(t if isinstance(t, Target) else Target(*t) for t in targets)
    if not table:
        raise ValueError("a table needs at least one target")
    expected = 0
    for t in table:
        for field in ("start", "length"):
            value = getattr(t, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"target {field} must be an int number of sectors")
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
