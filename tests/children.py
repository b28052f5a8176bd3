"""Moved to :mod:`support.children`; this alias goes once no test imports
``children`` directly."""

import sys

from support import children

sys.modules[__name__] = children
