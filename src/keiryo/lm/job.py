"""A whole compression job on files: load a language model, compress it by a chain of methods calibrated on a
text, save it (GGUF or a keiryo LM file) under a temporary name renamed at the end. What `keiryo lm compress`
and a language-model recipe's lm-compress steps run."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from keiryo.errors import ConfigError, DataError
from keiryo.fileio import staged
from keiryo.lm.compress import calibration_shape, check_chain, compress
from keiryo.lm.gguf_export import check_exportable, export_gguf
from keiryo.lm.load import decoder_layers
from keiryo.lm.prune import Structured
from keiryo.lm.store import load_lm, save_compressed
from keiryo.lm.text import calibration_text, calibration_windows, tokenize
from keiryo.progress import counting


@dataclass(frozen=True)
class CalibrationText:
    """Where calibration windows come from: `text` (a UTF-8 file, or "shakespeare": the plays not held out),
    `windows` × `length` tokens (None: each method's own default), drawn at random starts with `seed`."""

    text: str
    windows: int | None = None
    length: int | None = None
    seed: int = 0


def compress_file(
    source: str,
    steps: list[tuple[str, Any]],
    out: Path,
    calibration: CalibrationText | None = None,
    float_type: str = "f32",
    progress: bool = True,
) -> int:
    """Load `source` (hf:FOLDER, gguf:FILE or a keiryo LM file), compress it by the chain `steps`
    (`chain_of(method, ...)`) calibrated on `calibration`, and save it to `out` (`.gguf`: GGUF with float
    matrices as `float_type`; else a keiryo LM file) atomically; returns the bytes written. The chain is
    checked against the model's shapes before any work."""
    method = "+".join(name for name, _ in steps)
    shape = (calibration.windows, calibration.length) if calibration else (None, None)
    shapes = {name: calibration_shape(name, *shape) for name, config in steps if config.statistic is not None}
    if shapes and calibration is None:
        raise ConfigError(f"method {method} calibrates on text: give a text file (or shakespeare)")
    model, tokenizer = load_lm(source)
    if out.suffix == ".gguf":
        check_exportable(model)
    check_chain(model, [config for _, config in steps], gguf=out.suffix == ".gguf")
    ids = None
    if shapes:
        most = max(count * size for count, size in shapes.values())
        ids = tokenize(tokenizer, calibration_text(calibration.text), max(most * 8, 400_000))
    for name, config in steps:
        windows = None
        if name in shapes:
            count, size = shapes[name]
            if ids.numel() < size:
                raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {size}")
            windows = calibration_windows(ids, count, size, seed=calibration.seed)
        if isinstance(config, Structured) and config.reconstruct is not None:
            if not progress:
                config = replace(config, reconstruct=replace(config.reconstruct, progress=False))
            compress(model, config, windows)  # its retraining shows a bar per segment of blocks
        else:
            blocks = len(decoder_layers(model))
            with counting(f"{name}: decoder blocks", blocks, progress) as advance:
                compress(model, config, windows, progress=advance)
    with staged(out) as (staged_out,):
        if out.suffix == ".gguf":
            return export_gguf(model, staged_out, source, float_type)
        return save_compressed(model, staged_out, tokenizer)
