"""Outputs of the commands: checked before any work, written under temporary names, renamed at the end.

Nothing is lost on a failed run: every command checks its output paths (a folder, a path under a file, a
folder it cannot write in, an output that is also an input) before any work, writes its outputs to temporary
names beside them, and renames them into place only when the whole command has succeeded; a failing or
interrupted run leaves an existing output byte for byte as it was.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from torch import nn

from keiryo import artifacts, data, fileio, report
from keiryo.errors import ArtifactError, ConfigError, one_line
from keiryo.fileio import staged  # noqa: F401  (the commands write through it)

# Piped output (CI logs, files) gets a wide fixed width so that tables are not squeezed into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 180)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 400)


def same_path(a: Path | None, b: Path | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _probe_folder(folder: Path, target: Path, option: str) -> None:
    """The nearest existing folder at or above `folder` must be a folder this process can create files in."""
    try:
        fileio.writable_folder(folder)
    except NotADirectoryError as exc:
        raise ConfigError(f"{option} '{target}': {exc}") from None
    except OSError as exc:
        where = Path(exc.filename).parent if exc.filename else folder
        raise ConfigError(f"{option} '{target}': cannot write in folder '{where}' ({exc.strerror})") from None


def check_output(path: Path, option: str = "--out", inputs: Sequence[Path | str | None] = ()) -> Path:
    """Refuse, before any work, an output file that cannot be written or that is also one of the inputs."""
    if path.is_dir():
        raise ConfigError(f"{option} '{path}' is a folder; give the path of a file to write")
    for source in inputs:
        if source is not None and Path(source).exists() and same_path(path, Path(source)):
            raise ConfigError(
                f"{option} '{path}' is also an input; write to another path so the input is kept"
            )
    _probe_folder(path.parent, path, option)
    return path


def check_folder(path: Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that is a file or that cannot be written in."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} '{path}' is a file; give a folder to write the outputs in")
    _probe_folder(path, path, option)
    return path


def save(model: nn.Module, path: Path, target: Path, metadata: dict) -> None:
    """`artifacts.save` to a staged path; a full disk or a vanished folder becomes a one-line error."""
    try:
        artifacts.save(model, path, metadata=metadata)
    except OSError as exc:
        raise ArtifactError(f"cannot write '{target}': {exc.strerror or one_line(exc)}") from None


def write_text(text: str, path: Path, target: Path) -> None:
    """Text to a staged path, atomically; a failure is a one-line error naming the target."""
    try:
        fileio.atomic_write_bytes(text.encode(), path)
    except OSError as exc:
        raise ArtifactError(f"cannot write '{target}': {exc.strerror or one_line(exc)}") from None


def size(path: Path) -> str:
    return report.human_bytes(path.stat().st_size)


def data_path(source: str | None) -> Path | None:
    """The data source as a path, when it names an existing file or folder (not a built-in name)."""
    return Path(source) if source and Path(source).exists() else None


def check_fits(model: nn.Module, splits: data.DataSplits | None) -> None:
    """One sample of the data through the model, before any work: a mismatch is a one-line error."""
    if splits is not None:
        data.check_model_fits(model, splits)
