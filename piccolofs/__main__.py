from piccolofs.cli import main

raise SystemExit(main())
