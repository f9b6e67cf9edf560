"""``python -m gateway``: the same as the ``mailgate`` command."""

from gateway.cli import main

raise SystemExit(main())
