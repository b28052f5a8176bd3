"""The snapshotter's configuration: a TOML file, read with ``tomllib``.

Keys (all optional except the pool, which ``--pool`` can give instead)::

    pool = "/var/lib/libdm/images"     # the libdm pool's state directory
    root_path = ""                    # snapshotter.db's private directory (default: the pool's)
    base_image_size = "10G"           # size of the base device every layer starts from
    fs_type = "ext4"                  # or "xfs"
    fs_options = ""                   # extra mkfs arguments, e.g. "-b 4096"
    async_remove = false              # Remove returns before the device is deleted
    discard_blocks = false            # true: discard before every delete; false: the pool's say
    device_prefix = "ctrd-"           # device names: <prefix><token>-<id>, <prefix><token>-base

    [monitor]                         # grow the pool before it fills (libdm.Monitor)
    enabled = true
    threshold = 80                    # percent used that triggers growth
    percent = 20                      # grow by this percent of the current size
    metadata_threshold = 80
    interval = 10.0                   # seconds between checks
    max_data_size = ""                # never grow the data past this ("" = no limit)

The names follow containerd's devmapper snapshotter where it has the same
setting (``root_path``, ``base_image_size``, ``fs_type``, ``fs_options``,
``async_remove``, ``discard_blocks``; its ``pool_name`` is our ``pool``).
"""

import dataclasses
import os
import shlex
from collections.abc import Mapping
from typing import Self, TypeVar

from libdm.thin.units import parse_size

__all__ = ["Config", "MonitorConfig", "load_config"]


@dataclasses.dataclass
class MonitorConfig:
    enabled: bool = True
    threshold: int = 80
    percent: int = 20
    metadata_threshold: int = 80
    interval: float = 10.0
    max_data_size: str = ""


@dataclasses.dataclass
class Config:
    pool: str = ""
    root_path: str = ""
    base_image_size: str = "10G"
    fs_type: str = "ext4"
    fs_options: str = ""
    async_remove: bool = False
    discard_blocks: bool = False
    device_prefix: str = "ctrd-"
    monitor: MonitorConfig = dataclasses.field(default_factory=MonitorConfig)

    def validate(self) -> Self:
        """This config, once every value is checked.

        Raises:
            ValueError: the first bad value, named.
        """
        if self.fs_type not in ("ext4", "xfs"):
            raise ValueError(f"fs_type must be ext4 or xfs, not {self.fs_type!r}")
        parse_size(self.base_image_size, what="base_image_size")
        if not self.device_prefix or "/" in self.device_prefix:
            raise ValueError(f"bad device_prefix {self.device_prefix!r}")
        m = self.monitor
        for what in ("threshold", "metadata_threshold"):
            value = getattr(m, what)
            if not 0 < value < 100:
                raise ValueError(f"monitor.{what} must be between 1 and 99, got {value}")
        if not 0 < m.percent <= 1000:
            raise ValueError(f"monitor.percent must be between 1 and 1000, got {m.percent}")
        if m.interval <= 0:
            raise ValueError("monitor.interval must be positive")
        if m.max_data_size:
            parse_size(m.max_data_size, what="monitor.max_data_size")
        return self

    @property
    def mkfs_options(self) -> list[str]:
        """``fs_options`` as mkfs's arguments (split as a shell would)."""
        return shlex.split(self.fs_options)


_Section = TypeVar("_Section", Config, MonitorConfig)
_KINDS: dict[str, type] = {"str": str, "bool": bool, "int": int, "float": float}


def _typed(cls: type[_Section], table: Mapping[str, object], where: str) -> _Section:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, object] = {}
    for name, value in table.items():
        if name not in fields:
            raise ValueError(f"unknown setting {where}{name!r}")
        f = fields[name]
        if f.name == "monitor":
            if not isinstance(value, dict):
                raise ValueError("[monitor] must be a table")
            values[name] = _typed(MonitorConfig, value, "monitor.")
            continue
        kind = f.type if isinstance(f.type, type) else _KINDS[str(f.type)]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ValueError(f"setting {where}{name} must be a {kind.__name__}, not {value!r}")
        values[name] = value
    return cls(**values)  # type: ignore[arg-type]  # each value was checked against its field


def load_config(path: str | os.PathLike[str] | None = None, **overrides: object) -> Config:
    """Read the TOML file at ``path`` (none: defaults), apply the non-None
    ``overrides`` and validate.

    Raises:
        ValueError: an unknown setting, a wrong type, a bad value.
        OSError: the file cannot be read.
    """
    table: dict[str, object] = {}
    if path is not None:
        import tomllib

        with open(path, "rb") as fh:
            try:
                table = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path}: {exc}") from None
    config = _typed(Config, table, "")
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    return config.validate()
