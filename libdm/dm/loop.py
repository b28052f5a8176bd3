"""Loop devices through the kernel's loop ioctls (never ``losetup``).

A loop device makes a regular file look like a block device, which is how
a thin pool is built on files (``/dev/loopN`` under the pool's data and
metadata devices).  The functions here talk to ``/dev/loop-control`` and
``/dev/loopN`` directly, like :mod:`os` talks to the kernel: small, with
no hidden state, raising :class:`OSError` (with ``filename`` set) when the
kernel refuses.

Units: every size and offset is in bytes.

Handles and autoclear
---------------------
:func:`attach`, :func:`find` and :func:`attach_or_find` return a
:class:`LoopDevice`: a description of the device *and an open handle on
it*.  The handle matters because of autoclear (``LO_FLAGS_AUTOCLEAR``,
the default of :func:`attach`): the kernel detaches an autoclear loop
device as soon as its last opener closes it.  So an autoclear loop lives
exactly as long as someone holds it open -- this handle, a mount, or a
device-mapper device using it (a thin pool holds its data and metadata
devices open, so loops under an active pool stay, and go away by
themselves when the pool is removed).  Build what uses the loop device
*before* closing the handle::

    with loop.attach("/var/lib/pool/data") as data:   # autoclear
        libdm.create("pool", [...data.devno...])
    # the loop stays: the pool holds it

A caller that wants the loop device to stay attached with no holders (a
loop made now, used later; one that survives the process) must pass
``autoclear=False`` and call :func:`detach` itself.

While any handle is open the binding cannot be torn down (a
``LOOP_CLR_FD`` from anyone is deferred until the last close), so a
:class:`LoopDevice` that is open always describes its real device.
Close handles you no longer need (:meth:`LoopDevice.close` or a ``with``
block); a handle that is garbage-collected open is closed then, with a
:class:`ResourceWarning`, as for files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import warnings
from typing import Self

from libdm.dm.blockdev import (
    LO_FLAGS_AUTOCLEAR,
    LO_FLAGS_DIRECT_IO,
    LO_FLAGS_READ_ONLY,
    LOOP_CLR_FD,
    LOOP_CONFIGURE,
    LOOP_CTL_GET_FREE,
    LOOP_MAJOR,
    LOOP_SET_CAPACITY,
    LOOP_SET_DIRECT_IO,
    LOOP_SET_FD,
    LOOP_SET_STATUS64,
    ioctl,
    loop_status,
    os_error,
    pack_loop_config,
    pack_loop_info,
    size_of_fd,
)

__all__ = [
    "LoopDevice",
    "attach",
    "attach_or_find",
    "detach",
    "find",
    "refresh_capacity",
]

_CONTROL = "/dev/loop-control"
_SYS_BLOCK = "/sys/block"
_SYS_DEV_BLOCK = "/sys/dev/block"
#: How many free devices :func:`attach` tries when others take them first.
ATTACH_ATTEMPTS: int = 16
_DELETED = " (deleted)"


#: A path as os functions take it.
StrPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]


# -- errors -----------------------------------------------------------------


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


# -- the handle -------------------------------------------------------------


class LoopDevice:
    """An attached loop device, and an open handle that keeps it attached.

    Attributes (as the kernel reported them when the handle was made;
    :func:`refresh_capacity` updates ``size``):
        path: the device node, ``"/dev/loopN"``; also ``str(device)`` and
            ``os.fspath(device)``.
        number: N.
        major, minor: the device numbers; ``devno`` is ``"major:minor"``,
            the form device-mapper tables take.
        backing_file: the backing file's path as the kernel shows it
            (``/sys/block/loopN/loop/backing_file``): resolved, and with
            ``" (deleted)"`` appended once that name was unlinked.
        size: the device size in bytes (BLKGETSIZE64).
        read_only, autoclear, direct_io: the kernel's loop flags.

    Not made directly: :func:`attach`, :func:`find` and
    :func:`attach_or_find` return one.  Close it with :meth:`close` or a
    ``with`` block; see the module documentation for why the handle
    matters with autoclear.
    """

    __slots__ = (
        "_backing_id",
        "_fd",
        "autoclear",
        "backing_file",
        "direct_io",
        "major",
        "minor",
        "number",
        "path",
        "read_only",
        "size",
    )

    def __init__(self, fd: int, number: int) -> None:
        # Takes ownership of fd, an open descriptor of /dev/loop<number>,
        # once this returns; if it raises, the caller still owns fd.
        self._fd = -1
        self.number = number
        self.path = f"/dev/loop{number}"
        st = os.fstat(fd)
        self.major, self.minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        info = loop_status(fd, self.path)
        flags = info.flags
        self.read_only = bool(flags & LO_FLAGS_READ_ONLY)
        self.autoclear = bool(flags & LO_FLAGS_AUTOCLEAR)
        self.direct_io = bool(flags & LO_FLAGS_DIRECT_IO)
        self._backing_id = (info.device, info.inode)
        shown = _sys_backing_file(number)
        self.backing_file: str = shown if shown is not None else os.fsdecode(info.file_name)
        self.size: int = size_of_fd(fd, self.path)
        self._fd = fd

    @property
    def devno(self) -> str:
        """``"major:minor"``, as device-mapper tables name devices."""
        return f"{self.major}:{self.minor}"

    @property
    def closed(self) -> bool:
        """True once this handle was closed (the device may still exist)."""
        return self._fd < 0

    def close(self) -> None:
        """Close the handle; closing twice is harmless.

        With autoclear, if nothing else holds the device open (no mount,
        no device-mapper device, no other handle), the kernel detaches it
        now.  Without autoclear the device stays attached.
        """
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(
                f"unclosed loop device handle {self!r}", ResourceWarning, stacklevel=2, source=self
            )
            self.close()

    def __str__(self) -> str:
        return self.path

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        flags = "".join(
            f" {name}"
            for name in ("read_only", "autoclear", "direct_io")
            if getattr(self, name, False)
        )
        return (
            f"<LoopDevice {self.path} ({self.devno}) backing_file={self.backing_file!r} "
            f"size={self.size}{flags} {state}>"
        )


# -- helpers ---------------------------------------------------------------


def _sys_backing_file(number: int) -> str | None:
    """The backing file the kernel shows for loop<number>, or None when it
    is not attached."""
    try:
        with open(f"{_SYS_BLOCK}/loop{number}/loop/backing_file", "rb") as f:
            data = f.read()
    except OSError:
        return None
    if data.endswith(b"\n"):
        data = data[:-1]
    return os.fsdecode(data)


def _loop_numbers() -> list[int]:
    """Numbers of the loop devices that exist, ascending."""
    numbers: list[int] = []
    for entry in os.listdir(_SYS_BLOCK):
        if entry.startswith("loop") and entry[4:].isdigit():
            numbers.append(int(entry[4:]))
    return sorted(numbers)


def _backing_path(path: StrPath, follow_symlinks: bool = True) -> tuple[str, os.stat_result]:
    """The resolved path of a backing file and its stat; the file must
    exist and be a regular file.  With ``follow_symlinks=False`` the last
    component must not be a symlink (OSError(ELOOP)); the directories
    above it are still resolved."""
    given = os.fsdecode(os.fspath(path))
    if follow_symlinks:
        name = os.path.realpath(given)
        st = os.stat(name)  # FileNotFoundError etc. name the path
    else:
        head, tail = os.path.split(os.path.abspath(given))
        name = os.path.join(os.path.realpath(head), tail)
        st = os.lstat(name)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "the backing file is a symbolic link (refused)", given)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{given!r} is not a regular file; a loop device needs one")
    return name, st


def _open_backing(name: str, flags: int, follow_symlinks: bool) -> int:
    """Open the backing file ``name``; without ``follow_symlinks``, never
    through a symlink put there since it was looked at."""
    return os.open(name, flags | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW))


def _open_control() -> int:
    try:
        return os.open(_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            raise OSError(
                exc.errno,
                "the loop driver is not loaded"
                " (no usable loop-control device; run `modprobe loop`)",
                _CONTROL,
            ) from None
        raise


def _open_device(device: LoopDevice | StrPath) -> tuple[int, bool, int, str]:
    """(fd, owned, number, path) of a loop device given as a handle or a
    path.  An open handle's own descriptor is used (owned False); else the
    path is opened (owned True: the caller closes fd)."""
    if isinstance(device, LoopDevice):
        if not device.closed:
            return device._fd, False, device.number, device.path
        path = device.path
    else:
        given: object = device
        if not isinstance(given, str | bytes | os.PathLike):
            raise TypeError(f"expected a LoopDevice or a device path, not {type(given).__name__}")
        path = os.fsdecode(os.fspath(device))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != LOOP_MAJOR:
            raise ValueError(f"{path!r} is not a loop device")
    except BaseException:
        os.close(fd)
        raise
    return fd, True, _number_of(st.st_rdev), path


def _number_of(rdev: int) -> int:
    """N of the loop device with this device number (the minor is N only
    when the loop module's max_part is 0)."""
    link = f"{_SYS_DEV_BLOCK}/{os.major(rdev)}:{os.minor(rdev)}"
    entry = os.path.basename(os.path.realpath(link))
    if entry.startswith("loop") and entry[4:].isdigit():
        return int(entry[4:])
    return os.minor(rdev)


def _configure(lfd: int, bfd: int, name: str, flags: int, direct_io: bool, path: str) -> None:
    """Bind bfd to the loop device lfd with the given flags: LOOP_CONFIGURE,
    or LOOP_SET_FD + LOOP_SET_STATUS64 (+ LOOP_SET_DIRECT_IO) where the
    kernel lacks it (before 5.8).  EBUSY (bound meanwhile) is raised as
    is, unwrapped, for the caller to retry."""
    info = pack_loop_info(file_name=os.fsencode(name), flags=flags)
    try:
        fcntl.ioctl(lfd, LOOP_CONFIGURE, pack_loop_config(bfd, info))
        configured = True
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
        configured = False
    if not configured:
        fcntl.ioctl(lfd, LOOP_SET_FD, bfd)  # EBUSY: someone bound it first
        try:
            # READ_ONLY is not settable here: the kernel made the device
            # read-only already if bfd or lfd is open read-only.
            ioctl(lfd, LOOP_SET_STATUS64, info, "LOOP_SET_STATUS64", path)
            if direct_io:
                try:
                    fcntl.ioctl(lfd, LOOP_SET_DIRECT_IO, 1)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise os_error(exc.errno, "LOOP_SET_DIRECT_IO", path) from None
        except BaseException:
            _clear_quietly(lfd)
            raise
    if direct_io and not loop_status(lfd, path).flags & LO_FLAGS_DIRECT_IO:
        # LOOP_CONFIGURE drops the flag silently, LOOP_SET_DIRECT_IO fails
        # with EINVAL: either way the kernel cannot.
        _clear_quietly(lfd)
        raise OSError(
            errno.EINVAL,
            "direct I/O is not possible on this backing file"
            " (its filesystem or alignment does not allow it)",
            path,
        )


def _clear_quietly(lfd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(lfd, LOOP_CLR_FD)


# -- the API ---------------------------------------------------------------


def attach(
    path: StrPath,
    *,
    read_only: bool = False,
    autoclear: bool = True,
    direct_io: bool = False,
    follow_symlinks: bool = True,
) -> LoopDevice:
    """Attach a regular file to a free loop device.

    Takes a free device from ``/dev/loop-control`` (LOOP_CTL_GET_FREE) and
    binds the file to it with LOOP_CONFIGURE (one ioctl), or LOOP_SET_FD
    then LOOP_SET_STATUS64 on kernels before 5.8.  When another process
    binds the same free device first (EBUSY), another free device is
    taken, up to :data:`ATTACH_ATTEMPTS` times.  The whole file is mapped
    (offset 0, no size limit); the device's size is the file's size
    rounded down to 512 bytes.  This always makes a new attachment, even
    if the file is attached already: see :func:`attach_or_find`.

    Args:
        path: the backing file (str, bytes or path-like).  Its resolved
            path is recorded as the device's file name.
        read_only: make the device read-only (the file is opened
            read-only too).
        autoclear: set LO_FLAGS_AUTOCLEAR: the kernel detaches the device
            when its last opener closes it.  The returned handle is an
            opener, so the device stays while the handle is open; a
            device-mapper device built on it (a thin pool) keeps it after
            that.  Pass False for a device that stays attached with no
            holders, until :func:`detach`.
        direct_io: bypass the page cache for the backing file
            (LO_FLAGS_DIRECT_IO).  If the kernel cannot on this file, the
            attachment is undone and OSError(EINVAL) raised, rather than
            silently running buffered.
        follow_symlinks: False refuses a ``path`` whose last component
            is a symlink (OSError(ELOOP)), for files in a directory that
            others must not redirect (a pool's state directory).

    Returns:
        An open :class:`LoopDevice` handle; close it when done (see the
        module documentation).

    Raises:
        FileNotFoundError: ``path`` does not exist (``filename`` is it), or
            ``/dev/loop-control`` is missing: the loop module is not
            loaded (``modprobe loop``; the message says so).
        ValueError: ``path`` is not a regular file.
        OSError(ELOOP): ``follow_symlinks`` is False and ``path`` is a
            symlink.
        PermissionError: the file cannot be opened for writing (pass
            ``read_only=True``), or the caller is not root.
        OSError: the kernel refused (``filename`` names the device);
            EBUSY after :data:`ATTACH_ATTEMPTS` devices were taken by
            others first; EINVAL for direct I/O, see above.
    """
    name, _ = _backing_path(path, follow_symlinks)
    mode = os.O_RDONLY if read_only else os.O_RDWR
    bfd = _open_backing(name, mode, follow_symlinks)
    try:
        if not stat.S_ISREG(os.fstat(bfd).st_mode):  # replaced since the stat
            raise ValueError(f"{name!r} is not a regular file; a loop device needs one")
        flags = (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
        if direct_io:
            flags |= LO_FLAGS_DIRECT_IO
        ctl = _open_control()
        try:
            for _attempt in range(ATTACH_ATTEMPTS):
                number = ioctl(ctl, LOOP_CTL_GET_FREE, 0, "LOOP_CTL_GET_FREE", _CONTROL)
                dev_path = f"/dev/loop{number}"
                try:
                    lfd = os.open(dev_path, mode | os.O_CLOEXEC)
                except FileNotFoundError:
                    if os.path.exists(f"{_SYS_BLOCK}/loop{number}"):
                        raise OSError(
                            errno.ENOENT,
                            "the loop device exists but has no device node"
                            " (is devtmpfs mounted on /dev?)",
                            dev_path,
                        ) from None
                    continue  # removed meanwhile
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        continue  # removed meanwhile
                    raise
                try:
                    _configure(lfd, bfd, name, flags, direct_io, dev_path)
                except OSError as exc:
                    os.close(lfd)
                    if exc.errno == errno.EBUSY:
                        continue  # another process bound it first
                    if exc.filename is None:
                        raise os_error(exc.errno, "binding the backing file", dev_path) from None
                    raise
                except BaseException:
                    os.close(lfd)
                    raise
                try:
                    return LoopDevice(lfd, number)
                except BaseException:
                    # Leave nothing behind: without autoclear the binding
                    # would outlive the fd.
                    _clear_quietly(lfd)
                    os.close(lfd)
                    raise
            raise OSError(
                errno.EBUSY,
                f"no free loop device could be bound: {ATTACH_ATTEMPTS} attempts"
                " found the device busy "
                "(bound by others first, or held open exclusively)",
                name,
            )
        finally:
            os.close(ctl)
    finally:
        os.close(bfd)


def find(
    path: StrPath, *, follow_symlinks: bool = True, hint: int | None = None
) -> LoopDevice | None:
    """The loop device the file is attached to, if it is.

    Every bound loop device is examined (``/sys/block/loopN/loop``); the
    name in ``backing_file`` only skips devices whose backing file names
    a different existing file.  The match is decided by the backing
    file's identity: ``st_dev`` and ``st_ino`` of ``path`` against
    LOOP_GET_STATUS64's ``lo_device``/``lo_inode``, so a symlink, another
    hard link, or a name since unlinked (shown with ``" (deleted)"``)
    all find the device.  Only whole-file attachments count (offset 0, no
    size limit).  If the file is attached more than once, the
    lowest-numbered device is returned.

    With ``follow_symlinks=False`` a ``path`` that is a symlink is refused
    (OSError(ELOOP)) rather than followed.

    ``hint`` is the number of a loop device the caller believes holds the
    file (a pool's table names its loops): it is asked first, by its
    backing file's identity, and only if it does not hold the file are
    the others examined.  A report then costs one device's ioctl rather
    than a walk of every loop device.

    Returns:
        An open :class:`LoopDevice` handle, or None.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a regular file.
        PermissionError: a loop device cannot be opened (not root).
    """
    name, st = _backing_path(path, follow_symlinks)
    key = (st.st_dev, st.st_ino)
    if hint is not None:
        device = _holding(hint, key)
        if device is not None:
            return device
    for number in _loop_numbers():
        if number == hint:
            continue
        shown = _sys_backing_file(number)
        if shown is None or not _may_be(shown, name, key):
            continue
        device = _holding(number, key)
        if device is not None:
            return device
    return None


def _holding(number: int, key: tuple[int, int]) -> LoopDevice | None:
    """An open handle on loop<number> if it holds the whole file whose
    ``(st_dev, st_ino)`` is ``key`` (offset 0, no size limit), else None."""
    dev_path = f"/dev/loop{number}"
    try:
        fd = os.open(dev_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO):
            return None  # removed meanwhile
        raise
    try:
        try:
            info = loop_status(fd, dev_path)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return None  # detached meanwhile (finally closes fd)
            raise
        if (info.device, info.inode) == key and info.offset == 0 and info.sizelimit == 0:
            device, fd = LoopDevice(fd, number), -1
            return device
        return None
    finally:
        if fd >= 0:
            _close(fd)


def _may_be(shown: str, name: str, key: tuple[int, int]) -> bool:
    """The fast filter of :func:`find`: False only when the kernel's name
    for the backing file names a different existing file."""
    if shown == name or shown.endswith(_DELETED):
        return True
    try:
        st = os.stat(shown)
    except OSError:
        return True  # not visible here (another mount namespace?): ask the kernel
    return (st.st_dev, st.st_ino) == key


def attach_or_find(
    path: StrPath,
    *,
    read_only: bool = False,
    autoclear: bool = True,
    direct_io: bool = False,
    follow_symlinks: bool = True,
) -> LoopDevice:
    """The file's existing loop device, or a new one: :func:`find`, then
    :func:`attach` if there is none.

    This is how a pool's files are re-attached (after a reboot, or by a
    second process): the same file never gets two loop devices.  Callers
    of this function in any process are serialized by an exclusive
    ``flock`` on the backing file, so two of them racing end up with the
    same device.  (Plain :func:`attach` takes no lock.)

    An existing device is returned as it is: its ``autoclear`` and
    ``direct_io`` may differ from the arguments (those apply to a new
    attachment only).  Its read-only state must match ``read_only``.

    Returns:
        An open :class:`LoopDevice` handle.

    Raises:
        FileExistsError: the file is attached already with the other
            read-only state (``filename`` is the device path).
        The errors of :func:`find` and :func:`attach`.
    """
    name, _ = _backing_path(path, follow_symlinks)
    lock = _open_backing(name, os.O_RDONLY, follow_symlinks)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = find(name, follow_symlinks=follow_symlinks)
        if found is None:
            return attach(
                name,
                read_only=read_only,
                autoclear=autoclear,
                direct_io=direct_io,
                follow_symlinks=follow_symlinks,
            )
        if found.read_only != bool(read_only):
            found.close()
            state = "read-only" if found.read_only else "writable"
            raise OSError(errno.EEXIST, f"{name} is attached already, {state}", found.path)
        return found
    finally:
        os.close(lock)  # releases the flock


def detach(device: LoopDevice | StrPath) -> bool:
    """Detach a loop device from its backing file (LOOP_CLR_FD).

    If nobody else has the device open it is detached at once.  If
    others do (a mount, a device-mapper device, another handle), the
    kernel does not refuse: it sets autoclear and detaches the device
    when the last of them closes it.  (Very old kernels refused with
    EBUSY instead; that would be raised as OSError(EBUSY).)
    Given a :class:`LoopDevice`, its handle is closed too, which is the
    last close when nothing else holds it.

    Args:
        device: a :class:`LoopDevice`, or a loop device path such as
            ``"/dev/loop3"``.  A closed handle whose device was since
            detached and reused for another file raises ENXIO rather than
            detaching the other file.

    Returns:
        True if the device is detached now; False if the detach was
        deferred until other holders close it.

    Raises:
        OSError(ENXIO): the device is not attached (``filename`` is it).
        ValueError: ``device`` is not a loop device.
        FileNotFoundError: no such device node.
    """
    fd, owned, number, path = _open_device(device)
    try:
        if owned and isinstance(device, LoopDevice):
            # A closed handle does not pin the binding: make sure it still
            # is the file the handle was made for.
            info = loop_status(fd, path)
            if (info.device, info.inode) != device._backing_id:
                raise OSError(errno.ENXIO, "no longer attached to the file of this handle", path)
        ioctl(fd, LOOP_CLR_FD, 0, "LOOP_CLR_FD", path)
    finally:
        if owned:
            os.close(fd)
        if isinstance(device, LoopDevice):
            device.close()
    return _sys_backing_file(number) is None


def refresh_capacity(device: LoopDevice | StrPath) -> int:
    """Make the device's size follow its backing file's (LOOP_SET_CAPACITY),
    after the file grew or shrank.

    Args:
        device: a :class:`LoopDevice` (its ``size`` is updated) or a loop
            device path.

    Returns:
        The new size in bytes (BLKGETSIZE64): the file size rounded down
        to 512 bytes.

    Raises:
        OSError(ENXIO): the device is not attached.
        ValueError: ``device`` is not a loop device.
    """
    fd, owned, _number, path = _open_device(device)
    try:
        ioctl(fd, LOOP_SET_CAPACITY, 0, "LOOP_SET_CAPACITY", path)
        size = size_of_fd(fd, path)
    finally:
        if owned:
            os.close(fd)
    if isinstance(device, LoopDevice):
        device.size = size
    return size
