"""A pool's state directory, held open and trusted only if it is private.

Whoever can write the state directory controls the pool: its store names
the devices the pool is built on, and a symlink planted there would make
libdm write, grow or chmod a file elsewhere.  So the directory must be
owned by the caller's effective uid and writable by nobody else, and
every file in it is reached through the directory's descriptor with
``O_NOFOLLOW`` and checked (a regular file, owned by the caller) before
it is used.  (On hostfs, a User-Mode Linux kernel's view of its host's
files, owners are the host's and the host enforces access, so there only
modes and symlinks are checked.)

:class:`StateDir` also records what it made during this call (the
directory itself, new files), so that a failed creation removes exactly
that and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence

from libdm.dm.errors import NEEDS_ROOT, DeviceExistsError, PermissionDeniedError
from libdm.thin.errors import PoolReadOnlyError, StateError

__all__ = ["StateDir"]


class StateDir:
    """An open, private state directory.

    Use :meth:`open` for a pool's existing directory and :meth:`claim`
    for a new pool's.

    Attributes:
        path: the directory's absolute path.
        made: True if this call created the directory.
        created: names of the files this object created.
    """

    def __init__(self, path: str, fd: int, made: bool = False) -> None:
        self.path, self.fd, self.made = path, fd, made
        self.created: list[str] = []
        # On hostfs (a User-Mode Linux kernel's view of its host's files)
        # owners are the host's: root in the kernel sees the files of the
        # host user running it as that user's.  The host enforces access
        # there, so only modes and symlinks are checked.
        self._owner: int | None = None if _fs_type(fd) == "hostfs" else os.geteuid()

    # -- getting one --------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], operation: str = "open") -> StateDir:
        """Open a pool's existing state directory.

        Raises:
            StateError: no such directory, or one owned by another user or
                writable by group or others (named, with owner and mode).
            PoolReadOnlyError: it is on a read-only filesystem (EROFS).
            PermissionDeniedError: the caller may not read it.
        """
        path = os.path.abspath(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except PermissionError:
            raise PermissionDeniedError(
                errno.EACCES,
                f"cannot open the pool state in {path}: {NEEDS_ROOT}",
                operation,
                None,
            ) from None
        except (FileNotFoundError, NotADirectoryError):
            raise StateError(
                f"no pool state in {path} (no such directory)", operation, None
            ) from None
        return cls._checked(path, fd, False, operation)

    @classmethod
    def claim(
        cls, path: str | os.PathLike[str], names: Sequence[str], operation: str = "create"
    ) -> StateDir:
        """The state directory of a new pool: made (mode 0700) if missing;
        an existing one is used as it is, never chmod'ed, and must hold
        nothing called as one of ``names`` (the pool's files; the first is
        its store).

        Raises:
            DeviceExistsError: it holds a pool, or files named like a pool's
                (each named); nothing there is touched.
            StateError, PoolReadOnlyError, PermissionDeniedError: as
                :meth:`open`.
        """
        path = os.path.abspath(path)
        made = _make_directory(path, operation)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if made:
                os.fchmod(fd, 0o700)  # whatever the umask
        except BaseException:
            if made:
                os.rmdir(path)
            raise
        statedir = cls._checked(path, fd, made, operation)
        try:
            statedir._refuse_pool_files(names, operation)
        except BaseException:
            statedir.close(remove_made=True)
            raise
        return statedir

    @classmethod
    def _checked(cls, path: str, fd: int, made: bool, operation: str) -> StateDir:
        statedir = cls(path, fd, made)
        try:
            statedir._check_private(operation)
            statedir._check_writable(operation)
        except BaseException:
            statedir.close(remove_made=True)
            raise
        return statedir

    def _check_private(self, operation: str) -> None:
        st = os.fstat(self.fd)
        euid = os.geteuid()
        if self._foreign(st) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise StateError(
                f"the state directory {self.path} is owned by {_user(st.st_uid)} with mode "
                f"{stat.S_IMODE(st.st_mode):o}; libdm uses only a directory owned by "
                f"{_user(euid)} that no one else can write (whoever can write it controls "
                f"the pool and the disks it names)",
                operation,
                None,
            )

    def _foreign(self, st: os.stat_result) -> bool:
        return self._owner is not None and st.st_uid != self._owner

    def _check_writable(self, operation: str) -> None:
        if os.statvfs(self.fd).f_flag & os.ST_RDONLY:
            raise _read_only(self.path, operation)

    def _refuse_pool_files(self, names: Sequence[str], operation: str) -> None:
        found = [name for name in names if self.lstat(name) is not None]
        if not found:
            return
        paths = ", ".join(self.join(name) for name in found)
        if names[0] in found:
            message = f"{self.path} holds a pool already ({paths})"
        else:
            message = (
                f"{self.path} holds files named like a pool's but no pool state: "
                f"{paths}; libdm will not use or delete them: move them away or "
                f"choose another directory"
            )
        raise DeviceExistsError(errno.EEXIST, message, operation, self.path)

    # -- files ------------------------------------------------------------------------

    def join(self, name: str) -> str:
        """The path of ``name`` in the directory (for messages and loop
        devices; files are opened through :attr:`fd`)."""
        return os.path.join(self.path, name)

    def lstat(self, name: str) -> os.stat_result | None:
        """The entry's own stat (a symlink is not followed), or ``None``."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def check_file(
        self, name: str, operation: str = "open", what: str = "file"
    ) -> os.stat_result | None:
        """The stat of ``name`` if it is a regular file owned by the caller,
        ``None`` if it does not exist.

        Raises:
            StateError: a symlink or anything else (named, and why).
        """
        st = self.lstat(name)
        if st is not None:
            self._check_own_file(name, st, operation, what)
        return st

    def _check_own_file(self, name: str, st: os.stat_result, operation: str, what: str) -> None:
        if stat.S_ISLNK(st.st_mode):
            why = "is a symbolic link"
        elif not stat.S_ISREG(st.st_mode):
            why = "is not a regular file"
        elif self._foreign(st):
            why = f"is owned by {_user(st.st_uid)}"
        else:
            return
        raise StateError(
            f"the pool's {what} {self.join(name)} {why}; libdm refuses to use it", operation, None
        )

    def make_file(self, name: str, operation: str = "create", what: str = "file") -> int:
        """Create ``name`` (mode 0600, never through a symlink) and record it.

        Returns:
            A file descriptor open for writing (close it).

        Raises:
            DeviceExistsError: something of that name is there already.
        """
        try:
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self.fd,
            )
        except FileExistsError:
            raise DeviceExistsError(
                errno.EEXIST,
                f"the pool's {what} {self.join(name)} exists already",
                operation,
                self.join(name),
            ) from None
        except OSError as exc:
            raise self._open_error(name, exc, operation, what) from None
        self.created.append(name)
        os.fchmod(fd, 0o600)  # whatever the umask
        return fd

    def open_file(
        self,
        name: str,
        flags: int,
        operation: str = "open",
        what: str = "file",
        create: bool = False,
    ) -> int:
        """Open ``name`` in the directory, never through a symlink; with
        ``create``, make it (see :meth:`make_file`) if it is missing.

        Returns:
            A file descriptor (close it).

        Raises:
            StateError: missing, a symlink, or not a regular file of the
                caller's (named).
            PoolReadOnlyError: the filesystem is read-only.
        """
        if create:
            try:
                return self.make_file(name, operation, what)
            except DeviceExistsError:
                pass
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            raise self._open_error(name, exc, operation, what) from None
        try:
            self._check_own_file(name, os.fstat(fd), operation, what)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_error(self, name: str, exc: OSError, operation: str, what: str) -> OSError:
        if exc.errno == errno.ELOOP:
            return StateError(
                f"the pool's {what} {self.join(name)} is a symbolic link; libdm refuses to use it",
                operation,
                None,
            )
        if exc.errno == errno.ENOENT:
            return StateError(f"the pool's {what} {self.join(name)} is missing", operation, None)
        if exc.errno == errno.EROFS:
            return _read_only(self.path, operation)
        exc.filename = exc.filename if exc.filename else self.join(name)
        return exc

    def unlink(self, name: str) -> None:
        """Remove ``name`` if it is there (never what a symlink points to)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def remove_created(self) -> None:
        """Remove the files this object created, and the directory if it
        made it and it is empty now."""
        for name in reversed(self.created):
            self.unlink(name)
        self.created = []

    def close(self, remove_made: bool = False) -> None:
        """Close the directory; with ``remove_made``, remove what this
        object made (files, then the directory if empty)."""
        if self.fd < 0:
            return
        if remove_made:
            self.remove_created()
        os.close(self.fd)
        self.fd = -1
        if remove_made and self.made:
            # OSError: not empty, someone put something there meanwhile
            with contextlib.suppress(OSError):
                os.rmdir(self.path)


def _make_directory(path: str, operation: str) -> bool:
    """Make ``path`` (mode 0700, parents as needed); True if made, False
    if it existed."""
    try:
        try:
            os.mkdir(path, 0o700)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.mkdir(path, 0o700)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise _read_only(path, operation) from None
        raise


def _fs_type(fd: int) -> str | None:
    """The type of the filesystem holding ``fd`` (from the mount table), or
    ``None`` if it cannot be told."""
    st = os.fstat(fd)
    devno = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split(" - ", 1)
                if len(fields) == 2 and fields[0].split()[2:3] == [devno]:
                    return fields[1].split()[0]
    except OSError:
        pass
    return None


def _read_only(path: str, operation: str) -> PoolReadOnlyError:
    return PoolReadOnlyError(
        f"the state directory {path} is on a read-only filesystem; "
        f"libdm must write there to use the pool (nothing was changed)",
        operation,
        None,
    )


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"
