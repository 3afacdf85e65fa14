"""`python -m keiryo` is the `keiryo` command; `main` here is also the console script's entry point.

It imports the command (torch and all) inside its Ctrl-C handler, so an interrupt during start-up prints
`interrupted` and exits 130, like one later on, instead of a traceback.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    """Import and run `keiryo.cli.main`; a KeyboardInterrupt while importing is exit 130 too."""
    try:
        from keiryo.cli import main as run

        return run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
