"""Data for keiryo: the built-in digits set, users' files (npz/pt/csv/image folders), seeded splits, loaders.

Every reader turns a bad input into a one-line `DataError` that names the file, so the CLI can print it as is.
Inputs always come out float32; integer labels as int64 classes, other float targets as float32 regression.
"""

from __future__ import annotations

import csv
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from keiryo.errors import ConfigError, DataError

# (inputs key, targets key) pairs accepted in .npz and .pt files, tried in this order.
KEY_PAIRS = [("x", "y"), ("X", "y"), ("inputs", "targets"), ("data", "labels"), ("features", "labels")]
LABEL_NAMES = ("label", "target", "y", "class")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


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
            inputs, targets, classes = _read_tensor_file(path)
        return _splits_of(inputs, targets, path.name, classes, **fractions)
    if isinstance(source, DataLoader):
        source = source.dataset
    if isinstance(source, TensorDataset) and len(source.tensors) == 2:
        source = source.tensors
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise DataError(f"data: expected an (inputs, targets) pair, got {len(source)} items")
        inputs, targets, classes = _checked(source[0], source[1], "data (inputs, targets)")
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
    inputs: Tensor, targets: Tensor, *, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Split tensors into train/val/test; the same seed gives the same split, stratified for class labels."""
    if len(inputs) != len(targets):
        raise DataError(f"data: {len(inputs)} inputs but {len(targets)} targets")
    parts = _split_indices(len(inputs), _class_labels(targets), seed, val_fraction, test_fraction)
    train, val, test = (TensorDataset(inputs[idx], targets[idx]) for idx in parts)
    return train, val, test


def load_tensor_file(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Read (inputs, targets) from a .npz or .pt/.pth file, without ever unpickling code."""
    inputs, targets, _ = _read_tensor_file(Path(path))
    return inputs, targets


