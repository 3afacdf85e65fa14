"""Ctrl-C as keiryo reports it: one `interrupted` line and exit 130, wherever the interrupt lands.

This module imports nothing heavy: `keiryo.__main__` installs the watch before torch is imported.
"""

from __future__ import annotations

import signal
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
    def install(cls) -> SigintWatch | None:
        """Replace Python's default SIGINT handler (only that one, only in the main thread); None if not."""
        if threading.current_thread() is not threading.main_thread():
            return None
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return None
        watch = cls()
        signal.signal(signal.SIGINT, watch)
        return watch


def uninstall(watch: SigintWatch | None) -> None:
    """Put Python's default SIGINT handler back, if `watch` was installed."""
    if watch is not None:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupted() -> bool:
    """Whether Ctrl-C was pressed during this run, even if a library swallowed its KeyboardInterrupt."""
    return bool(getattr(signal.getsignal(signal.SIGINT), "fired", False))
