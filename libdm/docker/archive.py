"""Docker's layer tar streams on a mounted layer, with the standard library.

Docker's proxy for graph-driver plugins has no fallback for Diff, Changes,
ApplyDiff and DiffSize, so the plugin does what Docker's own "naive diff"
does for drivers without a native diff (``pkg/archive`` in Docker):

* :func:`apply_layer` unpacks a layer tar into a directory: whiteouts
  (``.wh.NAME``) delete, an opaque directory (``.wh..wh..opq``) hides
  everything its parents gave it, hard links, modes (setuid, setgid,
  sticky), owners, extended attributes and times are kept, and runs of
  zeros in a file's data become holes (a sparse file stays sparse).
* :func:`changes` lists what differs between a layer and its parent
  (Docker's ``ChangesDirs``), :func:`changes_size` sums the sizes of what
  was added or modified, and :func:`export_changes` writes a layer tar of
  those changes, deletions as whiteouts.

Every path in a layer tar is resolved inside the layer's root, as if the
root were ``/``: a symbolic link in the layer never leads a write outside
it.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Iterator
from typing import IO

__all__ = [
    "OPAQUE",
    "WHITEOUT_PREFIX",
    "Change",
    "ChangeKind",
    "LayerError",
    "apply_layer",
    "changes",
    "changes_size",
    "export_changes",
]

WHITEOUT_PREFIX = ".wh."
#: Names Docker's aufs driver kept for itself at a layer's top level.
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE = ".wh..wh..opq"
#: Extended attributes a layer tar carries out of a layer (Docker carries
#: only file capabilities; user attributes are the owner's own data).
_EXPORTED_XATTRS = ("security.capability",)
_XATTR_KEY = "SCHILY.xattr."
_CHUNK = 1 << 16
_MAX_SYMLINKS = 40


class LayerError(ValueError):
    """A layer tar that cannot be applied (a path that leaves the layer,
    a hard link to nothing, an unknown entry type)."""


class ChangeKind(enum.IntEnum):
    """Docker's ``archive.ChangeType`` values (their numbers are its wire format)."""

    MODIFY = 0
    ADD = 1
    DELETE = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One change: ``path`` is absolute within the layer (``/etc/hosts``)."""

    path: str
    kind: ChangeKind

    def __str__(self) -> str:
        return f"{'CAD'[self.kind]} {self.path}"


# -- paths inside a root -------------------------------------------------------------


def _clean(name: str) -> str:
    """A tar entry's name as a relative path inside the layer ("" for its root).

    Raises:
        LayerError: the name climbs out of the layer.
    """
    rel = posixpath.normpath(name.lstrip("/"))
    if rel == ".":
        return ""
    if rel == ".." or rel.startswith("../"):
        raise LayerError(f"the layer entry {name!r} leaves the layer")
    return rel


def _resolve(root: str, rel: str, *, follow_last: bool = False) -> str:
    """The real path of ``rel`` (relative to ``root``), every symbolic
    link met on the way resolved inside ``root`` as if it were ``/``.  The
    last component is left as it is unless ``follow_last``."""
    parts = [p for p in rel.split("/") if p]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        if not parts and not follow_last:
            done.append(part)
            break
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            done.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise LayerError(f"too many symbolic links under /{rel}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        done.append(part)
    return os.path.join(root, *done)


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


# -- applying a layer ----------------------------------------------------------------


def _write_sparse(fd: int, src: IO[bytes], size: int) -> None:
    """Copy ``size`` bytes, leaving holes where whole chunks are zero."""
    zero = bytes(_CHUNK)
    left = size
    while left > 0:
        chunk = src.read(min(_CHUNK, left))
        if not chunk:
            raise LayerError("the layer tar ends inside a file")
        if chunk == zero[: len(chunk)]:
            os.lseek(fd, len(chunk), os.SEEK_CUR)
        else:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        left -= len(chunk)
    os.ftruncate(fd, size)


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    out = {}
    for key, value in member.pax_headers.items():
        if key.startswith(_XATTR_KEY):
            out[key[len(_XATTR_KEY) :]] = value.encode("utf-8", "surrogateescape")
    return out


def _times(member: tarfile.TarInfo) -> tuple[int, int]:
    mtime = int(float(member.pax_headers.get("mtime", member.mtime)) * 1e9)
    atime = int(float(member.pax_headers.get("atime", 0)) * 1e9)
    # As Docker: an access time never before the modification time.
    return max(atime, mtime), mtime


def _create(root: str, path: str, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
    mode = member.mode & 0o7777
    if member.isdir():
        if not os.path.lexists(path):
            os.mkdir(path, 0o700)
    elif member.isreg():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            src = tar.extractfile(member)
            assert src is not None  # a regular file has data
            _write_sparse(fd, src, member.size)
        finally:
            os.close(fd)
    elif member.issym():
        os.symlink(member.linkname, path)
    elif member.islnk():
        target = _resolve(root, _clean(member.linkname))
        if not os.path.lexists(target):
            raise LayerError(f"the hard link /{_clean(member.name)} names a missing file")
        os.link(target, path, follow_symlinks=False)
        return  # a link shares its target's inode: owner, mode and times are the target's
    elif member.ischr() or member.isblk():
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(path, kind | mode, os.makedev(member.devmajor, member.devminor))
    elif member.isfifo():
        os.mkfifo(path, mode)
    else:
        raise LayerError(f"the layer entry {member.name!r} has an unknown type {member.type!r}")
    os.chown(path, member.uid, member.gid, follow_symlinks=False)
    for name, value in _xattrs(member).items():
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
    if not member.issym():
        os.chmod(path, mode)  # after chown, which clears setuid and setgid
        if not member.isdir():
            os.utime(path, ns=_times(member))
    else:
        os.utime(path, ns=_times(member), follow_symlinks=False)


def apply_layer(root: str, stream: IO[bytes]) -> int:
    """Unpack the layer tar read from ``stream`` into ``root`` as Docker
    does (``archive.UnpackLayer``), and read the stream to its end.

    Returns:
        The sum of the entries' sizes, which Docker records as the layer's size.

    Raises:
        LayerError: a path that leaves the layer, a bad link or entry.
        tarfile.TarError: the stream is not a tar.
    """
    size = 0
    # Each directory made, with its identity: its times are set last, on
    # it only, whatever later entries put in its place or above it.
    dirs: list[tuple[str, tuple[int, int], tarfile.TarInfo]] = []
    unpacked: set[str] = set()
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            size += member.size
            rel = _clean(member.name)
            if rel.startswith(WHITEOUT_META_PREFIX) and rel != OPAQUE:
                continue  # aufs's own metadata
            parent, base = posixpath.split(rel)
            parent_path = _resolve(root, parent, follow_last=True)
            if parent and not os.path.lexists(parent_path):
                os.makedirs(parent_path, 0o755)
            if base.startswith(WHITEOUT_PREFIX):
                if base == OPAQUE:
                    _make_opaque(parent_path, unpacked)
                else:
                    _remove(_whiteout_target(root, parent_path, member.name, base))
                continue
            path = os.path.join(parent_path, base) if rel else root
            if rel:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    pass
                else:
                    if not (stat.S_ISDIR(st.st_mode) and member.isdir()):
                        _remove(path)
            _create(root, path, member, tar)
            if member.isdir():
                st = os.lstat(path)
                dirs.append((path, (st.st_dev, st.st_ino), member))
            unpacked.add(path)
        # Read what follows the archive (Docker's layer store digests it all).
        fileobj = tar.fileobj
        while fileobj is not None and fileobj.read(_CHUNK):
            pass
    # Directory times last: creating entries in them changes them.
    for path, identity, member in dirs:
        _set_dir_times(path, identity, _times(member))
    return size


def _set_dir_times(path: str, identity: tuple[int, int], times: tuple[int, int]) -> None:
    """Set the times of the directory ``path`` if it is still the one
    ``identity`` names: a later entry may have replaced it, or a directory
    above it, with a symbolic link out of the layer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return  # replaced or removed by a later entry
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return  # a symbolic link now
        raise
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == identity:
            os.utime(fd, ns=times)
    finally:
        os.close(fd)


