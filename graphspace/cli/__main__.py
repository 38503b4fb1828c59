"""`python -m graphspace.cli` runs the `graphspace` command."""

from graphspace.cli import main

raise SystemExit(main())
