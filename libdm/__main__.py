from libdm.cli import main

raise SystemExit(main())
