from safeclip.export.cli import main

raise SystemExit(main())
