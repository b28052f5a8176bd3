"""libdm: the Linux device-mapper from Python.

Layer 2, device operations, is re-exported here: ``libdm.create``,
``libdm.remove``, ``libdm.info`` and the ``DMError`` hierarchy.  See the
documentation for the thin-pool model built on top.
"""

from libdm.dm import *  # noqa: F401,F403
from libdm.dm import __all__ as _dm_all

__version__ = "0.1.0"
__all__ = list(_dm_all) + ["__version__"]
