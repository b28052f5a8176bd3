"""Arms a crash point in a test's child process (see libdm.thin.crash).

The test harness puts this directory first on ``PYTHONPATH`` for the test
session, so every Python process a test starts runs this at start-up;
only a process whose environment names a point (``LIBDM_CRASH_AT``) is
armed.  The library itself never reads that variable.
"""

import os

_spec = os.environ.get("LIBDM_CRASH_AT")
if _spec:
    from libdm.thin import crash

    crash.arm(_spec)
