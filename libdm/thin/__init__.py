"""Layer 3: the thin-pool model — values, the pool, devices, the state store."""

from typing import TYPE_CHECKING

from libdm._lazy import exports

_TABLE = {
    "libdm.thin.pool": ("Pool",),
    "libdm.thin.device": ("ThinDevice", "Snapshot"),
    "libdm.thin.report": ("PoolInfo",),
    "libdm.thin.repair": ("RepairResult", "DeviceRecovery", "MetadataLossError"),
    "libdm.thin.errors": (
        "PoolError",
        "PoolFullError",
        "PoolReadOnlyError",
        "RefusedError",
        "PoolFailedError",
        "PoolLockedError",
        "StateError",
        "ForeignDeviceError",
        "ChangedByAnotherError",
        "DeviceNotBlankError",
        "HandedOverError",
        "FilesystemError",
    ),
    "libdm.thin.status": ("ThinPoolStatus", "ThinPoolFailed", "ThinStatus", "ThinFailed"),
    "libdm.thin.table": ("ThinPoolParams", "ThinParams"),
    "libdm.thin.units": (
        "Bytes",
        "Sectors",
        "DataBlocks",
        "MetaBlocks",
        "parse_size",
        "format_size",
    ),
}
__all__ = [name for names in _TABLE.values() for name in names]
__getattr__, __dir__ = exports(__name__, _TABLE)

# What a type checker sees instead of __getattr__ (the same names).
if TYPE_CHECKING:
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
