"""libdevmapper's log, routed into Python ``logging``.

libdevmapper reports through a process-wide variadic callback.  A small C
shim (see ``build_ffi.py``) formats each message and calls
``libdm_py_log`` below, which

* emits it on the ``libdm`` logger (libdevmapper's levels mapped to
  ``logging``'s), and
* appends it to the capture buffer of the task now running, so that a
  failure can carry the lines that explain it.

The shim drops messages above a level threshold before formatting them.
Warnings and errors always pass (failures need them); debug chatter passes
only while the ``libdm`` logger is enabled for DEBUG, so it costs nothing
otherwise.  Nothing is printed to stderr by the library itself: the
``libdm`` logger has a ``NullHandler``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from libdm.dm._lib import ffi, lib

if TYPE_CHECKING:
    from libdm.dm._lib import CData

__all__ = ["LEVELS", "capture", "logger", "sync_level"]

logger = logging.getLogger("libdm")
logger.addHandler(logging.NullHandler())

# libdevmapper's private levels (lib/log.h) -> logging levels.
_FATAL, _ERR, _WARN, _NOTICE, _INFO, _DEBUG = 2, 3, 4, 5, 6, 7
LEVELS: dict[int, int] = {
    _FATAL: logging.CRITICAL,
    _ERR: logging.ERROR,
    _WARN: logging.WARNING,
    _NOTICE: logging.INFO,
    _INFO: logging.INFO,
    _DEBUG: logging.DEBUG,
}

# The lines of the task now running.  Tasks run one at a time under the
# library lock (see task.py), so one list is enough.
_capture: list[str] | None = None
_forward_level = _WARN


@ffi.def_extern()
def libdm_py_log(level: int, file: CData, line: int, dm_errno_or_class: int, msg: CData) -> None:
    text = ffi.string(msg).decode("utf-8", "replace")
    if _capture is not None and level <= _WARN:
        _capture.append(text)
    pylevel = LEVELS.get(level, logging.DEBUG)
    if logger.isEnabledFor(pylevel):
        logger.log(
            pylevel,
            "%s",
            text,
            extra={
                "dm_file": ffi.string(file).decode("utf-8", "replace") if file else "",
                "dm_line": line,
                "dm_errno": dm_errno_or_class if level <= _WARN else 0,
            },
        )


class capture:
    """Collect the log lines libdevmapper emits while a task runs.

    Use as ``with capture() as lines: ...``; ``lines`` is a list of
    strings.  Only warnings and errors are kept.  Must be used under the
    library lock.
    """

    def __init__(self) -> None:
        self._outer: list[str] | None = None
        self.lines: list[str] = []

    def __enter__(self) -> list[str]:
        global _capture
        self._outer = _capture
        self.lines = []
        _capture = self.lines
        return self.lines

    def __exit__(self, *exc: object) -> Literal[False]:
        global _capture
        _capture = self._outer
        return False


def sync_level() -> None:
    """Forward debug messages from C only while someone listens for them."""
    global _forward_level
    wanted = _DEBUG if logger.isEnabledFor(logging.DEBUG) else _WARN
    if wanted != _forward_level:
        _forward_level = wanted
        lib.libdm_log_set_level(wanted)


lib.libdm_log_install(_forward_level)
