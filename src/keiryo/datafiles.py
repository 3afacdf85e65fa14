"""Users' data files read safely: .npz/.pt tensors, CSV with a header, image folders with a folder per class.

Every reader turns a bad input into a one-line `DataError` that names the file: non-finite values, object
arrays and pickled code are refused, and what a file would unpack to is checked against `errors.max_bytes()`
before it is allocated. Inputs come out float32; integer labels as int64 classes, other float targets as
float32 regression. `keiryo.data` splits what these return.
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
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from keiryo.errors import DataError, check_bytes

# (inputs key, targets key) pairs accepted in .npz and .pt files, tried in this order.
KEY_PAIRS = [("x", "y"), ("X", "y"), ("inputs", "targets"), ("data", "labels"), ("features", "labels")]
LABEL_NAMES = ("label", "target", "y", "class")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
MAX_CSV_LINE = 1 << 26  # characters: a longer line is refused before Python reads all of it


def load_tensor_file(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Read (inputs, targets) from a .npz or .pt/.pth file, without ever unpickling code."""
    inputs, targets, _ = read_tensor_file(Path(path))
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
        raise DataError(f"{where} is not a valid .csv file ({gist(e)})") from None
    if not labels:
        raise DataError(f"{where} has a header but no data rows")
    check_bytes(_csv_bytes(values, labels), where)
    try:
        targets, classes = torch.tensor([float(v) for v in labels], dtype=torch.float64), None
    except ValueError:
        targets, classes = _encode_labels(np.array(labels))
    inputs = torch.frombuffer(values, dtype=torch.float64).reshape(len(labels), len(header) - 1)
    inputs, targets, classes = checked_pair(inputs, targets, where, classes)
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
                    f"(a decompression bomb?): {gist(e)}"
                ) from None
            except (OSError, ValueError) as e:
                raise DataError(f"{where}: cannot read image '{name}/{file.name}' ({gist(e)})") from None
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


def read_tensor_file(path: Path) -> tuple[Tensor, Tensor, list[str] | None]:
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
            raise DataError(f"{where} is not a valid {suffix} file ({gist(e)})") from None
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
    return checked_pair(inputs, targets, where)


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
        raise DataError(f"{where} is not a valid .npz file ({gist(e)})") from None
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


def checked_pair(
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


def gist(error: BaseException) -> str:
    """The gist of a library's error message (its first sentence) on one short line; unlike
    `errors.one_line` it drops the type and keeps the detail that torch's unpickler puts last."""
    text = " ".join(str(error).split()).split("WeightsUnpickler error: ")[-1]  # torch's detail comes last
    text = re.split(r"\. | Check the documentation", text)[0].rstrip(".") or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."
