"""Named crash points, for tests that kill the process mid-change.

``LIBDM_CRASH_AT=<point>`` in the environment makes the process SIGKILL
itself when it reaches that point (``LIBDM_CRASH_AT=<point>@<n>`` on the
n-th time, counting from 1), so a test can stop a provisioning process at
every step of a change and check that ``Pool.open`` in a fresh process
puts things right.  With the variable unset a point costs one dict
lookup.  The points are listed in :data:`POINTS`.
"""

import os
import signal

__all__ = ["POINTS", "point"]

POINTS = (
    "create:intent",       # intent recorded, nothing sent
    "create:message",      # create_thin / create_snap sent
    "create:transaction",  # set_transaction_id sent and committed
    "create:recorded",     # store updated, device not yet active
    "snapshot:suspended",  # origin suspended, create_snap not sent
    "delete:deactivated",  # thin device removed, intent not recorded
    "delete:intent",
    "delete:message",
    "delete:transaction",
    "pool:created",        # pool device loaded, store not yet written
    "grow:intent",         # growth intent recorded, nothing changed yet
    "grow:backing",        # files grown or segments recorded, pool not suspended
    "grow:loaded",         # pool suspended with the new table loaded, not resumed
    "grow:resumed",        # pool resumed on the new table, outcome not recorded
    "resize_device:recorded",  # a thin device's new size stored, table not reloaded
)

_armed = os.environ.get("LIBDM_CRASH_AT")
_seen = {}


def point(name):
    """Die here (SIGKILL) if the environment armed this point."""
    if _armed is None:
        return
    target, _, nth = _armed.partition("@")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
