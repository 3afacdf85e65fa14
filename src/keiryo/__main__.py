"""`python -m keiryo` is the `keiryo` command; `main` here is also the console script's entry point.

It imports the command (torch and all) inside its Ctrl-C handler, so an interrupt during start-up prints
`interrupted` and exits 130, like one later on, instead of a traceback. `import keiryo` itself imports no
torch (its public names load on first use), so nothing heavy runs before the handler is in place.
"""

import os
import sys

from keiryo.interrupts import SigintWatch


def main(argv: list[str] | None = None) -> int:
    """Import and run `keiryo.cli.main`; a Ctrl-C while importing is `interrupted` and 130 too.

    Run as the program (`argv` None), an interrupted run exits here with 130: see `_exit_interrupted`.
    """
    watch = SigintWatch.install()
    if watch is not None:
        watch.deferred = True
    try:
        from keiryo.cli import main as run

        if watch is not None:
            watch.deferred = False
            if watch.fired:  # pressed during the imports
                raise KeyboardInterrupt
        code = run(argv)
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt) and not (watch is not None and watch.fired):
            raise
        print("interrupted", file=sys.stderr, flush=True)
        code = 130
    if code == 130 and argv is None:
        _exit_interrupted()
    return code


def _exit_interrupted() -> None:
    """Exit with 130 now, after the atexit handlers.

    CPython ends a process by SIGINT (status -2, not 130) whenever a KeyboardInterrupt once escaped code it
    ran from a string, even if that interrupt was handled later; torch's start-up runs such code, so a
    Ctrl-C there would otherwise exit -2 after printing `interrupted`.
    """
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)


if __name__ == "__main__":
    raise SystemExit(main())
