"""udev synchronisation.

Tasks that make, drop or rename device nodes (create, resume, remove,
rename) set a udev cookie and always wait on it, success or failure (see
``Task.run``): an unpaired cookie leaks a SysV semaphore, which is how
Docker users ended up with "dm_task_set_cookie failed".

Where udev runs, ``/dev/mapper/<name>`` is udev's work and the wait makes
sure it is done.  Where it does not (containers, test kernels),
libdevmapper notices that (no ``/run/udev/control``) and creates and
removes the nodes itself when the wait is called, so the node exists right
after :func:`~libdm.create` returns either way.
"""

from __future__ import annotations

from libdm.dm import task as _task
from libdm.dm._lib import lib

__all__ = ["set_udev_sync", "udev_sync_supported"]


def udev_sync_supported() -> bool:
    """True when libdevmapper synchronises with a running udev (cookies are
    real SysV semaphores); False where udev does not run or the library
    was built without udev support."""
    with _task.LOCK:
        return bool(lib.dm_cookie_supported()) and bool(lib.dm_udev_get_sync_support())


def set_udev_sync(enabled: bool) -> None:
    """Turn udev synchronisation on or off for this process.

    Turning it off makes libdevmapper manage ``/dev/mapper`` nodes itself
    even where udev runs.  Turning it on has effect only where udev runs.
    """
    with _task.LOCK:
        lib.dm_udev_set_sync_support(1 if enabled else 0)
