"""libdm: the Linux device-mapper from Python.

Device operations (layer 2) and the thin-pool model (layer 3) are
re-exported here: ``libdm.create``, ``libdm.remove``, ``libdm.info``, the
``DMError`` hierarchy, and ``libdm.Pool`` with its ``ThinDevice`` and
``Snapshot``.  They are imported on first use, so ``import libdm`` is
cheap.
"""

from libdm._lazy import exports
from libdm.dm import _TABLE as _DM
from libdm.thin import _TABLE as _THIN

__version__ = "0.1.0"
__all__ = [name for names in (*_DM.values(), *_THIN.values()) for name in names]
__getattr__, __dir__ = exports(__name__, {**_DM, **_THIN})
