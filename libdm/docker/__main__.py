import sys

from libdm.cli.docker_cmds import main

sys.exit(main())
