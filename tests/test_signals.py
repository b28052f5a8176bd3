"""Stopping on a signal (libdm._signals): the call a signal asks for is
made from a thread, so it may take a lock the main thread holds when the
signal comes.  No kernel is needed: this is about Python's signal
handling, not device-mapper."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

# The main thread holds the lock ``stop`` needs when SIGTERM comes, as
# when a server's main thread is inside ``Event.wait`` and the handler
# calls ``Event.set``.  A handler that called ``stop`` itself would wait
# for its own thread forever.
_HELD_LOCK = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from libdm._signals import stop_on_signals

    lock = threading.Lock()
    stopped = threading.Event()
    calls = []

    def stop():
        with lock:
            calls.append(threading.current_thread().name)
            stopped.set()

    with stop_on_signals(stop):
        with lock:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs here, in this thread
        if not stopped.wait(20):
            sys.exit("stop() was not called")
    handler = signal.getsignal(signal.SIGTERM)
    if handler is not signal.SIG_DFL:
        sys.exit(f"the handler was not put back: {handler!r}")
    print(len(calls), calls[0] != threading.main_thread().name)
    """
)


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_signal_while_the_main_thread_holds_the_stop_lock_stops() -> None:
    done = _run(_HELD_LOCK)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "True"]


def test_each_signal_is_one_stop_call_and_the_old_handlers_return() -> None:
    script = textwrap.dedent(
        """
        import os, signal, threading
        from libdm._signals import stop_on_signals

        calls = threading.Semaphore(0)
        mine = lambda signum, frame: None
        signal.signal(signal.SIGINT, mine)
        with stop_on_signals(calls.release):
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), sig)
            got = sum(calls.acquire(timeout=20) for _ in range(3))
        print(got, signal.getsignal(signal.SIGINT) is mine)
        """
    )
    done = _run(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "True"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_block_ends_with_no_thread_left(sig: signal.Signals) -> None:
    script = textwrap.dedent(
        f"""
        import os, threading
        from libdm._signals import stop_on_signals

        stop = threading.Event()
        with stop_on_signals(stop.set):
            os.kill(os.getpid(), {int(sig)})
            stop.wait()
        print(threading.active_count())
        """
    )
    done = _run(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]
