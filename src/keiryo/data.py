"""Data for keiryo: the built-in digits set, users' files (npz/pt/csv/image folders), seeded splits, loaders.

Files are read by `keiryo.datafiles` (bounded, non-finite values refused); this module splits them, refuses
splits too small to fill, and makes loaders. `check_model_fits` runs one sample through
a model before any work, so that data and model that do not fit fail with both shapes named.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from keiryo.datafiles import checked_pair, load_csv, load_image_folder, read_tensor_file
from keiryo.errors import ConfigError, DataError, ModelError, one_line

# Errors from a model's forward that mean "these inputs do not have the shape (or kind) this model takes".
_MISFIT = re.compile(r"shape|size|mat1|mat2|dimension|channels|indices|out of range")
_DTYPE = re.compile(r"same dtype|expected scalar type|expected m1 and m2")  # a cast model, not the data


@dataclass
class DataSplits:
    """Train/val/test splits of one data set, with what a model needs to know to fit it."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int | None  # None for regression targets
    input_shape: tuple[int, ...]  # one sample's input shape, e.g. (1, 8, 8) for digits
    name: str  # "digits" or the file's name
    classes: list[str] | None = None  # class names where known


def load_data(
    source: str | os.PathLike | tuple[Tensor, Tensor] | Dataset | DataLoader | DataSplits,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    label_column: str | None = None,
    image_size: tuple[int, int] | None = None,
) -> DataSplits:
    """Seeded train/val/test splits of any source keiryo accepts.

    `source`: "digits"; a .npz/.pt/.pth/.csv file or an image folder; an (inputs, targets) pair; a Dataset or
    DataLoader (split by index); or a DataSplits, returned as is.
    """
    fractions = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    if isinstance(source, DataSplits):
        return source
    if isinstance(source, str) and source == "digits":
        return digits(**fractions)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            hint = " (built-in data sets: digits)" if isinstance(source, str) and not path.suffix else ""
            raise DataError(f"data file '{path}' does not exist{hint}")
        if path.is_dir():
            inputs, targets, classes = load_image_folder(path, image_size)
        elif path.suffix.lower() == ".csv":
            inputs, targets, classes = load_csv(path, label_column)
        else:  # .npz/.pt/.pth, or an error that lists the formats keiryo reads
            inputs, targets, classes = read_tensor_file(path)
        return _splits_of(inputs, targets, path.name, classes, **fractions)
    if isinstance(source, DataLoader):
        source = source.dataset
    if isinstance(source, TensorDataset) and len(source.tensors) == 2:
        source = source.tensors
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise DataError(f"data: expected an (inputs, targets) pair, got {len(source)} items")
        inputs, targets, classes = checked_pair(source[0], source[1], "the data you passed (inputs, targets)")
        return _splits_of(inputs, targets, "tensors", classes, **fractions)
    if isinstance(source, Dataset):
        return _split_dataset(source, **fractions)
    found = type(source).__name__
    raise DataError(f"data: cannot use a {found} (expected 'digits', a path, tensors or a Dataset)")


def digits(seed: int = 0, *, val_fraction: float = 0.15, test_fraction: float = 0.15) -> DataSplits:
    """The 1,797 8x8 handwritten digits that ship with scikit-learn: small, offline, and quick to train."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    inputs = torch.from_numpy(bunch.images / 16.0).float().unsqueeze(1)
    targets = torch.from_numpy(bunch.target).long()
    classes = [str(c) for c in range(10)]
    return _splits_of(
        inputs, targets, "digits", classes, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
    )


def split_tensors(
    inputs: Tensor,
    targets: Tensor,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    where: str = "data",
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Split tensors into train/val/test; the same seed gives the same split, stratified for class labels."""
    if len(inputs) != len(targets):
        raise DataError(f"data: {len(inputs)} inputs but {len(targets)} targets")
    parts = _split_indices(len(inputs), _class_labels(targets), seed, val_fraction, test_fraction, where)
    train, val, test = (TensorDataset(inputs[idx], targets[idx]) for idx in parts)
    return train, val, test


def make_loader(
    dataset: Dataset,
    batch_size: int = 64,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch), so a resumed run sees the same batches."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be 1 or more, got {batch_size}")
    generator = torch.Generator().manual_seed(seed * 1000 + epoch) if shuffle else None
    return DataLoader(dataset, batch_size, shuffle, generator=generator, num_workers=0, drop_last=drop_last)


def example_inputs(splits: DataSplits, batch_size: int = 64) -> Tensor:
    """The first `batch_size` test inputs (rows repeated if fewer): a fixed batch for measurement."""
    dataset = next((d for d in (splits.test, splits.val, splits.train) if len(d) > 0), None)
    if dataset is None:
        raise DataError(f"data '{splits.name}': no samples to take example inputs from")
    if isinstance(dataset, TensorDataset):
        inputs = dataset.tensors[0][:batch_size]
    else:
        inputs = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(min(batch_size, len(dataset)))])
    return inputs[torch.arange(batch_size) % len(inputs)]


