"""`python -m agent.cli`: the `bestshot` command."""

from agent.cli.main import main

raise SystemExit(main())
