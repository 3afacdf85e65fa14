"""Data for keiryo: the built-in digits set, users' files (npz/pt/csv/image folders), seeded splits, loaders.

Every reader turns a bad input into a one-line `DataError` that names the file, so the CLI can print it as
is: non-finite values, empty splits, object arrays and pickled code are refused, and what a file would unpack
to is checked against `errors.max_bytes()` before it is allocated. Inputs always come out float32; integer
labels as int64 classes, other float targets as float32 regression. `check_model_fits` runs one sample through
a model before any work, so that data and model that do not fit fail with both shapes named.
"""

from __future__ import annotations

import csv
import math
import os
import pickle
import re
import warnings
import zipfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from keiryo.errors import ConfigError, DataError, ModelError, check_bytes, one_line

# (inputs key, targets key) pairs accepted in .npz and .pt files, tried in this order.
KEY_PAIRS = [("x", "y"), ("X", "y"), ("inputs", "targets"), ("data", "labels"), ("features", "labels")]
LABEL_NAMES = ("label", "target", "y", "class")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
MAX_CSV_LINE = 1 << 26  # characters: a longer line is refused before Python reads all of it
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
            inputs, targets, classes = _read_tensor_file(path)
        return _splits_of(inputs, targets, path.name, classes, **fractions)
    if isinstance(source, DataLoader):
        source = source.dataset
    if isinstance(source, TensorDataset) and len(source.tensors) == 2:
        source = source.tensors
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise DataError(f"data: expected an (inputs, targets) pair, got {len(source)} items")
        inputs, targets, classes = _checked(source[0], source[1], "the data you passed (inputs, targets)")
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


