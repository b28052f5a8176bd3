"""Which pools the monitor service watches, and with what thresholds.

One small TOML file per pool in a configuration directory (by default
``/etc/libdm/monitor.d``, or ``$LIBDM_MONITOR_DIR``), as dmeventd keeps a
registration per LVM volume::

    # /etc/libdm/monitor.d/images.toml
    pool = "/var/lib/images"
    threshold = 80
    percent = 20

The service (``libdm monitor serve``, :mod:`libdm.service`) writes what
it is watching to a status file (``/run/libdm/monitor.json``, or
``$LIBDM_RUN_DIR``), so :func:`watch_state` can tell a pool's report
whether the pool is watched right now.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, TypedDict, overload

from libdm.thin.errors import StateError

if TYPE_CHECKING:
    from libdm.thin.monitor import Monitor, W

__all__ = [
    "InvalidRegistration",
    "MonitorOptions",
    "Registration",
    "Registrations",
    "WatchState",
    "config_dir",
    "read",
    "register",
    "registrations",
    "status_path",
    "unregister",
    "watch_state",
]

CONFIG_ENV = "LIBDM_MONITOR_DIR"
RUN_ENV = "LIBDM_RUN_DIR"


def config_dir() -> str:
    """The registrations' directory: ``$LIBDM_MONITOR_DIR`` or ``/etc/libdm/monitor.d``."""
    return os.environ.get(CONFIG_ENV) or "/etc/libdm/monitor.d"


def status_path() -> str:
    """The service's status file: in ``$LIBDM_RUN_DIR`` or ``/run/libdm``."""
    return os.path.join(os.environ.get(RUN_ENV) or "/run/libdm", "monitor.json")


class MonitorOptions(TypedDict, total=False):
    """Keyword arguments for ``pool.monitor(...)`` (see :class:`~libdm.thin.monitor.Monitor`)."""

    threshold: int
    percent: int
    metadata_threshold: int
    max_data_size: int
    max_metadata_size: int
    reserve: int
    spares: list[str]


@dataclass(frozen=True)
class Registration:
    """A pool to watch and the :class:`~libdm.thin.monitor.Monitor`
    settings to watch it with (sizes in bytes)."""

    pool: str
    threshold: int = 80
    percent: int = 20
    metadata_threshold: int | None = None
    max_data_size: int | None = None
    max_metadata_size: int | None = None
    reserve: int | None = None
    spares: list[str] = field(default_factory=list)

    @classmethod
    def from_toml(cls, data: Mapping[str, object]) -> Registration:
        """The registration a parsed TOML file holds.

        Raises:
            ValueError: a missing or unknown key, or a value of the wrong
                type (named).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        pool = data.get("pool")
        if not isinstance(pool, str) or not pool:
            raise ValueError(f"'pool' is {pool!r}, not a pool directory")
        spares = data.get("spares", [])
        if not isinstance(spares, list) or not all(isinstance(s, str) for s in spares):
            raise ValueError(f"'spares' is {spares!r}, not a list of device paths")
        return cls(
            pool,
            threshold=_whole(data, "threshold", cls.threshold),
            percent=_whole(data, "percent", cls.percent),
            metadata_threshold=_whole(data, "metadata_threshold", None),
            max_data_size=_whole(data, "max_data_size", None),
            max_metadata_size=_whole(data, "max_metadata_size", None),
            reserve=_whole(data, "reserve", None),
            spares=list(spares),
        )

    def monitor_options(self) -> MonitorOptions:
        """Keyword arguments for ``pool.monitor(...)``."""
        out = MonitorOptions(threshold=self.threshold, percent=self.percent)
        if self.metadata_threshold is not None:
            out["metadata_threshold"] = self.metadata_threshold
        if self.max_data_size is not None:
            out["max_data_size"] = self.max_data_size
        if self.max_metadata_size is not None:
            out["max_metadata_size"] = self.max_metadata_size
        if self.reserve is not None:
            out["reserve"] = self.reserve
        out["spares"] = list(self.spares)
        return out

    def monitor(self, pool: W, *, interval: float = 10.0) -> Monitor[W]:
        """A :class:`~libdm.thin.monitor.Monitor` of ``pool`` with these
        settings (not started)."""
        from libdm.thin.monitor import Monitor

        return Monitor(pool, interval=interval, **self.monitor_options())

    def to_toml(self) -> str:
        """The registration's file."""
        lines = ["# a pool registered with the monitor service of libdm"]
        for key, value in asdict(self).items():
            if value is None or value == []:
                continue
            lines.append(f"{key} = {json.dumps(value)}")  # JSON strings and lists are TOML
        return "\n".join(lines) + "\n"


@overload
def _whole(data: Mapping[str, object], key: str, default: int) -> int: ...
@overload
def _whole(data: Mapping[str, object], key: str, default: None) -> int | None: ...
def _whole(data: Mapping[str, object], key: str, default: int | None) -> int | None:
    """``data[key]``, checked to be a whole number, or ``default`` if absent."""
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key!r} is {value!r}, not a whole number")
    return value


def _file_for(pool_dir: str, directory: str) -> str:
    """The pool's registration file: its path with each '/' made '-',
    after '%' and '-' are percent-encoded, so that distinct paths get
    distinct names (``/var/lib-images`` is ``var-lib%2Dimages.toml``, not
    ``/var/lib/images``'s ``var-lib-images.toml``).  A path with neither
    keeps the name earlier versions gave it; their other files are still
    read, as every file is read for the pool it names."""
    path = os.path.abspath(pool_dir).strip("/")
    name = path.replace("%", "%25").replace("-", "%2D").replace("/", "-") or "%2F"
    return os.path.join(directory, f"{name}.toml")


