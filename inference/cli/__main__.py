"""``python -m inference.cli``: the `radserve` command (what the tests and the server process helpers run)."""

from inference.cli import main

raise SystemExit(main())
