"""Layer tars written in memory, as Docker and containerd hand them over:
PAX format, a fixed mtime, and the entry kinds a layer holds."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple

#: Every entry's modification time (the tars come out the same each run).
MTIME = 1700000000

Kind = Literal["file", "dir", "sym", "link"]


class Entry(NamedTuple):
    """One member: ``data`` is a file's bytes, or a link's target."""

    name: str
    kind: Kind
    data: bytes | str | None = None
    mode: int | None = None  # default 0755 for a directory, 0644 else
    uid: int = 0
    gid: int = 0
    xattrs: Mapping[str, str] | None = None


def tar_bytes(entries: Iterable[Entry | tuple[object, ...]]) -> bytes:
    """A tar of ``entries`` (each an :class:`Entry`, or a tuple of its fields)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for fields in entries:
            entry = Entry(*fields)  # type: ignore[arg-type]
            info = tarfile.TarInfo(entry.name)
            default = 0o755 if entry.kind == "dir" else 0o644
            info.mode = default if entry.mode is None else entry.mode
            info.uid, info.gid, info.mtime = entry.uid, entry.gid, MTIME
            if entry.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in entry.xattrs.items()}
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind in ("sym", "link"):
                info.type = tarfile.SYMTYPE if entry.kind == "sym" else tarfile.LNKTYPE
                info.linkname = str(entry.data)
                tar.addfile(info)
            else:
                data = entry.data if isinstance(entry.data, bytes) else b""
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
