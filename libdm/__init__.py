"""libdm: the Linux device-mapper from Python.

Device operations (layer 2) and the thin-pool model (layer 3) are
re-exported here: ``libdm.create``, ``libdm.remove``, ``libdm.info``, the
``DMError`` hierarchy, and ``libdm.Pool`` with its ``ThinDevice`` and
``Snapshot``.
"""

from libdm.dm import *  # noqa: F401,F403
from libdm.dm import __all__ as _dm_all
from libdm.thin import *  # noqa: F401,F403
from libdm.thin import __all__ as _thin_all

__version__ = "0.1.0"
__all__ = list(_dm_all) + list(_thin_all)
