"""What a training run shows while it runs: a live bar with loss/accuracy, and plain lines that stay; and a
plain counting bar for other long passes (`counting`).

Silent when disabled (progress=False, or a worker other than rank 0), so callers never check themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class TrainingProgress:
    """A transient progress bar per epoch, and `line` for what should stay on screen (splits, epoch ends)."""

    def __init__(self, enabled: bool, epochs: int, steps: int) -> None:
        self.enabled, self.epochs, self.steps = enabled, epochs, steps
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> TrainingProgress:
        if self.enabled:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                transient=True,
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def start_epoch(self, epoch: int, completed: int = 0) -> None:
        """A fresh bar for `epoch` (0-based), `completed` steps already done (a resumed epoch)."""
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(
                f"epoch {epoch + 1}/{self.epochs}", total=self.steps, completed=completed, stats=""
            )

    def step(self, loss: float, accuracy: float | None) -> None:
        """Advance the bar one step, showing the running loss and accuracy."""
        if self._bar is not None:
            stats = f"loss {loss:.4f}" + (f"  acc {accuracy:.1%}" if accuracy is not None else "")
            self._bar.update(self._task, advance=1, stats=stats)

    def line(self, text: str) -> None:
        """Print a line that stays (above the bar while it runs)."""
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, soft_wrap=True)
        elif self.enabled:
            say(text)


@contextmanager
def counting(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A transient bar for long work that is not training (a pass over calibration windows, say): yields
    `advance(n)`; silent when disabled."""
    if not enabled:
        yield lambda n: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def say(text: str) -> None:
    """Print a line of training news (how the data was split, ...) to the terminal."""
    Console().print(text, highlight=False, soft_wrap=True)


def epoch_line(log, epochs: int) -> str:
    """The line that stays after an epoch (`log` is a `keiryo.loop.EpochLog`)."""
    parts = [f"epoch {log.epoch:>3}/{epochs}", f"loss {log.train_loss:.4f}"]
    if log.train_accuracy is not None:
        parts.append(f"acc {log.train_accuracy:.1%}")
    if log.val_accuracy is not None:
        parts.append(f"val acc {log.val_accuracy:.1%}")
    elif log.val_loss is not None:
        parts.append(f"val loss {log.val_loss:.4f}")
    parts.append(f"{log.seconds:.1f}s")
    return "  ".join(parts)