def _whiteout_target(root: str, parent_path: str, name: str, base: str) -> str:
    """What the whiteout ``base`` (in ``parent_path``) removes: an entry
    of that directory, never the directory itself or one above it.

    Raises:
        LayerError: the whiteout names ``.``, ``..`` or nothing.
    """
    target = base[len(WHITEOUT_PREFIX) :]
    if target in ("", ".", "..") or "/" in target:
        raise LayerError(
            f"the layer entry {name!r} is a whiteout of {target!r}, which is not a "
            f"name in its directory; nothing was removed"
        )
    path = os.path.join(parent_path, target)
    # _resolve keeps parent_path inside root; this is the last word.
    if os.path.commonpath([root, os.path.dirname(path)]) != os.path.normpath(root):
        raise LayerError(f"the layer entry {name!r} leaves the layer")
    return path


def _make_opaque(directory: str, unpacked: set[str]) -> None:
    """Remove what ``directory`` holds that this layer did not unpack."""
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in list(dirnames):
            path = os.path.join(dirpath, name)
            if path not in unpacked:
                _remove(path)
                dirnames.remove(name)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if path not in unpacked:
                _remove(path)


# -- changes between two trees -------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Node:
    st: os.stat_result
    capability: bytes | None
    children: dict[str, _Node] | None  # None: not a directory


