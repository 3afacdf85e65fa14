"""Seeded train/validation/test splits: indices stratified by class, sizes checked to fill every split, and
`ExampleDataset`, the samples of a multi-input example (a tuple or dict of batch-first tensors) with targets.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset

from keiryo import inputs as examples
from keiryo.errors import ConfigError, DataError
from keiryo.inputs import Example


class ExampleDataset(Dataset):
    """Samples of a multi-input example (a tuple or dict of batch-first tensors) with their targets: item i
    is (sample i's inputs, target i), which a DataLoader collates back into (inputs, targets) batches."""

    def __init__(self, inputs: Example, targets: Tensor) -> None:
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Example, Tensor]:
        n = len(self.targets)
        return examples.map_tensors(
            self.inputs, lambda t: t[i] if t.dim() and len(t) == n else t
        ), self.targets[i]

    def subset(self, rows: Tensor) -> ExampleDataset:
        """The samples at `rows`, as one ExampleDataset (no per-item indirection)."""
        return ExampleDataset(examples.index(self.inputs, rows), self.targets[rows])


def split_indices(
    n: int, labels: Tensor | None, seed: int, val_fraction: float, test_fraction: float, where: str = "data"
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded (train, val, test) indices; with class labels each class is spread evenly over the three.

    A split asked for (fraction > 0) that would get no sample is refused: an empty test split would make
    "test accuracy" silently missing, an empty validation split every epoch's check.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1)")
    n_val, n_test = _split_sizes(n, val_fraction, test_fraction)
    if n - n_val - n_test < 1:
        raise ConfigError(f"val_fraction {val_fraction} + test_fraction {test_fraction} leave no train data")
    empty = [
        name
        for name, f, k in (("validation", val_fraction, n_val), ("test", test_fraction, n_test))
        if f and not k
    ]
    if empty:
        need = next(m for m in range(n + 1, n + 10_000) if _splits_filled(m, val_fraction, test_fraction))
        raise DataError(
            f"{where}: {n} sample(s) are too few to split, the {' and '.join(empty)} split would be empty; "
            f"use at least {need} samples"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    if labels is not None and n > 0:
        labels = labels[order]
        by_class = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels)
        starts = torch.cumsum(counts, 0) - counts
        sorted_labels = labels[by_class]
        rank = torch.arange(n) - starts[sorted_labels]
        # A sample's place within its class, jittered so ties between classes fall randomly.
        key = (rank + torch.rand(n, generator=generator, dtype=torch.float64)) / counts[sorted_labels]
        order = order[by_class][torch.argsort(key, stable=True)]
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(validation, test) sample counts of n, rounded to nearest."""
    return math.floor(n * val_fraction + 0.5), math.floor(n * test_fraction + 0.5)


def _splits_filled(n: int, val_fraction: float, test_fraction: float) -> bool:
    """Whether n samples give every split asked for (fraction > 0) at least one sample, train included."""
    n_val, n_test = _split_sizes(n, val_fraction, test_fraction)
    return n - n_val - n_test >= 1 and (n_val or not val_fraction) and (n_test or not test_fraction)


def class_labels(targets: Tensor) -> Tensor | None:
    """The targets as labels to stratify by, or None when they are not non-negative class indices."""
    if targets.ndim != 1 or targets.is_floating_point() or len(targets) == 0 or int(targets.min()) < 0:
        return None
    return targets.long()


def num_classes(targets: Tensor, classes: list[str] | None) -> int | None:
    if targets.is_floating_point() or targets.ndim != 1:
        return None
    return max(int(targets.max()) + 1, len(classes or []))
