"""``python -m service.cli``: the ``agent-service`` command."""

from service.cli.main import main

raise SystemExit(main())
