"""Moved to :mod:`support.blockio`; this alias goes once no test imports
``blockio`` directly."""

import sys

from support import blockio

sys.modules[__name__] = blockio
