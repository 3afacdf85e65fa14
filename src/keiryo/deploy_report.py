"""What `keiryo.deploy` found: every candidate measured, the choice per batch size, and how they are shown
(markdown for report.md, JSON for report.json, a rich table for the terminal, one line per choice)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

FLOAT = "torch"  # the float candidate: PyTorch eager, BatchNorm folded


@dataclass
class Candidate:
    """One way to run the model, as built and measured here."""

    name: str
    runtime: str
    precision: str
    cosine: float | None = None
    top1: float | None = None
    within_tolerance: bool = False
    p50_ms: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)  # float p50 / this p50, in the same run
    bytes: int | None = None
    build_s: float = 0.0
    chosen_for: list[int] = field(default_factory=list)  # the batch sizes it serves
    runoff: list[int] = field(default_factory=list)  # batch sizes where it was timed again, head to head
    artifact: str | None = None  # its file in the output folder
    writable: bool = True  # False once writing its artifact failed: it is not chosen again
    note: str = ""


@dataclass
class DeployReport:
    """Every candidate measured, the choice per batch size, the artifacts written and the machine."""

    candidates: list[Candidate]
    chosen: dict[int, str]  # batch size -> candidate name
    cpu: str
    threads: int
    tolerance: str
    messages: list[str]
    out: str | None = None
    written: list[str] = field(default_factory=list)  # one line per artifact written and loaded back
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False)  # built candidates, not saved

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)

    def model_for(self, batch_size: int) -> nn.Module:
        """The chosen model at a batch size that was timed (a PyTorch module or a runtime Runner)."""
        return self.models[self.chosen[batch_size]]

    def artifact_bytes(self) -> int | None:
        """Bytes of the model chosen at the largest batch size."""
        return self.candidate(self.chosen[max(self.chosen)]).bytes

    def choice_lines(self) -> list[str]:
        """One line per batch size saying what was chosen and by how much it beats float."""
        lines = []
        for b, name in self.chosen.items():
            c = self.candidate(name)
            if name == FLOAT:
                lines.append(
                    f"batch {b}: float kept (PyTorch eager, BatchNorm folded): nothing was faster here"
                )
            else:
                speed = f"{c.speedup[b]:.2f}× float"
                lines.append(f"batch {b}: {name} ({c.runtime} {c.precision}), {speed}, cosine {c.cosine:.4f}")
        if len(set(self.chosen.values())) > 1:
            per = ", ".join(f"batch {b}: {name}" for b, name in self.chosen.items())
            lines.append(f"the fastest differs by batch size ({per}): each one's artifact is written")
        return lines

    def to_json(self) -> str:
        blob = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "models"}
        blob["candidates"] = [asdict(c) for c in self.candidates]
        return json.dumps(blob, indent=2, default=str)

    def rows(self) -> list[dict[str, str]]:
        """One dict of display strings per candidate, in a fixed column order."""
        out = []
        for c in self.candidates:
            row = {
                "candidate": c.name,
                "runtime": c.runtime,
                "precision": c.precision,
                "cosine": "-" if c.cosine is None else f"{c.cosine:.4f}",
                "top-1": "-" if c.top1 is None else f"{c.top1:.3f}",
                "in tolerance": "yes" if c.within_tolerance else "no",
            }
            for b in sorted(self.chosen):
                mark = "*" if b in c.runoff else ""
                p50 = f"{c.p50_ms[b]:.3f}{mark} ({c.speedup[b]:.2f}×)" if b in c.p50_ms else "-"
                row[f"p50 b{b} ms"] = p50
            row["file"] = _size(c.bytes)
            row["chosen"] = ", ".join(f"b{b}" for b in c.chosen_for) or "-"
            row["note"] = c.note
            out.append(row)
        return out

    def markdown(self) -> str:
        rows = self.rows()
        header = list(rows[0])
        return "\n".join(
            [
                "# keiryo deploy",
                "",
                f"CPU: {self.cpu}; {self.threads} threads for every runtime. Tolerance: {self.tolerance}. "
                "Latency: p50 of blocks of calls, candidates interleaved (× = speed-up over float in the "
                "same run; * = the fastest within 15%, timed again head to head with float, twice as long, "
                "and ranked on that).",
                "",
                *[f"- {m}" for m in [*self.messages, *self.written]],
                "",
                "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header),
                *["| " + " | ".join(row[h] for h in header) + " |" for row in rows],
                "",
            ]
        )

    def table(self) -> Table:
        """A rich table; the chosen candidates in bold, those outside tolerance dimmed."""
        rows = self.rows()
        t = Table(caption=f"{self.cpu}; {self.threads} threads; tolerance {self.tolerance}")
        for column in rows[0]:
            t.add_column(column, justify="left" if column in ("candidate", "note") else "right")
        for row, c in zip(rows, self.candidates, strict=True):
            style = "bold" if c.chosen_for else ("dim" if not c.within_tolerance else None)
            t.add_row(*row.values(), style=style)
        return t


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    """A transient progress bar over the candidates (silent when disabled): `step(name)` starts the next."""
    if not enabled:
        yield lambda name: None
        return
    columns = (
        TextColumn("deploy: {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("", total=total)
        started = []

        def step(name: str) -> None:
            if started:
                progress.advance(task)
            started.append(name)
            progress.update(task, description=f"building {name}")

        yield step