def _capability(path: str) -> bytes | None:
    try:
        return os.getxattr(path, "security.capability", follow_symlinks=False)
    except OSError:
        return None


def _tree(path: str) -> dict[str, _Node]:
    # Iterative: a layer may nest directories deeper than Python recurses.
    out: dict[str, _Node] = {}
    pending = [(path, out)]
    while pending:
        dirpath, children = pending.pop()
        with os.scandir(dirpath) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                sub: dict[str, _Node] | None = {} if stat.S_ISDIR(st.st_mode) else None
                children[entry.name] = _Node(st, _capability(entry.path), sub)
                if sub is not None:
                    pending.append((entry.path, sub))
    return out


def _differs(old: os.stat_result, new: os.stat_result) -> bool:
    # As Docker: sizes and modification times are not compared for
    # directories (creating a file in one changes them).
    if (
        old.st_mode != new.st_mode
        or old.st_uid != new.st_uid
        or old.st_gid != new.st_gid
        or old.st_rdev != new.st_rdev
    ):
        return True
    if stat.S_ISDIR(new.st_mode):
        return False
    return old.st_mtime_ns != new.st_mtime_ns or old.st_size != new.st_size


@dataclasses.dataclass(slots=True)
class _Listing:
    """A directory whose changes are being listed (a frame of the walk)."""

    path: str
    has_node: bool
    added: bool
    at_entry: int
    children: dict[str, _Node]
    olds: dict[str, _Node]
    names: list[str]
    next: int = 0


def _add_changes(
    path: str,
    new: _Node | None,
    new_children: dict[str, _Node],
    old_children: dict[str, _Node] | None,
    added: bool,
    out: list[Change],
) -> None:
    # Iterative (a stack of listings): a layer may nest directories deeper
    # than Python recurses.
    stack = [
        _Listing(
            path,
            new is not None,
            added,
            len(out),
            new_children,
            dict(old_children or {}),
            sorted(new_children),
        )
    ]
    while stack:
        top = stack[-1]
        if top.next < len(top.names):
            name = top.names[top.next]
            top.next += 1
            child = top.children[name]
            child_path = f"{top.path}/{name}"
            old = top.olds.pop(name, None)
            child_added = old is None
            if old is None:
                out.append(Change(child_path, ChangeKind.ADD))
            elif _differs(old.st, child.st) or old.capability != child.capability:
                out.append(Change(child_path, ChangeKind.MODIFY))
                child_added = True
            if child.children is not None:
                old_grand = old.children if old is not None and old.children is not None else None
                stack.append(
                    _Listing(
                        child_path,
                        True,
                        child_added,
                        len(out),
                        child.children,
                        dict(old_grand or {}),
                        sorted(child.children),
                    )
                )
            continue
        stack.pop()
        for name in sorted(top.olds):
            out.append(Change(f"{top.path}/{name}", ChangeKind.DELETE))
        # A directory with changes inside is listed too (its metadata travels
        # with them), before them.
        if len(out) > top.at_entry and top.has_node and not top.added:
            out.insert(top.at_entry, Change(top.path, ChangeKind.MODIFY))


