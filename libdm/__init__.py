"""libdm: the Linux device-mapper from Python.

Device operations (layer 2) and the thin-pool model (layer 3) are
re-exported here: ``libdm.create``, ``libdm.remove``, ``libdm.info``, the
``DMError`` hierarchy, and ``libdm.Pool`` with its ``ThinDevice`` and
``Snapshot``.  They are imported on first use, so ``import libdm`` is
cheap.
"""

from typing import TYPE_CHECKING

from libdm._lazy import exports
from libdm.dm import _TABLE as _DM
from libdm.thin import _TABLE as _THIN

__version__ = "0.1.0"
__all__ = [name for names in (*_DM.values(), *_THIN.values()) for name in names]
__getattr__, __dir__ = exports(__name__, {**_DM, **_THIN})

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
    from libdm.thin.device import Snapshot as Snapshot
    from libdm.thin.device import ThinDevice as ThinDevice
    from libdm.thin.errors import ChangedByAnotherError as ChangedByAnotherError
    from libdm.thin.errors import DeviceNotBlankError as DeviceNotBlankError
    from libdm.thin.errors import FilesystemError as FilesystemError
    from libdm.thin.errors import ForeignDeviceError as ForeignDeviceError
    from libdm.thin.errors import HandedOverError as HandedOverError
    from libdm.thin.errors import PoolError as PoolError
    from libdm.thin.errors import PoolFailedError as PoolFailedError
    from libdm.thin.errors import PoolFullError as PoolFullError
    from libdm.thin.errors import PoolLockedError as PoolLockedError
    from libdm.thin.errors import PoolReadOnlyError as PoolReadOnlyError
    from libdm.thin.errors import RefusedError as RefusedError
    from libdm.thin.errors import StateError as StateError
    from libdm.thin.pool import Pool as Pool
    from libdm.thin.repair import DeviceRecovery as DeviceRecovery
    from libdm.thin.repair import MetadataLossError as MetadataLossError
    from libdm.thin.repair import RepairResult as RepairResult
    from libdm.thin.report import PoolInfo as PoolInfo
    from libdm.thin.status import ThinFailed as ThinFailed
    from libdm.thin.status import ThinPoolFailed as ThinPoolFailed
    from libdm.thin.status import ThinPoolStatus as ThinPoolStatus
    from libdm.thin.status import ThinStatus as ThinStatus
    from libdm.thin.table import ThinParams as ThinParams
    from libdm.thin.table import ThinPoolParams as ThinPoolParams
    from libdm.thin.units import Bytes as Bytes
    from libdm.thin.units import DataBlocks as DataBlocks
    from libdm.thin.units import MetaBlocks as MetaBlocks
    from libdm.thin.units import Sectors as Sectors
    from libdm.thin.units import format_size as format_size
    from libdm.thin.units import parse_size as parse_size
