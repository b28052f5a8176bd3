"""Layer 3: the thin-pool model — values, the pool, devices, the state store."""

from libdm._lazy import exports

_TABLE = {
    "libdm.thin.pool": ("Pool",),
    "libdm.thin.device": ("ThinDevice", "Snapshot"),
    "libdm.thin.report": ("PoolInfo",),
    "libdm.thin.errors": (
        "PoolError",
        "PoolFullError",
        "PoolReadOnlyError",
        "PoolFailedError",
        "PoolLockedError",
        "StateError",
        "DeviceNotBlankError",
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
