"""The data `quantize` reads: calibration inputs for static ranges and quality checks, labels for QAT.

Calibration may be a Tensor of inputs, a dict of keyword inputs, an (inputs, targets) pair, a Dataset or a
DataLoader (whose batches may be tuples or dicts, as Hugging Face datasets yield), `DataSplits`, or a data
name/file; every form becomes one example (`keiryo.inputs`: Tensor | tuple | dict) of the first inputs.
A tuple is (inputs, targets) as a DataLoader yields it, except where it is shaped like the model's example
inputs (as many tensors, each of the example's dtype and per-sample shape): then it is the inputs of a
model that takes several, e.g. (input_ids, attention_mask).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from keiryo import inputs, provenance
from keiryo.data import DataSplits, load_data
from keiryo.errors import ConfigError

MAX_CALIBRATION = 1024  # calibration inputs used (the first ones): ranges settle long before this


def _floats32(example: inputs.Example) -> inputs.Example:
    """Floating tensors as float32 (the float model's dtype); ids and masks keep theirs."""
    return inputs.map_tensors(example, lambda t: t.float() if t.is_floating_point() else t)


def _from_batches(batches, limit: int) -> tuple[inputs.Example, Tensor | None]:
    """The first `limit` samples of a stream of loader batches, as (inputs, targets or None)."""
    parts, targets, seen = [], [], 0
    for batch in batches:
        x, y = inputs.split_batch(batch)
        parts.append(x)
        if y is not None:
            targets.append(torch.as_tensor(y))
        seen += inputs.batch_size(x)
        if seen >= limit:
            break
    if not parts:
        raise ConfigError("calibration data is empty")
    joined = inputs.take(inputs.concat(parts), 0, limit)
    labels = torch.cat(targets)[:limit] if len(targets) == len(parts) else None
    return joined, labels


def shaped_like(data: object, example: inputs.Example | None) -> bool:
    """Whether `data` is a tuple of tensors matching the tuple `example` input for input (count, dtype and
    every dimension after the batch): several inputs, not an (inputs, targets) pair."""
    if not isinstance(example, tuple) or not isinstance(data, (tuple, list)) or len(data) != len(example):
        return False
    return len(example) > 1 and all(
        isinstance(d, Tensor) and isinstance(e, Tensor) and d.dtype == e.dtype and d.shape[1:] == e.shape[1:]
        for d, e in zip(data, example, strict=True)
    )


def calibration_data(
    calibration: object, limit: int = MAX_CALIBRATION, like: inputs.Example | None = None
) -> tuple[inputs.Example, Tensor | None]:
    """The first `limit` calibration inputs as one example, and their targets when the data has them.
    `like`: the model's example inputs, which tell a tuple of several inputs from (inputs, targets)."""
    if shaped_like(calibration, like):
        return _floats32(inputs.take(tuple(calibration), 0, limit)), None
    if isinstance(calibration, (str, Path)):
        calibration = load_data(calibration)
    if isinstance(calibration, DataSplits):
        calibration = calibration.train
    if isinstance(calibration, Tensor):
        return _floats32(calibration[:limit]), None
    if isinstance(calibration, (tuple, list, Mapping)):
        x, y = inputs.split_batch(calibration)
        x = inputs.check_example(x, "calibration")
        return _floats32(inputs.take(x, 0, limit)), (y[:limit] if isinstance(y, Tensor) else None)
    if isinstance(calibration, Dataset):
        calibration = DataLoader(calibration, batch_size=64)
    if isinstance(calibration, DataLoader):
        x, y = _from_batches(calibration, limit)
        return _floats32(x), y
    raise ConfigError(
        "calibration must be inputs (a tensor or a dict of them), (inputs, targets), a Dataset, a DataLoader "
        f"or a data name, got {type(calibration).__name__}"
    )


def class_scores(model: nn.Module, targets: Tensor | None) -> bool:
    """Whether the outputs are class scores: integer targets in the calibration data say so, else the
    model's recorded number of classes."""
    if targets is not None:
        return not targets.is_floating_point()
    return bool(provenance.metadata_of(model).get("num_classes"))


def labelled(calibration: object) -> DataSplits:
    """Training data for QAT, as splits (labels are needed: it trains)."""
    if isinstance(calibration, Tensor):
        raise ConfigError(
            "qat trains the model: pass labelled data (a data name, (inputs, targets) or a Dataset)"
        )
    return load_data(calibration)
