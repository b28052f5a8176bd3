"""Layer 2: device operations on top of the libdevmapper binding.

Tasks, errors, logging and udev handling live here; nothing in this
package imports the thin-pool model, the CLI or the testing harness.
"""

from libdm._lazy import exports

_TABLE = {
    "libdm.dm.errors": (
        "DMError",
        "DeviceBusyError",
        "DeviceExistsError",
        "KernelSupportError",
        "NoSuchDeviceError",
        "PermissionDeniedError",
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
