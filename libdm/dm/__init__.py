"""Layer 2: device operations on top of the libdevmapper binding.

Tasks, errors, logging and udev handling live here; nothing in this
package imports the thin-pool model, the CLI or the testing harness.
"""

from typing import TYPE_CHECKING

from libdm._lazy import exports

_TABLE = {
    "libdm.dm.errors": (
        "DMError",
        "DeviceBusyError",
        "DeviceExistsError",
        "KernelSupportError",
        "NoSuchDeviceError",
        "PermissionDeniedError",
        "Remedy",
        "RemedyCall",
    ),
    "libdm.dm.events": ("wait_event",),
    "libdm.dm.info": (
        "DeviceEntry",
        "DeviceInfo",
        "TargetVersion",
    ),
    "libdm.dm.ops": (
        "cancel_deferred_remove",
        "create",
        "deps",
        "device_path",
        "driver_version",
        "exists",
        "info",
        "library_version",
        "list_devices",
        "message",
        "mknodes",
        "reload",
        "remove",
        "rename",
        "resume",
        "set_uuid",
        "status",
        "suspend",
        "table",
        "target_versions",
    ),
    "libdm.dm.target": ("Target",),
    "libdm.dm.udev": ("udev_sync_supported",),
}
__all__ = [name for names in _TABLE.values() for name in names]
__getattr__, __dir__ = exports(__name__, _TABLE)

# What a type checker sees instead of __getattr__ (the same names).
if TYPE_CHECKING:
    from libdm.dm.errors import DeviceBusyError as DeviceBusyError
    from libdm.dm.errors import DeviceExistsError as DeviceExistsError
    from libdm.dm.errors import DMError as DMError
    from libdm.dm.errors import KernelSupportError as KernelSupportError
    from libdm.dm.errors import NoSuchDeviceError as NoSuchDeviceError
    from libdm.dm.errors import PermissionDeniedError as PermissionDeniedError
    from libdm.dm.errors import Remedy as Remedy
    from libdm.dm.errors import RemedyCall as RemedyCall
    from libdm.dm.events import wait_event as wait_event
    from libdm.dm.info import DeviceEntry as DeviceEntry
    from libdm.dm.info import DeviceInfo as DeviceInfo
    from libdm.dm.info import TargetVersion as TargetVersion
    from libdm.dm.ops import cancel_deferred_remove as cancel_deferred_remove
    from libdm.dm.ops import create as create
    from libdm.dm.ops import deps as deps
    from libdm.dm.ops import device_path as device_path
    from libdm.dm.ops import driver_version as driver_version
    from libdm.dm.ops import exists as exists
    from libdm.dm.ops import info as info
    from libdm.dm.ops import library_version as library_version
    from libdm.dm.ops import list_devices as list_devices
    from libdm.dm.ops import message as message
    from libdm.dm.ops import mknodes as mknodes
    from libdm.dm.ops import reload as reload
    from libdm.dm.ops import remove as remove
    from libdm.dm.ops import rename as rename
    from libdm.dm.ops import resume as resume
    from libdm.dm.ops import set_uuid as set_uuid
    from libdm.dm.ops import status as status
    from libdm.dm.ops import suspend as suspend
    from libdm.dm.ops import table as table
    from libdm.dm.ops import target_versions as target_versions
    from libdm.dm.target import Target as Target
    from libdm.dm.udev import udev_sync_supported as udev_sync_supported
