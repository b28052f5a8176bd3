"""Figures for the reliability report (see tests/reliability_report.py).

Tests call :func:`record` with what they did; the figures go to the
directory named by ``LIBDM_RELIABILITY_LOG`` when the report command runs
them, and nowhere otherwise: one file per kernel, because two test kernels
appending to one shared host file can overwrite each other's lines.
Numbers are added up over a suite's records; lists (the operations and
crash points a randomized suite reached, and its ``gaps``, what it never
reached) are merged.  :func:`scale` picks the reduced count the everyday
test command uses, or the full one the report asks for with
``LIBDM_RELIABILITY=full``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def full() -> bool:
    """Whether the full counts were asked for (``LIBDM_RELIABILITY=full``)."""
    return os.environ.get("LIBDM_RELIABILITY") == "full"


def scale(reduced: T, complete: T) -> T:
    """``complete`` when :func:`full`, else ``reduced``."""
    return complete if full() else reduced


def gaps(wanted: Iterable[str], reached: Iterable[str]) -> list[str]:
    """What of ``wanted`` was never ``reached``, sorted: a randomized suite
    names these so the report can say what its figures do not cover."""
    return sorted(set(wanted) - set(reached))


def record(suite: str, **figures: object) -> None:
    """Append one record of ``suite``'s figures to this kernel's file in
    ``LIBDM_RELIABILITY_LOG``, if set."""
    directory = os.environ.get("LIBDM_RELIABILITY_LOG")
    if not directory:
        return
    with open("/proc/sys/kernel/random/boot_id") as fh:
        boot = fh.read().strip()
    with open(os.path.join(directory, f"{boot}.jsonl"), "a") as fh:
        fh.write(json.dumps({"suite": suite, **figures}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
