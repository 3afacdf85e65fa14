"""The data a user hands to training, split into what trains and what validates, and a line that says so.

Data passed as one source (tensors, a file, a Dataset) is all training data to the user: keiryo holds out a
stratified validation share for early stopping and nothing for testing, and says how many samples went where.
`{"train": ..., "validation": ...}` passes both parts explicitly; a `DataSplits` is used as it is.
"""

from __future__ import annotations

from torch.utils.data import Subset

from keiryo.data import DataSplits, load_data
from keiryo.errors import ConfigError, DataError

PARTS = ("train", "validation")


def split_for_training(data: object, validation: float, seed: int) -> tuple[DataSplits, str | None]:
    """(splits, the line saying how `data` was split, or None for a DataSplits chosen by the caller).

    `validation` is the fraction held out of a single source (0: train on all of it, no early stopping).
    """
    if isinstance(data, DataSplits):
        return data, None
    if isinstance(data, dict):
        return _explicit(data)
    splits = load_data(data, seed=seed, val_fraction=validation, test_fraction=0.0)
    n_train, n_val = len(splits.train), len(splits.val)
    total = n_train + n_val
    if not n_val:
        return splits, (
            f"data: {total} samples, all for training (no validation: no early stopping, last weights kept)"
        )
    how = ", stratified" if splits.num_classes is not None else ""
    return splits, (
        f"data: {total} samples → {n_train} train / {n_val} validation ({validation:.0%}{how}); "
        "pass TrainConfig(validation=0) to train on all of it, "
        "or data={'train': ..., 'validation': ...} to choose"
    )


def _explicit(data: dict) -> tuple[DataSplits, str]:
    """Train and validation data given apart: each used whole, nothing held out."""
    unknown = set(data) - set(PARTS)
    if unknown or "train" not in data:
        raise ConfigError(
            "data as a dict needs a 'train' entry and optionally 'validation', "
            f"got {', '.join(map(str, data))}"
        )
    train = load_data(data["train"], val_fraction=0.0, test_fraction=0.0)
    val_source = data.get("validation")
    if val_source is None:
        return train, f"data: {len(train.train)} samples, all for training (no validation: no early stopping)"
    val = load_data(val_source, val_fraction=0.0, test_fraction=0.0)
    if val.input_shape != train.input_shape:
        raise DataError(
            f"validation samples have shape {val.input_shape} but training samples {train.input_shape}"
        )
    classes = [c for c in (train.num_classes, val.num_classes) if c is not None]
    splits = DataSplits(
        train=train.train,
        val=val.train,
        test=Subset(train.train, []),
        num_classes=max(classes) if classes else None,
        input_shape=train.input_shape,
        name=train.name,
        classes=train.classes,
    )
    return splits, f"data: {len(splits.train)} train / {len(splits.val)} validation samples, as given"
