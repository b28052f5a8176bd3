"""Filesystems on thin devices: mkfs and mount (running mkfs and mount is
fine; device-mapper work is never done through a tool)."""

import contextlib
import os
import shutil
import subprocess
import tempfile

__all__ = ["make_filesystem", "mounted", "FILESYSTEMS"]

# Discard is skipped at mkfs time: a new thin device is already unmapped,
# and discarding it would only cost time.
FILESYSTEMS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K"],
}


def make_filesystem(path, fstype, *, label=None, options=()):
    """Run mkfs for ``fstype`` (ext4 or xfs) on ``path``.

    Raises:
        ValueError: an unsupported ``fstype``.
        FileNotFoundError: the mkfs program is not installed (the message
            names the package).
        RuntimeError: mkfs failed; its output is in the message.
    """
    if fstype not in FILESYSTEMS:
        raise ValueError(f"filesystem {fstype!r} is not supported; use one of {', '.join(FILESYSTEMS)}")
    argv = list(FILESYSTEMS[fstype])
    if shutil.which(argv[0]) is None:
        package = "e2fsprogs" if fstype == "ext4" else "xfsprogs"
        raise FileNotFoundError(f"{argv[0]} is not installed (package {package})")
    if label is not None:
        argv += ["-L", label]
    argv += list(options) + [os.fspath(path)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")


@contextlib.contextmanager
def mounted(path, target=None, *, options=None):
    """Mount ``path`` on ``target`` (a fresh temporary directory when
    ``None``) for the ``with`` block, then unmount it (and remove the
    temporary directory).

    Raises:
        RuntimeError: mount or umount failed; the message has their output.
    """
    made = target is None
    target = tempfile.mkdtemp(prefix="libdm-mnt-") if made else os.fspath(target)
    argv = ["mount"] + (["-o", options] if options else []) + [os.fspath(path), target]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        if made:
            os.rmdir(target)
        raise RuntimeError(f"mount {path} on {target} failed: {proc.stderr.strip()}")
    try:
        yield target
    finally:
        proc = subprocess.run(["umount", target], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"umount {target} failed: {proc.stderr.strip()}")
        if made:
            os.rmdir(target)
