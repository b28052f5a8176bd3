"""The unit types, where the thin-pool model has always imported them from.

They live in :mod:`libdm.dm.units` (layer 2), because a table line's start
and length are already sectors; they are re-exported here unchanged.
"""

from libdm.dm.units import (
    MAX_SIZE,
    META_BLOCK_SIZE,
    SECTOR_SIZE,
    Bytes,
    DataBlocks,
    MetaBlocks,
    Sectors,
    SizeLike,
    format_size,
    parse_size,
)

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
