"""Data for keiryo: the built-in digits set, users' files (npz/pt/csv/image folders), seeded splits, loaders.

Files are read by `keiryo.datafiles` (bounded, non-finite values refused); this module splits them, refuses
splits too small to fill, and makes loaders. A sample's inputs follow `keiryo.inputs`: a tensor, a tuple of
tensors or a dict of them — `(inputs, targets)` pairs whose inputs are a dict or tuple of batch-first tensors,
and Datasets/DataLoaders whose items are dicts with a `labels` key (as Hugging Face datasets yield) or
`(x1, x2, ..., target)` tuples, are split and loaded like plain tensors (the seeded, stratified split itself
is `keiryo.splits`). `check_model_fits` runs one sample through a model before any work, so that data and
model that do not fit fail with both shapes named.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from keiryo import inputs as examples
from keiryo.datafiles import checked_pair, load_csv, load_image_folder, read_tensor_file
from keiryo.errors import ConfigError, DataError, ModelError, one_line
from keiryo.inputs import Example
from keiryo.splits import ExampleDataset, class_labels, num_classes, split_indices

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

    `source`: "digits"; a .npz/.pt/.pth/.csv file or an image folder; an (inputs, targets) pair, whose inputs
    may be a tuple or dict of tensors; a Dataset, DataLoader or list of samples (split by index; samples are
    (x, y) pairs, (x1, ..., y) tuples or dicts with a `labels` key); or a DataSplits, returned as is.
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
    if isinstance(source, list) and source and isinstance(source[0], Mapping):
        return _split_dataset(source, **fractions)  # a list of samples as dicts
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise DataError(f"data: expected an (inputs, targets) pair, got {len(source)} items")
        if isinstance(source[0], (tuple, list, Mapping)):
            return _example_splits(source[0], source[1], **fractions)
        inputs, targets, classes = checked_pair(source[0], source[1], "the data you passed (inputs, targets)")
        return _splits_of(inputs, targets, "tensors", classes, **fractions)
    map_style = hasattr(source, "__getitem__") and hasattr(source, "__len__")  # e.g. a Hugging Face dataset
    if isinstance(source, Dataset) or (map_style and not isinstance(source, (Mapping, Tensor))):
        return _split_dataset(source, **fractions)
    found = type(source).__name__
    raise DataError(
        f"data: cannot use a {found} (expected 'digits', a path, an (inputs, targets) pair or a Dataset)"
    )


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
    parts = split_indices(len(inputs), class_labels(targets), seed, val_fraction, test_fraction, where)
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
    """A DataLoader whose order depends only on (seed, epoch), so a resumed run sees the same batches; dict
    samples whose values are python lists (token ids) are collated as tensors (`collate`)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be 1 or more, got {batch_size}")
    generator = torch.Generator().manual_seed(seed * 1000 + epoch) if shuffle else None
    return DataLoader(
        dataset,
        batch_size,
        shuffle,
        generator=generator,
        num_workers=0,
        drop_last=drop_last,
        collate_fn=collate,
    )


def example_inputs(splits: DataSplits, batch_size: int = 64) -> Example:
    """The first `batch_size` test inputs (samples repeated if fewer): a fixed batch for measurement, in the
    samples' own form (a tensor, or a tuple/dict of tensors)."""
    dataset = next((d for d in (splits.test, splits.val, splits.train) if len(d) > 0), None)
    if dataset is None:
        raise DataError(f"data '{splits.name}': no samples to take example inputs from")
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        first = dataset.tensors[0][:batch_size]
    elif isinstance(dataset, ExampleDataset):
        first = examples.take(dataset.inputs, 0, batch_size)
    else:
        first = collate([sample_inputs(dataset[i]) for i in range(min(batch_size, len(dataset)))])
    return examples.resize_batch(first, batch_size)


