"""`python -m duet ...` runs the same CLI as the `duet` command."""

from duet.cli import main

raise SystemExit(main())
