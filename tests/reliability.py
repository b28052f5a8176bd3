"""Moved to :mod:`support.reliability`; this alias goes once no test imports
``reliability`` directly."""

import sys

from support import reliability

sys.modules[__name__] = reliability