def tensors_of(dataset: Dataset) -> tuple[Example, Tensor]:
    """A (small) dataset as (inputs, targets): inputs a tensor, or a tuple/dict of tensors for multi-input
    samples; targets one tensor."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, ExampleDataset):
        return dataset.inputs, dataset.targets
    items = [examples.split_batch(dataset[i]) for i in range(len(dataset))]
    if not items:
        raise DataError(f"data: the {type(dataset).__name__} is empty")
    if any(y is None for _, y in items):
        raise DataError(f"data: the samples of the {type(dataset).__name__} have no targets")
    inputs = collate([x for x, _ in items])
    targets = torch.stack([torch.as_tensor(y) for _, y in items])
    return inputs, targets


def collate(items: list) -> Any:
    """torch's default collation, after turning the list values of dict samples into tensors (token ids as
    Hugging Face datasets yield them without `set_format("torch")`)."""
    return default_collate([_tensor_values(item) for item in items])


def _tensor_values(item: Any) -> Any:
    if isinstance(item, Mapping):
        return {k: torch.as_tensor(v) if isinstance(v, list) else v for k, v in item.items()}
    return item


def sample_inputs(item: Any) -> Example:
    """The inputs of one dataset item: an (x, y) pair's x, (x1, ..., y)'s (x1, ...), a dict without labels."""
    return examples.split_batch(item)[0]


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
    x, y = examples.split_batch(parts[0][0])
    outputs = probe_model(model, collate([x]), what)
    if outputs is None:
        return
    for part in parts:
        targets = _targets_of(part)
        if targets is None and y is None:
            continue
        check_targets(outputs, torch.as_tensor(y).unsqueeze(0) if targets is None else targets, what)


def probe_model(model: nn.Module, inputs: Example, what: str) -> Tensor | None:
    """Run the first sample of `inputs` (a tensor, tuple or dict) through `model` (eval mode, no grad; each
    module's mode restored).

    A shape mismatch becomes a one-line ModelError that says what the model expects and what `what` holds;
    any other failure returns None and is left for the real run to report. Returns the main output
    (`inputs.main_output`), or None when the output holds no tensor.
    """
    sample = examples.take(inputs, 0, 1)
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), None)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            outputs = examples.call(model, sample if device is None else examples.to_device(sample, device))
    except (RuntimeError, ValueError, IndexError) as exc:
        text = str(exc)
        if _DTYPE.search(text) or not _MISFIT.search(text):
            return None
        shape = (
            f"have shape {tuple(sample.shape[1:])}"
            if isinstance(sample, Tensor)
            else f"are {examples.describe(sample)}"
        )
        raise ModelError(
            f"the model expects {_expected_input(model)} but the samples of {what} {shape}; build the "
            f"model for this data or pass data that fits it ({one_line(exc, 120)})"
        ) from None
    finally:
        for module, mode in modes:
            module.training = mode
    try:
        return examples.main_output(outputs)
    except ModelError:
        return None


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
    if isinstance(dataset, ExampleDataset):
        return dataset.targets
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


def _splits_of(inputs: Tensor, targets: Tensor, name: str, classes: list[str] | None, **split) -> DataSplits:
    where = "the data you passed" if name == "tensors" else f"data '{name}'"
    train, val, test = split_tensors(inputs, targets, where=where, **split)
    shape = tuple(inputs.shape[1:])
    return DataSplits(train, val, test, num_classes(targets, classes), shape, name, classes)


def _split_dataset(dataset: Any, seed: int, val_fraction: float, test_fraction: float) -> DataSplits:
    """Split a map-style Dataset (or list of samples) by index, keeping its items (and any random transforms)
    as they are. Items are (x, y) pairs, (x1, ..., y) tuples or dicts with a `labels` key."""
    name = type(dataset).__name__
    if not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise DataError(f"data: cannot split a {name} that is empty or has no len()")
    n = len(dataset)
    known = getattr(dataset, "targets", None)  # torchvision-style, saves reading every item
    if known is None:
        known = [examples.split_batch(dataset[i])[1] for i in range(n)]
        if any(y is None for y in known):
            raise DataError(
                f"data ({name}): its samples carry no targets; give (inputs, target) pairs or dicts with a "
                "'labels' key"
            )
    targets = torch.as_tensor(known) if not isinstance(known[0], Tensor) else torch.stack(list(known))
    classes = getattr(dataset, "classes", None)
    classes = [str(c) for c in classes] if isinstance(classes, (list, tuple)) else None
    parts = split_indices(n, class_labels(targets), seed, val_fraction, test_fraction, f"data ({name})")
    train, val, test = (Subset(dataset, idx.tolist()) for idx in parts)
    shape = _shape_of(_tensor_values(dataset[0]))
    return DataSplits(train, val, test, num_classes(targets, classes), shape, name, classes)


def _example_splits(inputs: Example, targets: Any, **split: Any) -> DataSplits:
    """Splits of an (inputs, targets) pair whose inputs are a tuple or dict of batch-first tensors."""
    where = "the data you passed (inputs, targets)"
    try:
        inputs = examples.check_example(inputs, "the inputs you passed")
        n = examples.batch_size(inputs)
    except ConfigError as exc:
        raise DataError(f"{where}: {exc}") from None
    if any(t.dim() == 0 or len(t) != n for t in examples.tensors(inputs)):
        raise DataError(
            f"{where}: the input tensors differ in their number of samples ({examples.describe(inputs)})"
        )
    _, targets, classes = checked_pair(torch.zeros(n, 1), targets, where)
    parts = split_indices(n, class_labels(targets), where=where, **split)
    whole = ExampleDataset(inputs, targets)
    train, val, test = (whole.subset(idx) for idx in parts)
    return DataSplits(
        train, val, test, num_classes(targets, classes), _shape_of(whole[0]), "tensors", classes
    )


def _shape_of(item: Any) -> tuple[int, ...]:
    """One sample's input shape: its tensor's, or its first input tensor's for a multi-input sample."""
    found = examples.tensors(examples.split_batch(item)[0])
    return tuple(found[0].shape) if found else ()
