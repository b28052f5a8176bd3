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

import json
import os
from dataclasses import asdict, dataclass, field

from libdm.thin.errors import StateError

__all__ = [
    "Registration",
    "config_dir",
    "register",
    "registrations",
    "status_path",
    "unregister",
    "watch_state",
]

CONFIG_ENV = "LIBDM_MONITOR_DIR"
RUN_ENV = "LIBDM_RUN_DIR"


def config_dir():
    return os.environ.get(CONFIG_ENV) or "/etc/libdm/monitor.d"


def status_path():
    return os.path.join(os.environ.get(RUN_ENV) or "/run/libdm", "monitor.json")


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
    spares: list = field(default_factory=list)

    def monitor_options(self):
        """Keyword arguments for ``pool.monitor(...)``."""
        out = {k: v for k, v in asdict(self).items() if k != "pool" and v is not None}
        out["spares"] = list(self.spares)
        return out

    def to_toml(self):
        lines = ["# registered with: libdm monitor register"]
        for key, value in asdict(self).items():
            if value is None or value == []:
                continue
            lines.append(f"{key} = {json.dumps(value)}")  # JSON strings and lists are TOML
        return "\n".join(lines) + "\n"


def _file_for(pool_dir, directory):
    name = os.path.abspath(pool_dir).strip("/").replace("/", "-") or "root"
    return os.path.join(directory, f"{name}.toml")


def register(registration, directory=None):
    """Write ``registration``'s file (replacing an earlier one for the same
    pool); a running service picks it up at its next scan.

    Returns:
        The file's path.
    """
    directory = directory or config_dir()
    os.makedirs(directory, mode=0o755, exist_ok=True)
    registration = Registration(
        **dict(asdict(registration), pool=os.path.abspath(registration.pool))
    )
    path = _file_for(registration.pool, directory)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "x") as fh:
        fh.write(registration.to_toml())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def unregister(pool_dir, directory=None):
    """Remove the pool's registration.

    Raises:
        FileNotFoundError: the pool is not registered.
    """
    directory = directory or config_dir()
    wanted = os.path.abspath(pool_dir)
    for path, registration in registrations(directory).items():
        if registration.pool == wanted:
            os.unlink(path)
            return path
    raise FileNotFoundError(f"pool {wanted} is not registered in {directory}")


def registrations(directory=None):
    """Every registration in the directory, ``{file: Registration}``.

    Raises:
        StateError: a file that is not a valid registration (named).
    """
    directory = directory or config_dir()
    out = {}
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return out
    for name in names:
        if not name.endswith(".toml"):
            continue
        path = os.path.join(directory, name)
        import tomllib  # Python 3.11; only the service and reports need it

        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
            out[path] = Registration(**data)
        except (OSError, tomllib.TOMLDecodeError, TypeError) as exc:
            raise StateError(
                f"the monitor registration {path} is not valid: {exc}", "monitor", None
            ) from None
    return out


def watch_state(pool_dir):
    """How the monitor service watches ``pool_dir``: a dict with
    ``"watched"`` (True while a running service watches it),
    ``"registered"``, and the thresholds, or ``None`` if it is not
    registered and not watched."""
    wanted = os.path.abspath(pool_dir)
    try:
        registered = next((r for r in registrations().values() if r.pool == wanted), None)
    except StateError:
        registered = None
    watched = None
    try:
        with open(status_path()) as fh:
            status = json.load(fh)
        os.kill(status["pid"], 0)
        watched = status["pools"].get(wanted)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if registered is None and watched is None:
        return None
    settings = watched or asdict(registered)
    return {
        "watched": watched is not None and watched.get("running", False),
        "registered": registered is not None,
        "threshold": settings.get("threshold"),
        "percent": settings.get("percent"),
    }
