"""Named crash points, for tests that kill the process mid-change.

A test arms one with :func:`arm` (``"<point>"`` or ``"<point>@<n>"``, the
n-th time it is reached, counting from 1); the process then SIGKILLs
itself there, so that a test can stop a provisioning process at every
step of a change and check that ``Pool.open`` in a fresh process puts
things right.  Production code never arms them: nothing here reads the
environment.  The testing package arms child processes from the
``LIBDM_CRASH_AT`` variable the tests set (see
``libdm/testing/boot/sitecustomize.py``).  Unarmed, a point costs one
comparison.  The points are listed in :data:`POINTS`.
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "arm", "disarm", "point"]

POINTS = (
    "create:intent",  # intent recorded, nothing sent
    "create:message",  # create_thin / create_snap sent
    "create:transaction",  # set_transaction_id sent and committed, device not yet active
    "create:activated",  # the new device live, its record not yet written
    "create:recorded",  # device active, store updated
    "snapshot:suspended",  # origin suspended, create_snap not sent
    "delete:intent",  # intent recorded, nothing discarded or removed
    "delete:deactivated",  # blocks discarded, thin device removed, id not deleted
    "delete:message",
    "delete:transaction",
    "pool:made",  # store and backing files made, pool not yet recorded
    "pool:created",  # pool device loaded, store not yet written
    "grow:intent",  # growth intent recorded, nothing changed yet
    "grow:truncated",  # a loop file grown, its loop device not yet told
    "grow:backing",  # files grown or segments recorded, pool not suspended
    "grow:loaded",  # pool suspended with the new table loaded, not resumed
    "grow:resumed",  # pool resumed on the new table, outcome not recorded
    "resize_device:recorded",  # a thin device's new size stored, table not reloaded
    "activate:made",  # a thin device made live, its record still says inactive
    "deactivate:removed",  # a thin device removed, its record still says active
)

_armed: tuple[str, int] | None = None  # (point, n) once armed
_seen: dict[str, int] = {}


def arm(spec: str) -> None:
    """Arm the point ``spec`` names: ``"<point>"`` or ``"<point>@<n>"``
    (any name a caller of :func:`point` uses: the pool's :data:`POINTS`,
    or the snapshotter's).

    Raises:
        ValueError: a bad count.
    """
    global _armed
    target, _, nth = spec.partition("@")
    count = int(nth or 1)
    if count < 1:
        raise ValueError(f"crash point count must be 1 or more, got {nth!r}")
    _armed = (target, count)
    _seen.clear()


def disarm() -> None:
    global _armed
    _armed = None


def point(name: str) -> None:
    """Die here (SIGKILL) if a test armed this point."""
    if _armed is None or _armed[0] != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= _armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)
