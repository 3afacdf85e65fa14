"""Bytes on disk, safely: atomic writes (temporary name, fsync, rename) and `torch.load` with weights_only.

The lowest layer of keiryo's file handling: model files, checkpoints, reports and exports all write through
`atomic_write_bytes`, and every `.pt` keiryo reads goes through `safe_torch_load`, so no reader ever sees half
a file and no file can run code when loaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import secrets
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from keiryo.errors import ArtifactError, check_bytes, one_line
from keiryo.interrupts import interrupted
from keiryo.optional import import_torchao


def writable_folder(path: str | Path) -> Path:
    """The nearest existing folder at or above `path`, proven writable by creating and removing a file in it
    (so a command refuses an output it could not write before doing any work). Raises `NotADirectoryError`
    when that nearest existing path is a file, `PermissionError`/`OSError` when it cannot be written."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"'{folder}' is a file, so no folder can be made there")
    fd, probe = tempfile.mkstemp(prefix=".keiryo-probe-", dir=folder)
    os.close(fd)
    os.unlink(probe)
    return folder


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged(*targets: Path | None) -> Iterator[list[Path | None]]:
    """A temporary path beside each target; each is renamed onto its target only if the block succeeds.

    Whatever ends the block early (an error, Ctrl-C) removes the temporary files and leaves every target as
    it was; so does a Ctrl-C that a library swallowed during the block.
    """
    temps = [None if t is None else t.with_name(f".{t.name}.{secrets.token_hex(4)}.partial") for t in targets]
    try:
        yield temps
        if interrupted():  # Ctrl-C was pressed and a library swallowed it: write nothing
            raise KeyboardInterrupt
        umask = os.umask(0)
        os.umask(umask)
        for temp, target in zip(temps, targets, strict=True):
            if temp is not None and target is not None and temp.exists():
                try:
                    os.chmod(temp, 0o666 & ~umask)  # temporary files are created 0600; give the usual mode
                    os.replace(temp, target)
                except OSError as exc:
                    raise ArtifactError(f"cannot write '{target}': {exc.strerror}") from None
    finally:
        for temp in temps:
            if temp is not None:
                temp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through `atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def safe_torch_load(path: str | Path, *, what: str = "model file") -> Any:
    """`torch.load` with `weights_only=True`; every failure becomes a one-line ArtifactError.

    The file's size, and for a zip checkpoint the unpacked size of its records, are checked against
    `KEIRYO_MAX_BYTES` first, so a small file cannot unpack to more memory than that.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{what} '{path}' does not exist")
    if path.is_dir():
        raise ArtifactError(f"{what} '{path}' is a directory, not a file")
    check_bytes(path.stat().st_size, f"{what} '{path}'")
    _check_unpacked_size(path, what)
    _allow_quantized_tensors(path)
    try:
        with warnings.catch_warnings():  # torch's note on a foreign pickle protocol: the error says enough
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc).lower()
        if "unsupported global" in text or "global" in text and "allowed" in text:
            raise ArtifactError(
                f"{what} '{path}' holds Python objects, not just tensors; refusing to unpickle it"
            ) from exc
        raise ArtifactError(f"{what} '{path}' is corrupt or not a PyTorch file") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArtifactError(f"{what} '{path}' is corrupt or not a PyTorch file") from exc
    except (MemoryError, RecursionError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise ArtifactError(f"{what} '{path}' is corrupt: {one_line(exc)}") from exc


def _check_unpacked_size(path: Path, what: str) -> None:
    """Refuse a zip checkpoint whose records unpack to more than the limit (a compressed zip bomb)."""
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (legacy format, or corrupt): torch.load will say so
    check_bytes(unpacked, f"{what} '{path}' (unpacked)")


def _allow_quantized_tensors(path: Path) -> None:
    """Import torchao when the file holds its quantized weights: importing it allowlists exactly its tensor
    classes for weights_only loading (no other global is allowed)."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint, corrupt...: torch.load will say so
        return
    if any(name.startswith("torchao.") for name in needed):
        import_torchao()
