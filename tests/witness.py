"""Moved to :mod:`support.witness`; this alias goes once no test imports
``witness`` directly."""

import sys

from support import witness

sys.modules[__name__] = witness
