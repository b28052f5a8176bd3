"""Layer 2: device operations on top of the libdevmapper binding.

Tasks, errors, logging and udev handling live here; nothing in this
package imports the thin-pool model, the CLI or the testing harness.
"""

from libdm.dm.errors import (
    DMError,
    DeviceBusyError,
    DeviceExistsError,
    KernelSupportError,
    NoSuchDeviceError,
    PermissionDeniedError,
)
from libdm.dm.events import wait_event
from libdm.dm.info import DeviceEntry, DeviceInfo, TargetVersion
from libdm.dm.ops import (
    cancel_deferred_remove,
    create,
    deps,
    device_path,
    driver_version,
    exists,
    info,
    library_version,
    list_devices,
    message,
    mknodes,
    reload,
    remove,
    rename,
    resume,
    set_uuid,
    status,
    suspend,
    table,
    target_versions,
)
from libdm.dm.target import Target
from libdm.dm.udev import udev_sync_supported

__all__ = [
    "DMError",
    "DeviceBusyError",
    "DeviceExistsError",
    "KernelSupportError",
    "NoSuchDeviceError",
    "PermissionDeniedError",
    "DeviceEntry",
    "DeviceInfo",
    "TargetVersion",
    "Target",
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
    "udev_sync_supported",
    "wait_event",
]
