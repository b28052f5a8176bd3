"""How much metadata a pool needs to map its data: the kernel's space-map
arithmetic, so that a growth the kernel would refuse is refused first.

When a pool's data device grows, the kernel extends the *data space map*
in the pool's metadata on the next resume: one 4 KiB bitmap block for
every 16,320 data blocks (two bits each, after a 16-byte header), plus an
entry for each bitmap in the space map's index btree.  Those blocks come
out of the metadata's free space.  If they do not fit, the resume fails
with ENOSPC, and the kernel aborts the metadata transaction, flags the
pool ``needs_check`` and switches it to read-only: the pool is wrecked
until an offline ``thin_check``.  The kernel also keeps a reserve of
metadata blocks (a tenth of the device, at most 4096 blocks) that normal
operation must not eat into; libdm keeps it free too, so that a grown
pool still has room to map the data it was grown for.

Measured in the test kernel (2 MiB of metadata, 64 KiB blocks): every
bitmap cost one metadata block, the index a few more per hundred; growth
to 400 GiB left the pool read-write, 450 GiB filled the metadata and
500 GiB was refused by the kernel.  :func:`blocks_needed` errs on the
side of more.
"""

from __future__ import annotations

from libdm.thin.units import Bytes, DataBlocks, MetaBlocks

__all__ = [
    "ENTRIES_PER_BITMAP",
    "MAX_METADATA_BLOCKS",
    "METADATA_BLOCK",
    "blocks_needed",
    "fits",
    "metadata_size_needed",
    "reserve",
]

METADATA_BLOCK: int = 4096
#: Data blocks one space-map bitmap block covers: 2 bits each after a
#: 16-byte header.
ENTRIES_PER_BITMAP: int = (METADATA_BLOCK - 16) * 4
#: The most metadata the kernel uses: 255 * 2^14 blocks of 4 KiB (16 GiB).
MAX_METADATA_BLOCKS: int = 255 * (1 << 14)
# Index btree entries (8-byte key, 16-byte value) per node, counted half
# full, as nodes are after a split.
_INDEX_ENTRIES_PER_NODE = (METADATA_BLOCK - 32) // 24 // 2
# Shadowed nodes along the btree path and space-map blocks touched.
_PATH_BLOCKS = 8


def _bitmaps(blocks: DataBlocks | MetaBlocks | int) -> int:
    return -(-int(blocks) // ENTRIES_PER_BITMAP)


def blocks_needed(old_blocks: DataBlocks | int, new_blocks: DataBlocks | int) -> int:
    """Metadata blocks the kernel takes to grow the data space map from
    ``old_blocks`` to ``new_blocks`` data blocks (0 for no growth)."""
    added = _bitmaps(new_blocks) - _bitmaps(old_blocks)
    if added <= 0:
        return 0
    return added + -(-added // _INDEX_ENTRIES_PER_NODE) + _PATH_BLOCKS


def reserve(total_blocks: MetaBlocks | int) -> int:
    """The metadata blocks the kernel keeps in reserve for a metadata
    device of ``total_blocks``; the pool status counts them as used."""
    return min(4096, int(total_blocks) // 10)


def fits(
    used_blocks: MetaBlocks | int, total_blocks: MetaBlocks | int, needed: MetaBlocks | int
) -> bool:
    """True if ``needed`` more metadata blocks fit in what the pool status
    shows free (``used_blocks`` of ``total_blocks``, the reserve counted
    as used): the pool stays read-write after the growth."""
    return int(used_blocks) + int(needed) <= int(total_blocks)


def metadata_size_needed(
    used_blocks: MetaBlocks | int,
    total_blocks: MetaBlocks | int,
    old_data_blocks: DataBlocks | int,
    new_data_blocks: DataBlocks | int,
) -> Bytes | None:
    """The smallest metadata size (``Bytes``, a whole MiB) that maps
    ``new_data_blocks`` with a quarter of the growth's cost to spare, given
    the pool status's ``used_blocks`` of ``total_blocks`` now; ``None`` if
    even the kernel's 16 GiB maximum cannot.

    A larger metadata device has a larger reserve, and its own space map
    costs blocks too.
    """
    needed = blocks_needed(old_data_blocks, new_data_blocks)
    in_use = int(used_blocks) - reserve(total_blocks)
    step = (1 << 20) // METADATA_BLOCK
    total = max(-(-int(total_blocks) // step) * step, step)
    while total <= MAX_METADATA_BLOCKS:
        want = in_use + reserve(total) + needed + needed // 4 + _bitmaps(total)
        if want <= total:
            return Bytes(total * METADATA_BLOCK)
        total = max(total + step, -(-want // step) * step)
    return None
