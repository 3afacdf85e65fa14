"""`python -m keiryo` is the `keiryo` command; `main` here is also the console script's entry point.

It imports the command (torch and all) inside its Ctrl-C handler, so an interrupt during start-up prints
`interrupted` and exits 130, like one later on, instead of a traceback.
"""

import os
import signal
import sys
import threading


class SigintWatch:
    """A SIGINT handler that remembers it fired, then raises KeyboardInterrupt as Python's own does.

    Some libraries' C code clears whatever exception is pending (torch's start-up does, around its numpy
    import), so a Ctrl-C can surface later as an unrelated error; `fired` still tells that it was a Ctrl-C.
    While `deferred` (the start-up imports), a first Ctrl-C is only noted: raised inside torch's import it
    can abort the process (a C++ terminate) or leave numpy half imported. A second one raises at once.
    """

    fired = False
    deferred = False

    def __call__(self, signum: int, frame: object) -> None:
        first = not self.fired
        self.fired = True
        if self.deferred and first:
            return
        raise KeyboardInterrupt

    @classmethod
    def install(cls) -> "SigintWatch | None":
        """Replace Python's default SIGINT handler (only that one, only in the main thread); None if not."""
        if threading.current_thread() is not threading.main_thread():
            return None
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return None
        watch = cls()
        signal.signal(signal.SIGINT, watch)
        return watch


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
