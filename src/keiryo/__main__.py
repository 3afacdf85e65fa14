"""`python -m keiryo` is the `keiryo` command."""

from keiryo.cli import main

raise SystemExit(main())
