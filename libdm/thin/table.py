"""Thin-pool and thin target parameters that round-trip with the kernel.

``str(params)`` is the params string to load; ``parse(text)`` reads back
what the kernel reports in ``table`` output, and for a table this library
loaded the two are equal.  Devices are given as ``major:minor``, which is
how the kernel reports them (a path would come back as numbers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypedDict, Unpack

from libdm.thin.units import Bytes, DataBlocks, MetaBlocks, Sectors

__all__ = [
    "FEATURES",
    "MAX_BLOCK_SIZE",
    "MAX_THIN_ID",
    "MIN_BLOCK_SIZE",
    "ThinParams",
    "ThinPoolParams",
    "check_block_size",
    "check_thin_id",
]

# In the order the kernel prints them.
FEATURES: tuple[str, ...] = (
    "skip_block_zeroing",
    "ignore_discard",
    "no_discard_passdown",
    "read_only",
    "error_if_no_space",
)
MIN_BLOCK_SIZE = Sectors(128)  # 64 KiB
MAX_BLOCK_SIZE = Sectors(2097152)  # 1 GiB
MAX_THIN_ID: int = (1 << 24) - 1

_DEVNO = re.compile(r"\d+:\d+\Z")


def check_block_size(block_size: Sectors | int) -> Sectors:
    """Return ``block_size`` as ``Sectors`` if the kernel accepts it: 128 to
    2097152 sectors (64 KiB to 1 GiB), a multiple of 128.

    Raises:
        ValueError: out of range or not a multiple of 128, with the rule.
        TypeError: another unit (``Bytes``: convert with ``.sectors()``).
    """
    given: object = block_size
    if isinstance(given, Bytes | DataBlocks | MetaBlocks):
        raise TypeError(
            f"data block size must be Sectors, not {type(given).__name__}: convert it first"
        )
    bs = Sectors(block_size)
    if not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE or bs % 128:
        raise ValueError(
            f"data block size {int(bs)} sectors is invalid: it must be a multiple "
            f"of 128 sectors (64 KiB) between 128 and 2097152 (1 GiB)"
        )
    return bs


def check_thin_id(thin_id: int) -> int:
    """Return ``thin_id`` if it is a valid 24-bit thin device id.

    Raises:
        ValueError: negative or above 2^24 - 1.
    """
    given: object = thin_id
    if isinstance(given, bool) or not isinstance(given, int):
        raise TypeError(f"thin id must be an int, not {type(given).__name__}")
    if not 0 <= thin_id <= MAX_THIN_ID:
        raise ValueError(f"thin id {thin_id} is outside 0..{MAX_THIN_ID} (24 bits)")
    return thin_id


def _check_dev(value: object, what: str) -> str:
    if not isinstance(value, str) or not _DEVNO.match(value):
        raise ValueError(f"{what} {value!r} must be a device number 'major:minor'")
    return value


def _int_field(fields: list[str], pos: int, what: str, text: str) -> int:
    try:
        value = fields[pos]
    except IndexError:
        raise ValueError(f"{text!r}: field {pos + 1} ({what}) is missing") from None
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"{text!r}: field {pos + 1} ({what}) is {value!r}, not a number")
    return int(value)


@dataclass(frozen=True)
class ThinPoolParams:
    """Parameters of a ``thin-pool`` target.

    Attributes:
        metadata_dev: the metadata device, ``"major:minor"``.
        data_dev: the data device, ``"major:minor"``.
        block_size: the data block size in ``Sectors`` (128..2097152, a
            multiple of 128). It can never change once the pool exists.
        low_water_mark: free ``DataBlocks`` below which the pool raises an
            event.
        features: a subset of :data:`FEATURES`.
    """

    metadata_dev: str
    data_dev: str
    block_size: Sectors
    low_water_mark: DataBlocks = DataBlocks(0)  # noqa: RUF009 (immutable)
    features: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        _check_dev(self.metadata_dev, "metadata device")
        _check_dev(self.data_dev, "data device")
        object.__setattr__(self, "block_size", check_block_size(self.block_size))
        if int(self.low_water_mark) < 0:
            raise ValueError("low water mark must be >= 0 data blocks")
        object.__setattr__(self, "low_water_mark", DataBlocks(self.low_water_mark))
        given: Iterable[str] = self.features  # any iterable of names, kept as a frozenset
        features = frozenset(given)
        unknown = sorted(features - set(FEATURES))
        if unknown:
            raise ValueError(
                f"unknown thin-pool feature {', '.join(unknown)}; known: {', '.join(FEATURES)}"
            )
        object.__setattr__(self, "features", features)

    def __str__(self) -> str:
        feats = [f for f in FEATURES if f in self.features]
        return " ".join(
            [
                self.metadata_dev,
                self.data_dev,
                str(self.block_size),
                str(self.low_water_mark),
                str(len(feats)),
                *feats,
            ]
        )

    @classmethod
    def parse(cls, text: str) -> ThinPoolParams:
        """Parse thin-pool params as the kernel prints them in a table.

        Raises:
            ValueError: naming the field position and what it should hold.
        """
        fields = text.split()
        if len(fields) < 4:
            raise ValueError(
                f"{text!r}: thin-pool params need metadata dev, data dev, block "
                f"size and low water mark"
            )
        block_size = _int_field(fields, 2, "data block size", text)
        lwm = _int_field(fields, 3, "low water mark", text)
        count = _int_field(fields, 4, "feature count", text) if len(fields) > 4 else 0
        feats = fields[5:]
        if len(feats) != count:
            raise ValueError(
                f"{text!r}: field 5 says {count} feature args but {len(feats)} follow"
            )
        return cls(fields[0], fields[1], Sectors(block_size), DataBlocks(lwm), frozenset(feats))

    def replace(self, **changes: Unpack[_PoolParamChanges]) -> ThinPoolParams:
        """A copy with some fields changed (validated again)."""
        values: _PoolParamFields = {
            "metadata_dev": self.metadata_dev,
            "data_dev": self.data_dev,
            "block_size": self.block_size,
            "low_water_mark": self.low_water_mark,
            "features": self.features,
        }
        values.update(changes)
        return ThinPoolParams(**values)


class _PoolParamChanges(TypedDict, total=False):
    metadata_dev: str
    data_dev: str
    block_size: Sectors
    low_water_mark: DataBlocks
    features: frozenset[str]


class _PoolParamFields(TypedDict):
    metadata_dev: str
    data_dev: str
    block_size: Sectors
    low_water_mark: DataBlocks
    features: frozenset[str]


@dataclass(frozen=True)
class ThinParams:
    """Parameters of a ``thin`` target.

    Attributes:
        pool_dev: the pool device, ``"major:minor"`` (a ``/dev/mapper``
            path would need the node to exist, which it may not yet).
        thin_id: the 24-bit device id inside the pool.
        external_origin: an optional read-only origin device, ``"major:minor"``.
    """

    pool_dev: str
    thin_id: int
    external_origin: str | None = None

    def __post_init__(self) -> None:
        _check_dev(self.pool_dev, "pool device")
        check_thin_id(self.thin_id)
        if self.external_origin is not None:
            _check_dev(self.external_origin, "external origin")

    def __str__(self) -> str:
        parts = [self.pool_dev, str(self.thin_id)]
        if self.external_origin is not None:
            parts.append(self.external_origin)
        return " ".join(parts)

    @classmethod
    def parse(cls, text: str) -> ThinParams:
        """Parse thin params from a table.

        Raises:
            ValueError: naming the field that did not parse.
        """
        fields = text.split()
        if len(fields) not in (2, 3):
            raise ValueError(
                f"{text!r}: thin params are '<pool dev> <dev id> [<external origin>]'"
            )
        thin_id = _int_field(fields, 1, "device id", text)
        return cls(fields[0], thin_id, fields[2] if len(fields) == 3 else None)
