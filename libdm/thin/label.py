"""The label libdm writes at the start of each block device a pool uses.

A path is not an identity: after a reboot ``/dev/sdb`` may be another
disk of the same size, and loop devices come up in any order.  So, as
LVM does with its physical volume label, libdm writes a small label in
the first sector of each block device a block pool is made on or
extended onto (and of a repair's spare device), naming the pool (its
token), the device's role and its index, and maps the pool's pieces only
from :data:`RESERVED` sectors on.  Before using a device the pool reads
the label at the recorded path; when another device is there, it looks
for the device carrying its label, and refuses when none does.

On disk (little-endian): the 16-byte magic ``LIBDM-DEVLABEL01``, the
body's length and CRC-32 (two 32-bit words), then the body, a JSON
object ``{"token", "pool", "directory", "role", "index"}``; the whole fits
in :data:`LABEL_BYTES`.

Pools made before labels have none and map from sector 0: they are
identified by path and size only.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from dataclasses import dataclass

from libdm.dm.blockdev import list_block_devices, read_head, size_bytes, write_head
from libdm.thin.units import Sectors

__all__ = [
    "LABEL_BYTES",
    "RESERVED",
    "DeviceLabel",
    "LabelRef",
    "Role",
    "erase_label",
    "find_labelled",
    "read_label",
    "write_label",
]

#: The pool's pieces start this far into a labelled device (1 MiB, as LVM
#: aligns its data area): the label and room to spare.
RESERVED = Sectors(2048)
#: What is read and written of a device's start for its label.
LABEL_BYTES = 4096

_MAGIC = b"LIBDM-DEVLABEL01"
_HEAD = struct.Struct("<16sII")


class Role(enum.StrEnum):
    """What a labelled device is to its pool."""

    DATA = "data"
    META = "meta"
    SPARE = "spare"


@dataclass(frozen=True)
class LabelRef:
    """What a pool records of the label it wrote on a device: enough,
    with the pool's token, to tell that label from any other."""

    role: Role
    index: int

    def to_json(self) -> dict[str, str | int]:
        return {"role": self.role.value, "index": self.index}

    @classmethod
    def parse(cls, value: object) -> LabelRef | None:
        """From the stored form, or ``None`` if it is not one."""
        if not isinstance(value, dict):
            return None
        role, index = value.get("role"), value.get("index")
        if role not in {r.value for r in Role} or not _count(index):
            return None
        assert isinstance(index, int)
        return cls(Role(role), index)

    def __str__(self) -> str:
        return f"{self.role.value} device #{self.index}"


@dataclass(frozen=True)
class DeviceLabel:
    """A device's label.

    Attributes:
        token: the token of the pool that wrote it (its configuration's).
        pool: that pool's name when it wrote it.
        directory: that pool's state directory.
        role, index: what the device is to the pool.
    """

    token: str
    pool: str
    directory: str
    role: Role
    index: int

    @property
    def ref(self) -> LabelRef:
        return LabelRef(self.role, self.index)

    def encode(self) -> bytes:
        body = json.dumps(
            {
                "token": self.token,
                "pool": self.pool,
                "directory": self.directory,
                "role": self.role.value,
                "index": self.index,
            },
            sort_keys=True,
        ).encode()
        raw = _HEAD.pack(_MAGIC, len(body), zlib.crc32(body)) + body
        if len(raw) > LABEL_BYTES:
            raise ValueError(f"a device label of {len(raw)} bytes does not fit {LABEL_BYTES}")
        return raw + bytes(LABEL_BYTES - len(raw))

    @classmethod
    def decode(cls, head: bytes) -> DeviceLabel | None:
        """The label at the start of ``head``, or ``None`` if there is none
        (or a damaged one: its checksum fails)."""
        if len(head) < _HEAD.size or not head.startswith(_MAGIC):
            return None
        _, length, crc = _HEAD.unpack_from(head)
        body = head[_HEAD.size : _HEAD.size + length]
        if len(body) != length or zlib.crc32(body) != crc:
            return None
        try:
            fields = json.loads(body)
            ref = LabelRef.parse(fields)
            if ref is None:
                return None
            return cls(
                str(fields["token"]),
                str(fields["pool"]),
                str(fields["directory"]),
                ref.role,
                ref.index,
            )
        except (ValueError, KeyError, TypeError):
            return None

    def is_of(self, token: str, ref: LabelRef) -> bool:
        """True if this is the label ``token``'s pool wrote as ``ref``."""
        return self.token == token and self.ref == ref

    def __str__(self) -> str:
        return f"the {self.ref} of libdm pool {self.pool!r} (state in {self.directory})"


def read_label(path: str) -> DeviceLabel | None:
    """The label of the device at ``path``, or ``None``."""
    return DeviceLabel.decode(read_head(path, LABEL_BYTES))


def write_label(path: str, label: DeviceLabel) -> None:
    """Write ``label`` at the start of the device at ``path``."""
    write_head(path, label.encode())


def erase_label(path: str, token: str) -> bool:
    """Zero the label of the device at ``path`` if ``token``'s pool wrote
    it (never another's); True if it did."""
    found = read_label(path)
    if found is None or found.token != token:
        return False
    write_head(path, bytes(LABEL_BYTES))
    return True


def find_labelled(token: str, ref: LabelRef, min_size: int) -> list[str]:
    """The block devices of at least ``min_size`` bytes that carry the
    label ``token``'s pool wrote as ``ref``."""
    found = []
    for path in list_block_devices():
        try:
            if size_bytes(path) < min_size:
                continue
            label = read_label(path)
        except OSError:
            continue
        if label is not None and label.is_of(token, ref):
            found.append(path)
    return found


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
