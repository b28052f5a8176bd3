"""Stopping a long-running command on SIGTERM or SIGINT: the one place
libdm turns a signal into a call.

A Python signal handler runs in the main thread between two bytecodes,
possibly while that thread holds a lock, for instance the one inside the
:class:`threading.Event` it is waiting on.  A handler that calls
``event.set()`` or logs can then wait for a lock its own thread holds,
and the process hangs instead of stopping.  So the handler here only
writes the signal's number to a pipe, which takes no lock, and a thread
reads it and makes the call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from types import FrameType

__all__ = ["stop_on_signals"]

logger = logging.getLogger("libdm")


@contextlib.contextmanager
def stop_on_signals(
    stop: Callable[[], object],
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    *,
    log: logging.Logger = logger,
    then_ignore: bool = False,
) -> Iterator[None]:
    """Call ``stop()`` once for each of ``signals`` received while in the
    block, from a thread of its own, saying so on ``log``; the handlers in
    place before are put back on leaving (with ``then_ignore``, the
    signals are ignored from then on instead: a command that exits after
    the block is not cut short by a repeated signal).  Only the main
    thread may enter the block (Python runs signal handlers there)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # A full pipe already holds a stop that the thread has not read.
        with contextlib.suppress(BlockingIOError):
            os.write(write_end, bytes([signum]))

    def relay() -> None:
        while received := os.read(read_end, 64):
            for signum in received:
                if signum == 0:
                    return  # the block has ended
                log.info("%s received: stopping", signal.Signals(signum).name)
                stop()

    thread = threading.Thread(target=relay, name="libdm-signals", daemon=True)
    thread.start()
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        yield
    finally:
        # The thread ends after passing on what was written before; the
        # handlers stay until then, so a signal meanwhile is still only
        # written to the pipe (and a caller's cleanup is not cut short).
        os.write(write_end, b"\0")
        thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if then_ignore else handler)
        os.close(write_end)
        os.close(read_end)
