"""Layer 3: the thin-pool model — values, the pool, devices, the state store."""

from libdm.thin.device import Snapshot, ThinDevice
from libdm.thin.errors import (
    DeviceNotBlankError,
    PoolError,
    PoolFailedError,
    PoolFullError,
    PoolLockedError,
    PoolReadOnlyError,
    StateError,
)
from libdm.thin.pool import Pool
from libdm.thin.report import PoolInfo
from libdm.thin.status import ThinFailed, ThinPoolFailed, ThinPoolStatus, ThinStatus
from libdm.thin.table import ThinParams, ThinPoolParams
from libdm.thin.units import Bytes, DataBlocks, MetaBlocks, Sectors, format_size, parse_size

__all__ = [
    "Pool", "ThinDevice", "Snapshot", "PoolInfo",
    "PoolError", "PoolFullError", "PoolReadOnlyError", "PoolFailedError",
    "PoolLockedError", "StateError", "DeviceNotBlankError",
    "ThinPoolStatus", "ThinPoolFailed", "ThinStatus", "ThinFailed",
    "ThinPoolParams", "ThinParams",
    "Bytes", "Sectors", "DataBlocks", "MetaBlocks", "parse_size", "format_size",
]