def load_tensor_file(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Read (inputs, targets) from a .npz or .pt/.pth file, without ever unpickling code."""
    inputs, targets, _ = _read_tensor_file(Path(path))
    return inputs, targets


def load_csv(
    path: str | os.PathLike, label_column: str | None = None
) -> tuple[Tensor, Tensor, list[str] | None]:
    """Read a CSV with a header row: numeric feature columns and one label column (numbers or names).

    Values go into a flat array of doubles (8 bytes each, not a Python float's 32), and the memory that the
    rows read so far will need is checked against the limit as the file is read, so a huge file stops early.
    """
    path = Path(path)
    where = f"data file '{path}'"
    _must_exist(path)
    values, labels = array("d"), []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(_bounded_lines(f, where))
            header = [name.strip() for name in next(reader, [])]
            if not any(header):
                raise DataError(f"{where} is empty (a header row is required)")
            label = _label_index(header, label_column, where)
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                at = f"{where} line {reader.line_num}"
                if len(row) != len(header):
                    raise DataError(f"{at}: expected {len(header)} values, found {len(row)}")
                cell = row[label].strip()
                if not cell:
                    raise DataError(f"{at}: column '{header[label]}' (the label) is empty")
                if _is_non_finite(cell):
                    raise DataError(f"{at}: column '{header[label]}' (the label) is {cell!r}; fix that row")
                values.extend(_number(value, header[i], at) for i, value in enumerate(row) if i != label)
                labels.append(cell)
                if len(labels) % 4096 == 0:
                    check_bytes(_csv_bytes(values, labels), where)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{where} is not a valid .csv file ({_gist(e)})") from None
    if not labels:
        raise DataError(f"{where} has a header but no data rows")
    check_bytes(_csv_bytes(values, labels), where)
    try:
        targets, classes = torch.tensor([float(v) for v in labels], dtype=torch.float64), None
    except ValueError:
        targets, classes = _encode_labels(np.array(labels))
    inputs = torch.frombuffer(values, dtype=torch.float64).reshape(len(labels), len(header) - 1)
    inputs, targets, classes = _checked(inputs, targets, where, classes)
    return inputs, targets, classes


def load_image_folder(
    path: str | os.PathLike, image_size: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """Read a folder with one sub-folder of images per class into (N, C, H, W) floats in [0, 1].

    `image_size` is (height, width); without it all images must have the first one's size. Each image's size
    is read from its header and the memory all of them will need is checked before it is decoded.
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
    need = 0  # bytes the images kept so far will take: as decoded, as an array, as floats twice (NCHW copy)
    for index, name in enumerate(classes):
        files = sorted(p for p in (path / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{where}: class folder '{name}' has no .png/.jpg/.jpeg/.bmp/.gif images")
        for file in files:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(file) as image:  # reads the header only: size and mode, no pixels yet
                        width, height = image.size
                        check_bytes(width * height * len(image.getbands()), f"image '{name}/{file.name}'")
                        kept = image_size[0] * image_size[1] if image_size else width * height
                        need += kept * 3 * (1 + 1 + 4 + 4)
                        check_bytes(need, where)
                        image.load()
                        gray = image.mode in GRAY_MODES
                        image = image.convert("L" if gray else "RGB")
                        if image_size is not None:
                            image = image.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
                raise DataError(
                    f"{where}: image '{name}/{file.name}' has more pixels than PIL decodes safely "
                    f"(a decompression bomb?): {_gist(e)}"
                ) from None
            except (OSError, ValueError) as e:
                raise DataError(f"{where}: cannot read image '{name}/{file.name}' ({_gist(e)})") from None
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


def _gist(error: BaseException) -> str:
    """The gist of a library's error message (its first sentence) on one short line; unlike
    `errors.one_line` it drops the type and keeps the detail that torch's unpickler puts last."""
    text = " ".join(str(error).split()).split("WeightsUnpickler error: ")[-1]  # torch's detail comes last
    text = re.split(r"\. | Check the documentation", text)[0].rstrip(".") or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _number(cell: str, column: str, at: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise DataError(f"{at}: column '{column}' is not a number ({cell.strip()!r})") from None
    if not math.isfinite(value):
        raise DataError(f"{at}: column '{column}' is {cell.strip()!r}, not a finite number; fix that row")
    return value


def _is_non_finite(cell: str) -> bool:
    try:
        return not math.isfinite(float(cell))
    except ValueError:
        return False  # a class name


def _csv_bytes(values: array, labels: list[str]) -> int:
    """Memory a CSV's rows need: the doubles read, their float32 copy, and each label as a Python string."""
    return len(values) * (8 + 4) + len(labels) * 64


def _bounded_lines(f, where: str):
    """The file's lines, refusing one longer than MAX_CSV_LINE before it is read whole."""
    while line := f.readline(MAX_CSV_LINE):
        if len(line) == MAX_CSV_LINE and not line.endswith("\n"):
            raise DataError(f"{where} has a line longer than {MAX_CSV_LINE:,} characters; is it a CSV file?")
        yield line


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
        return _read_npz(path, where)
    if suffix in (".pt", ".pth"):
        check_bytes(_pt_bytes(path), where)
        try:
            content = torch.load(path, weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError) as e:
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # a pickled object, maybe code
            if refused:
                raise DataError(f"{where} holds a pickled '{refused[1]}' (refused: tensors only)") from None
            raise DataError(f"{where} is not a valid {suffix} file ({_gist(e)})") from None
    else:
        raise DataError(f"{where}: unknown format (expected .npz, .pt, .pth, .csv or an image folder)")
    return _pair_of(content, where)


def _pair_of(content: object, where: str) -> tuple[Tensor, Tensor, list[str] | None]:
    if isinstance(content, (tuple, list)) and len(content) == 2:
        inputs, targets = content
    elif isinstance(content, dict):
        x_key, y_key = _pick_pair(content, where)
        inputs, targets = content[x_key], content[y_key]
    else:
        found = type(content).__name__
        raise DataError(f"{where}: expected a dict or an (inputs, targets) pair, found a {found}")
    return _checked(inputs, targets, where)


def _read_npz(path: Path, where: str) -> tuple[Tensor, Tensor, list[str] | None]:
    """Read the (inputs, targets) pair of an .npz, after checking every array's declared size and type."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            single = f.read(6) == b"\x93NUMPY"
        detail = "it holds a single .npy array" if single else "not a zip archive"
        raise DataError(f"{where} is not a valid .npz file ({detail})")
    try:
        check_bytes(_npz_bytes(path, where), where)
        with np.load(path, allow_pickle=False) as loaded:
            x_key, y_key = _pick_pair(loaded, where)
            content = {x_key: loaded[x_key], y_key: loaded[y_key]}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{where} is not a valid .npz file ({_gist(e)})") from None
    return _pair_of(content, where)


def _npz_bytes(path: Path, where: str) -> int:
    """Memory an .npz's arrays need (as stored, plus a float32 copy), from each .npy header in the archive;
    nothing is decompressed but the headers. Object arrays (pickles) are refused here."""
    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                if member.read(6) != b"\x93NUMPY":
                    total += info.file_size  # np.load would read a member that is no array as bytes
                    continue
                member.seek(0)
                version = np.lib.format.read_magic(member)
                if version not in ((1, 0), (2, 0)):
                    raise DataError(
                        f"{where}: array '{info.filename}' is in .npy format {version}, unsupported"
                    )
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read(member)
            if dtype.hasobject:
                raise DataError(
                    f"{where}: array '{info.filename}' holds Python objects (refused: numbers only)"
                )
            total += math.prod(shape) * (dtype.itemsize + 4)
    return total


def _pt_bytes(path: Path) -> int:
    """Memory a .pt file's tensors need: the declared sizes of its zip records, else its size on disk."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return sum(info.file_size for info in archive.infolist())
    return path.stat().st_size


def _pick_pair(content, where: str) -> tuple[str, str]:
    """The (inputs, targets) keys of a dict or an .npz."""
    for x_key, y_key in KEY_PAIRS:
        if x_key in content and y_key in content:
            return x_key, y_key
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
    if x.dtype != torch.float32:
        check_bytes(x.numel() * 4, f"{where} (inputs as float32)")
    x = x.float().reshape(len(x), 1) if x.ndim == 1 else x.float()
    _require_finite(x, "inputs", where)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.is_floating_point():
        _require_finite(y, "targets", where)
    integral = not y.is_floating_point() or bool((torch.isfinite(y) & (y == y.round())).all())
    if y.ndim != 1 or not integral:
        return x, y.float(), None
    y = y.long()
    if int(y.min()) < 0:
        raise DataError(f"{where}: class labels must be 0 or more, found {int(y.min())}")
    return x, y, classes


def _require_finite(values: Tensor, what: str, where: str) -> None:
    """Refuse NaN and inf: a few of them silently turn a whole training run into noise."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0]]
        place = f"sample {first[0]}" + (f", feature {tuple(first[1:])}" if len(first) > 1 else "")
        raise DataError(
            f"{where}: {what} hold {int(bad.sum())} NaN/inf value(s), the first "
            f"({float(values[tuple(first)])}) at {place}; remove or fill them before training"
        )


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