def tensors_of(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """Stack a (small) dataset of (input, target) items into an (inputs, targets) pair of tensors."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    items = [dataset[i] for i in range(len(dataset))]
    if not items:
        raise DataError(f"data: the {type(dataset).__name__} is empty")
    inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
    targets = torch.stack([torch.as_tensor(y) for _, y in items])
    return inputs, targets


def describe(splits: DataSplits) -> str:
    """How messages name a data set: by its file or built-in name, else "the data you passed"."""
    return "the data you passed" if splits.name == "tensors" else f"data '{splits.name}'"


def check_model_fits(model: nn.Module, splits: DataSplits) -> None:
    """Before any work: one sample through `model`, then every known label against its outputs.

    Features that do not fit become a ModelError naming both shapes; labels outside the model's classes, or
    float targets for a model with a different number of outputs, a DataError. Costs one forward of one
    sample.
    """
    what = describe(splits)
    parts = [d for d in (splits.train, splits.val, splits.test) if len(d) > 0]
    if not parts:
        raise DataError(f"{what} has no samples")
    x, y = parts[0][0]
    outputs = probe_model(model, torch.as_tensor(x).unsqueeze(0), what)
    if outputs is None:
        return
    for part in parts:
        targets = _targets_of(part)
        check_targets(outputs, torch.as_tensor(y).unsqueeze(0) if targets is None else targets, what)


def probe_model(model: nn.Module, inputs: Tensor, what: str) -> Tensor | None:
    """Run the first row of `inputs` through `model` (eval mode, no grad; each module's mode restored).

    A shape mismatch becomes a one-line ModelError that says what the model expects and what `what` holds;
    any other failure returns None and is left for the real run to report. Returns the outputs.
    """
    sample = inputs[:1]
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), None)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(sample if device is None else sample.to(device))
    except (RuntimeError, ValueError, IndexError) as exc:
        text = str(exc)
        if _DTYPE.search(text) or not _MISFIT.search(text):
            return None
        raise ModelError(
            f"the model expects {_expected_input(model)} but the samples of {what} have shape "
            f"{tuple(sample.shape[1:])}; build the model for this data or pass data that fits it "
            f"({one_line(exc, 120)})"
        ) from None
    finally:
        for module, mode in modes:
            module.training = mode
    return outputs if isinstance(outputs, Tensor) else None


def check_targets(outputs: Tensor, targets: Tensor, what: str) -> None:
    """Refuse class labels outside the model's outputs, and float targets of another width than its outputs
    (the loop's mean squared error needs one output per target value)."""
    if outputs.ndim < 1 or len(outputs) == 0 or len(targets) == 0:
        return
    width = outputs[0].numel()
    if targets.is_floating_point():
        if targets[0].numel() != width:
            first = float(targets.reshape(-1)[0])
            raise DataError(
                f"{what} has float targets (regression, e.g. {first:g}) but the model gives {width} outputs "
                f"per sample; for classification use integer labels 0..{width - 1}"
            )
        return
    if targets.ndim != 1 or outputs.ndim != 2:
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= width:
        hint = "; for regression store the targets as floats" if width == 1 else ""
        raise DataError(
            f"{what} has class labels {low}..{high} but the model has {width} class output(s), so labels "
            f"must be 0..{width - 1}; build the model for {high + 1} classes or fix the labels{hint}"
        )


# ---- helpers ---------------------------------------------------------------------------------------------


def _targets_of(dataset: Dataset) -> Tensor | None:
    """All targets of a data set when they are at hand without reading every item, else None."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[1]
    if isinstance(dataset, Subset):
        parent = _targets_of(dataset.dataset)
        return None if parent is None else parent[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    known = getattr(dataset, "targets", None)
    if known is None or getattr(dataset, "target_transform", None) is not None:
        return None
    try:
        return torch.as_tensor(known)
    except (TypeError, ValueError, RuntimeError):
        return None


def _expected_input(model: nn.Module) -> str:
    """What a model takes, in words: its recorded input shape, else what its first layer needs."""
    shape = dict(getattr(model, "_keiryo_metadata", None) or {}).get("input_shape")
    if shape:
        return f"samples of shape {tuple(shape)}"
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return f"{module.in_features} features per sample (first layer '{name}': Linear)"
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kind = type(module).__name__
            return f"{module.in_channels}-channel inputs (first layer '{name}': {kind})"
        if isinstance(module, nn.Embedding):
            return f"integer token ids below {module.num_embeddings} (first layer '{name}': Embedding)"
    return "inputs of another shape"


def _split_indices(
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


def _splits_of(inputs: Tensor, targets: Tensor, name: str, classes: list[str] | None, **split) -> DataSplits:
    where = "the data you passed" if name == "tensors" else f"data '{name}'"
    train, val, test = split_tensors(inputs, targets, where=where, **split)
    shape = tuple(inputs.shape[1:])
    return DataSplits(train, val, test, _num_classes(targets, classes), shape, name, classes)


def _class_labels(targets: Tensor) -> Tensor | None:
    """The targets as labels to stratify by, or None when they are not non-negative class indices."""
    if targets.ndim != 1 or targets.is_floating_point() or len(targets) == 0 or int(targets.min()) < 0:
        return None
    return targets.long()


def _num_classes(targets: Tensor, classes: list[str] | None) -> int | None:
    if targets.is_floating_point() or targets.ndim != 1:
        return None
    return max(int(targets.max()) + 1, len(classes or []))


def _split_dataset(dataset: Dataset, seed: int, val_fraction: float, test_fraction: float) -> DataSplits:
    """Split a map-style Dataset by index, keeping its items (and any random transforms) as they are."""
    name = type(dataset).__name__
    if not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise DataError(f"data: cannot split a {name} that is empty or has no len()")
    n = len(dataset)
    known = getattr(dataset, "targets", None)  # torchvision-style, saves reading every item
    targets = torch.as_tensor(known if known is not None else [dataset[i][1] for i in range(n)])
    classes = getattr(dataset, "classes", None)
    classes = [str(c) for c in classes] if isinstance(classes, (list, tuple)) else None
    parts = _split_indices(n, _class_labels(targets), seed, val_fraction, test_fraction, f"data ({name})")
    train, val, test = (Subset(dataset, idx.tolist()) for idx in parts)
    input_shape = tuple(torch.as_tensor(dataset[0][0]).shape)
    return DataSplits(train, val, test, _num_classes(targets, classes), input_shape, name, classes)
