from pluto.cli import main

raise SystemExit(main())