def changes(layer: str, parent: str | None) -> list[Change]:
    """What differs in the tree ``layer`` from the tree ``parent`` (all
    additions when ``parent`` is ``None``), as Docker's ``ChangesDirs``."""
    out: list[Change] = []
    old = _tree(parent) if parent is not None else {}
    _add_changes("", None, _tree(layer), old, False, out)
    return out


def changes_size(layer: str, changed: list[Change]) -> int:
    """The bytes of what was added or modified (not directories; a file
    with several links counted once), as Docker's ``ChangesSize``."""
    size = 0
    seen: set[int] = set()
    for change in changed:
        if change.kind == ChangeKind.DELETE:
            continue
        try:
            st = os.lstat(layer + change.path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            continue
        if st.st_nlink > 1:
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        size += st.st_size
    return size


# -- writing a layer tar -------------------------------------------------------------


class _Writer:
    """Adds files to a layer tar as Docker's ``addTarFile`` does."""

    def __init__(self, tar: tarfile.TarFile, root: str) -> None:
        self.tar, self.root = tar, root
        self.links: dict[tuple[int, int], str] = {}

    def add(self, rel: str) -> None:
        path = os.path.join(self.root, rel)
        st = os.lstat(path)
        info = tarfile.TarInfo(rel + ("/" if stat.S_ISDIR(st.st_mode) else ""))
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.mtime = int(st.st_mtime)  # Docker truncates to the second
        data = None
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                info.type, info.linkname = tarfile.LNKTYPE, self.links[key]
            else:
                if st.st_nlink > 1:
                    self.links[key] = rel
                info.type, info.size = tarfile.REGTYPE, st.st_size
                data = path
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
        else:
            return  # sockets are not carried in layers
        self._xattrs(path, info)
        if data is None:
            self.tar.addfile(info)
            return
        with open(data, "rb") as fh:
            self.tar.addfile(info, fh)

    def _xattrs(self, path: str, info: tarfile.TarInfo) -> None:
        headers = dict(info.pax_headers)
        binary = False
        for name in _EXPORTED_XATTRS:
            try:
                value = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                text, binary = value.decode("utf-8", "surrogateescape"), True
            headers[_XATTR_KEY + name] = text
        if binary:
            headers["hdrcharset"] = "BINARY"
        info.pax_headers = headers

    def whiteout(self, rel: str) -> None:
        parent, base = posixpath.split(rel)
        info = tarfile.TarInfo(posixpath.join(parent, WHITEOUT_PREFIX + base))
        info.mode = 0
        self.tar.addfile(info)


def _walk(root: str) -> Iterator[str]:
    """Every path under ``root`` (relative), in lexical order, parents first."""
    # Iterative: a layer may nest directories deeper than Python recurses.
    stack: list[tuple[str, Iterator[str]]] = [("", iter(_sorted_names(root)))]
    while stack:
        rel, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        child = posixpath.join(rel, name) if rel else name
        yield child
        path = os.path.join(root, child)
        if stat.S_ISDIR(os.lstat(path).st_mode):
            stack.append((child, iter(_sorted_names(path))))


def _sorted_names(path: str) -> list[str]:
    with os.scandir(path) as it:
        return sorted(entry.name for entry in it)


def export_changes(layer: str, parent: str | None, out: IO[bytes]) -> None:
    """Write to ``out`` the layer tar of ``layer`` over ``parent``: the
    whole tree when ``parent`` is ``None``, else the changes (deletions as
    whiteouts), as Docker's naive diff does."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        writer = _Writer(tar, layer)
        if parent is None:
            for rel in _walk(layer):
                writer.add(rel)
            return
        for change in sorted(changes(layer, parent), key=lambda c: c.path):
            rel = change.path[1:]
            if change.kind == ChangeKind.DELETE:
                writer.whiteout(rel)
            else:
                writer.add(rel)
