"""``python -m libdm``: the command-line tool."""

from libdm.cli import main

raise SystemExit(main())
