"""``python -m libdm.snapshotter serve ...`` (the same as ``libdm snapshotter serve``)."""

import sys

from libdm.cli.snapshotter_cmds import main

sys.exit(main())
