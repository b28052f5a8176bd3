"""Values describing devices, as read back from the kernel."""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["DeviceEntry", "DeviceInfo", "TargetVersion"]


class DeviceInfo(NamedTuple):
    """What ``DM_DEV_STATUS`` tells about one device (``dmsetup info``).

    Attributes:
        name: the device's name.
        uuid: its uuid, or ``None`` when it has none.
        major: the major number of the device.
        minor: the minor number of the device.
        suspended: I/O is suspended.
        live_table: a table is active.
        inactive_table: a table is loaded but not yet active (after reload).
        open_count: how many openers the device has.
        event_nr: the device's event counter.
        read_only: the device is read-only.
        target_count: number of targets in the live table.
        deferred_remove: a deferred remove is pending.
    """

    name: str
    uuid: str | None
    major: int
    minor: int
    suspended: bool
    live_table: bool
    inactive_table: bool
    open_count: int
    event_nr: int
    read_only: bool
    target_count: int
    deferred_remove: bool

    @property
    def devno(self) -> int:
        """The device number as one ``dev_t`` (see ``os.makedev``)."""
        return os.makedev(self.major, self.minor)

    @property
    def devname(self) -> str:
        """The kernel's name for the device, e.g. ``"dm-3"``."""
        return f"dm-{self.minor}"


class DeviceEntry(NamedTuple):
    """One device from the device list: name and device number."""

    name: str
    major: int
    minor: int


class TargetVersion(NamedTuple):
    """A target type registered in the kernel, with its version."""

    name: str
    version: tuple[int, int, int]