def load_csv(
    path: str | os.PathLike, label_column: str | None = None
) -> tuple[Tensor, Tensor, list[str] | None]:
    """Read a CSV with a header row: numeric feature columns and one label column (numbers or names)."""
    path = Path(path)
    where = f"data file '{path}'"
    _must_exist(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            if not any(header):
                raise DataError(f"{where} is empty (a header row is required)")
            label = _label_index(header, label_column, where)
            rows, labels = [], []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                at = f"{where} line {reader.line_num}"
                if len(row) != len(header):
                    raise DataError(f"{at}: expected {len(header)} values, found {len(row)}")
                if not row[label].strip():
                    raise DataError(f"{at}: column '{header[label]}' (the label) is empty")
                rows.append([_number(cell, header[i], at) for i, cell in enumerate(row) if i != label])
                labels.append(row[label].strip())
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{where} is not a valid .csv file ({_one_line(e)})") from None
    if not rows:
        raise DataError(f"{where} has a header but no data rows")
    try:
        targets, classes = torch.tensor([float(v) for v in labels], dtype=torch.float64), None
    except ValueError:
        targets, classes = _encode_labels(np.array(labels))
    inputs, targets, classes = _checked(torch.tensor(rows, dtype=torch.float64), targets, where, classes)
    return inputs, targets, classes


def load_image_folder(
    path: str | os.PathLike, image_size: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """Read a folder with one sub-folder of images per class into (N, C, H, W) floats in [0, 1].

    `image_size` is (height, width); without it all images must have the first one's size.
    """
    from PIL import Image

    path = Path(path)
    where = f"image folder '{path}'"
    if not path.is_dir():
        raise DataError(f"{where} does not exist" if not path.exists() else f"{where} is not a directory")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{where}: no class sub-folders (expected one sub-folder of images per class)")
    images, labels, names = [], [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (path / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{where}: class folder '{name}' has no .png/.jpg/.jpeg/.bmp/.gif images")
        for file in files:
            try:
                with Image.open(file) as image:
                    image.load()
                    gray = image.mode in GRAY_MODES
                    image = image.convert("L" if gray else "RGB")
                    if image_size is not None:
                        image = image.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"{where}: cannot read image '{name}/{file.name}' ({_one_line(e)})") from None
            images.append(image)
            labels.append(index)
            names.append(f"{name}/{file.name}")
    all_gray = all(image.mode == "L" for image in images)
    arrays = []
    for image, name in zip(images, names, strict=True):
        if image.size != images[0].size:
            size, first = "x".join(map(str, image.size[::-1])), "x".join(map(str, images[0].size[::-1]))
            raise DataError(f"{where}: '{name}' is {size} (HxW), '{names[0]}' {first}; pass image_size")
        arrays.append(np.asarray(image if all_gray else image.convert("RGB"), dtype=np.uint8))
    stacked = torch.from_numpy(np.stack(arrays)).float().div_(255.0)
    inputs = stacked.unsqueeze(1) if all_gray else stacked.permute(0, 3, 1, 2).contiguous()
    return inputs, torch.tensor(labels, dtype=torch.int64), classes


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


# ---- helpers ---------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    """The gist of a library's error message (its first sentence) on one short line."""
    text = " ".join(str(error).split()).split("WeightsUnpickler error: ")[-1]  # torch's detail comes last
    text = re.split(r"\. | Check the documentation", text)[0].rstrip(".") or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _number(cell: str, column: str, at: str) -> float:
    try:
        return float(cell)
    except ValueError:
        raise DataError(f"{at}: column '{column}' is not a number ({cell.strip()!r})") from None


def _must_exist(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"data file '{path}' " + ("is a directory" if path.is_dir() else "does not exist"))


def _label_index(header: list[str], label_column: str | None, where: str) -> int:
    if len(header) < 2:
        raise DataError(f"{where}: needs at least one feature column and a label column, found {len(header)}")
    if label_column is not None:
        if label_column not in header:
            raise DataError(f"{where}: no column '{label_column}' (columns: {', '.join(header)})")
        return header.index(label_column)
    lowered = [name.lower() for name in header]
    return next((lowered.index(n) for n in LABEL_NAMES if n in lowered), len(header) - 1)


def _encode_labels(values: np.ndarray) -> tuple[Tensor, list[str]]:
    """String labels -> indices into their sorted unique names."""
    classes, indices = np.unique(values.astype(str), return_inverse=True)
    return torch.from_numpy(indices.reshape(-1)).long(), [str(c) for c in classes]


def _read_tensor_file(path: Path) -> tuple[Tensor, Tensor, list[str] | None]:
    where = f"data file '{path}'"
    _must_exist(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(f"{where} is not a valid .npz file (it holds a single .npy array)")
            with loaded:
                content = {key: loaded[key] for key in loaded.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{where} is not a valid .npz file ({_one_line(e)})") from None
    elif suffix in (".pt", ".pth"):
        try:
            content = torch.load(path, weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError) as e:
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # a pickled object, maybe code
            if refused:
                raise DataError(f"{where} holds a pickled '{refused[1]}' (refused: tensors only)") from None
            raise DataError(f"{where} is not a valid {suffix} file ({_one_line(e)})") from None
    else:
        raise DataError(f"{where}: unknown format (expected .npz, .pt, .pth, .csv or an image folder)")
    if isinstance(content, (tuple, list)) and len(content) == 2:
        inputs, targets = content
    elif isinstance(content, dict):
        inputs, targets = _pick_pair(content, where)
    else:
        found = type(content).__name__
        raise DataError(f"{where}: expected a dict or an (inputs, targets) pair, found a {found}")
    return _checked(inputs, targets, where)


def _pick_pair(content: dict, where: str) -> tuple[object, object]:
    for x_key, y_key in KEY_PAIRS:
        if x_key in content and y_key in content:
            return content[x_key], content[y_key]
    found = ", ".join(str(k) for k in content) or "nothing"
    expected = ", ".join(f"{x}/{y}" for x, y in KEY_PAIRS)
    missing = "targets" if any(x in content for x, _ in KEY_PAIRS) else "inputs"
    raise DataError(f"{where}: no {missing} array (expected keys {expected}; found: {found})")


def _checked(
    inputs: object, targets: object, where: str, classes: list[str] | None = None
) -> tuple[Tensor, Tensor, list[str] | None]:
    """Validate and normalise a pair: float32 inputs, int64 class labels or float32 regression targets."""
    if isinstance(targets, np.ndarray) and targets.dtype.kind in "USO":
        targets, classes = _encode_labels(targets)
    x, y = _as_tensor(inputs, "inputs", where), _as_tensor(targets, "targets", where)
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(f"{where}: inputs and targets need one row per sample, found a single number")
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} inputs but {len(y)} targets")
    if len(x) == 0:
        raise DataError(f"{where}: no samples")
    x = x.float().reshape(len(x), 1) if x.ndim == 1 else x.float()
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    integral = not y.is_floating_point() or bool((torch.isfinite(y) & (y == y.round())).all())
    if y.ndim != 1 or not integral:
        return x, y.float(), None
    y = y.long()
    if int(y.min()) < 0:
        raise DataError(f"{where}: class labels must be 0 or more, found {int(y.min())}")
    return x, y, classes


def _as_tensor(value: object, what: str, where: str) -> Tensor:
    if isinstance(value, Tensor):
        tensor = value.detach().cpu()
    else:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise DataError(f"{where}: {what} are not numbers (dtype {array.dtype})")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.is_complex():
        raise DataError(f"{where}: {what} are complex numbers")
    return tensor


def _split_indices(
    n: int, labels: Tensor | None, seed: int, val_fraction: float, test_fraction: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded (train, val, test) indices; with class labels each class is spread evenly over the three."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1)")
    n_val, n_test = math.floor(n * val_fraction + 0.5), math.floor(n * test_fraction + 0.5)
    if n - n_val - n_test < 1:
        raise ConfigError(f"val_fraction {val_fraction} + test_fraction {test_fraction} leave no train data")
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


def _splits_of(inputs: Tensor, targets: Tensor, name: str, classes: list[str] | None, **split) -> DataSplits:
    train, val, test = split_tensors(inputs, targets, **split)
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
    parts = _split_indices(n, _class_labels(targets), seed, val_fraction, test_fraction)
    train, val, test = (Subset(dataset, idx.tolist()) for idx in parts)
    input_shape = tuple(torch.as_tensor(dataset[0][0]).shape)
    return DataSplits(train, val, test, _num_classes(targets, classes), input_shape, name, classes)