def register(registration: Registration, directory: str | None = None) -> str:
    """Write ``registration``'s file (replacing an earlier one for the same
    pool); a running service picks it up at its next scan.

    Returns:
        The file's path.

    Raises:
        StateError: the file's name is taken by another pool's
            registration (written by an earlier version) that cannot be
            renamed to its own name, or by a file that is not a
            registration libdm can read (another program's, or one edited
            by hand): it is left as it is.
    """
    directory = directory or config_dir()
    os.makedirs(directory, mode=0o755, exist_ok=True)
    registration = replace(registration, pool=os.path.abspath(registration.pool))
    path = _file_for(registration.pool, directory)
    everything = read(directory)
    for bad in everything.invalid:
        if bad.path == path:
            raise StateError(
                f"{bad.reason}; libdm did not write it as it is, so it is left alone: "
                f"move it away (or mend it) and register again",
                "register",
                path,
            )
    if os.path.lexists(path) and path not in everything.valid:
        raise StateError(
            f"{path} is in the way of the monitor registration and is not one",
            "register",
            path,
        )
    found = everything.valid
    holder = found.get(path)
    if holder is not None and holder.pool != registration.pool:
        _rename_to_own_name(path, holder, directory)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "x") as fh:
        fh.write(registration.to_toml())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    for other, earlier in found.items():
        if other != path and earlier.pool == registration.pool:
            os.unlink(other)  # this pool's file under an earlier version's name
    return path


def _rename_to_own_name(path: str, holder: Registration, directory: str) -> None:
    """Give another pool's registration, written under the name an earlier
    version gave it, the name it has now (never replacing a file there)."""
    own = _file_for(holder.pool, directory)
    try:
        os.link(path, own)
    except FileExistsError:
        raise StateError(
            f"the monitor registration {path} is the one of pool {holder.pool}, "
            f"written by an earlier libdm, and {own} is there as well; remove "
            f"the one that is out of date",
            "monitor",
            None,
        ) from None
    os.unlink(path)


def unregister(pool_dir: str, directory: str | None = None) -> str:
    """Remove the pool's registration (every file that names the pool).

    Returns:
        The removed file's path.

    Raises:
        FileNotFoundError: the pool is not registered.
    """
    directory = directory or config_dir()
    wanted = os.path.abspath(pool_dir)
    paths = [p for p, r in read(directory).valid.items() if r.pool == wanted]
    for path in paths:  # more than one if an earlier version wrote one too
        os.unlink(path)
    if paths:
        return paths[0]
    raise FileNotFoundError(f"pool {wanted} is not registered in {directory}")


@dataclass(frozen=True)
class InvalidRegistration:
    """A file in the registrations' directory that is not a valid
    registration.

    Attributes:
        path: the file.
        reason: what is wrong, naming the file.
    """

    path: str
    reason: str


@dataclass(frozen=True)
class Registrations:
    """What the registrations' directory holds (see :func:`read`).

    Attributes:
        valid: ``{file: Registration}``, in the order of the file names.
        invalid: the files that could not be read as registrations.
    """

    valid: Mapping[str, Registration]
    invalid: tuple[InvalidRegistration, ...]


def read(directory: str | None = None) -> Registrations:
    """Every file in the directory: the valid registrations, and the files
    that are not (each with why), so that one bad file does not hide the
    others."""
    import tomllib  # Python 3.11; only the service and reports need it

    directory = directory or config_dir()
    valid: dict[str, Registration] = {}
    invalid: list[InvalidRegistration] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return Registrations(valid, ())
    for name in names:
        if not name.endswith(".toml"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
            valid[path] = Registration.from_toml(data)
        except (OSError, tomllib.TOMLDecodeError, ValueError) as exc:
            reason = f"the monitor registration {path} is not valid: {exc}"
            invalid.append(InvalidRegistration(path, reason))
    return Registrations(valid, tuple(invalid))


def registrations(directory: str | None = None) -> dict[str, Registration]:
    """Every registration in the directory, ``{file: Registration}``.

    Raises:
        StateError: a file that is not a valid registration (named; use
            :func:`read` to get the others all the same).
    """
    found = read(directory)
    if found.invalid:
        raise StateError(found.invalid[0].reason, "monitor", None)
    return dict(found.valid)


@dataclass(frozen=True)
class WatchState:
    """How the monitor service watches a pool (see :func:`watch_state`).

    Attributes:
        watched: True while a running service watches it.
        registered: True if a registration names it.
        threshold, percent: the settings it is (or would be) watched with.
    """

    watched: bool
    registered: bool
    threshold: int | None
    percent: int | None


def watch_state(pool_dir: str) -> WatchState | None:
    """How the monitor service watches ``pool_dir``, or ``None`` if it is
    not registered and not watched."""
    wanted = os.path.abspath(pool_dir)
    registered = next((r for r in read().valid.values() if r.pool == wanted), None)
    watched = _watched(wanted)
    if watched is not None:
        running = watched.get("running") is True
        threshold, percent = watched.get("threshold"), watched.get("percent")
        return WatchState(
            watched=running,
            registered=registered is not None,
            threshold=threshold if isinstance(threshold, int) else None,
            percent=percent if isinstance(percent, int) else None,
        )
    if registered is None:
        return None
    return WatchState(False, True, registered.threshold, registered.percent)


def _watched(pool_dir: str) -> dict[str, Any] | None:
    """What a running service's status file says of ``pool_dir``, or
    ``None`` (no service running, or it does not watch the pool)."""
    try:
        with open(status_path()) as fh:
            status = json.load(fh)
        os.kill(status["pid"], 0)
        entry = status["pools"].get(pool_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return entry if isinstance(entry, dict) else None
