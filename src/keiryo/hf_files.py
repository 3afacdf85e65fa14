"""Hugging Face folders read as data: config, tokenizer and weights checked before transformers sees them.

A folder is data, never code: one that asks for its own Python (`auto_map` in config.json or
tokenizer_config.json) is refused before transformers is called, with or without --trust-code. Weights are
read from safetensors (whose header is checked first) or from `.bin` files that hold nothing but tensors
(torch.load with weights_only=True); the model the config describes is sized on the meta device and checked
against `KEIRYO_MAX_BYTES` before anything is allocated. A broken file is one ArtifactError naming it.
Nothing is downloaded: transformers runs offline, with `local_files_only=True` and no remote code.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from keiryo.errors import ArtifactError, ConfigError, ModelError, TrustError, check_bytes, one_line
from keiryo.fileio import safe_torch_load
from keiryo.optional import quiet_torchao

MAX_JSON_BYTES = 64 << 20  # a config or tokenizer config; real ones are kilobytes
MAX_HEADER_BYTES = 100 << 20  # a safetensors header (the format's own limit)
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "spiece.model", "vocab.json")


def model_dir(path: str | os.PathLike) -> Path:
    """The absolute model directory, checked to hold a config.json."""
    directory = Path(path).expanduser().resolve()
    if not str(path).strip():
        raise ModelError("model 'hf:' needs a directory: use hf:PATH (a folder with config.json)")
    if not directory.is_dir():
        raise ModelError(f"Hugging Face model directory '{directory}' does not exist")
    if not (directory / "config.json").is_file():
        raise ModelError(f"'{directory}' has no config.json, so it is not a Hugging Face model directory")
    return directory


def read_json(path: Path, what: str) -> Any:
    """A JSON file of a model folder, or one ArtifactError naming it (too big, unreadable, not JSON)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ArtifactError(f"{what} '{path}' is {size} bytes, too big for a JSON config")
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{what} '{path}' is not valid JSON: {one_line(exc)}") from exc


def check_no_remote_code(directory: Path) -> dict:
    """The folder's config.json, after refusing a folder that asks transformers to run its own Python."""
    config = read_json(directory / "config.json", "Hugging Face config")
    if not isinstance(config, dict):
        raise ArtifactError(f"Hugging Face config '{directory / 'config.json'}' is not a JSON object")
    for name in ("config.json", "tokenizer_config.json"):
        data = config if name == "config.json" else optional_json(directory / name)
        if isinstance(data, dict) and "auto_map" in data:
            raise TrustError(
                f"Hugging Face folder '{directory}' asks to run its own Python code (auto_map in {name}); "
                "keiryo never runs a folder's code, not even with --trust-code: use a model that "
                "transformers ships (e.g. BERT), or load it yourself and pass the torch.nn.Module"
            )
    return config


def optional_json(path: Path) -> Any:
    return read_json(path, "Hugging Face file") if path.is_file() else None


def check_weights(directory: Path) -> None:
    """Refuse weight files that are broken, hold pickled Python objects, or unpack beyond the limit."""
    safetensors = sorted(directory.glob("*.safetensors"))
    check_bytes(sum(_safetensors_bytes(path) for path in safetensors), f"the weights in '{directory}'")
    if safetensors:
        return  # transformers prefers them; .bin files beside them are not read
    for path in sorted(directory.glob("pytorch_model*.bin")):
        check_bytes(path.stat().st_size, f"weights '{path}'")
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint (legacy, or corrupt): torch.load says which
            safe_torch_load(path, what="weights")
            continue
        if unsafe:
            raise ArtifactError(
                f"weights '{path}' hold pickled Python objects ({', '.join(unsafe[:3])}), not just tensors; "
                "refusing to unpickle them: convert the folder to safetensors"
            )


def _safetensors_bytes(path: Path) -> int:
    """The bytes a safetensors file's tensors take, from its header, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"its header claims {length} bytes, the file has {size}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        data = size - 8 - length
        total = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if (
                not all(isinstance(v, int) and v >= 0 for v in [*shape, start, end])
                or not start <= end <= data
            ):
                raise ValueError(f"tensor '{name}' lies outside the file")
            if dtype in DTYPE_BYTES and math.prod(shape) * DTYPE_BYTES[dtype] != end - start:
                raise ValueError(f"tensor '{name}' has {end - start} bytes for shape {shape} of {dtype}")
            total += end - start
        return total
    except (OSError, ValueError, KeyError, TypeError, struct.error, RecursionError) as exc:
        raise ArtifactError(f"weights '{path}' are not a valid safetensors file: {one_line(exc)}") from exc


def transformers_module() -> Any:
    """transformers, imported on first use and set to stay offline and quiet."""
    # never reach for the network (read when the hub is imported, so set before)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_torchao()  # transformers imports torchao where it is installed
    try:
        import transformers
    except ImportError as exc:
        raise ModelError(
            "Hugging Face models need the transformers package: pip install 'keiryo[hf]'"
        ) from exc
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def no_init_weights() -> Any:
    """transformers' context that skips weight initialisation (where it lives differs between versions)."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(where).no_init_weights()
    return contextlib.nullcontext()


def check_model_size(build: Callable[[], Any], where: str) -> None:
    """Size the model `build()` makes on the meta device (nothing allocated) and check the limit; `where`
    names the config it comes from."""
    try:
        with torch.device("meta"), no_init_weights():
            probe = build()
    except Exception as exc:  # transformers reading a foreign config: any failure is the config's
        raise ArtifactError(f"cannot build the model that {where} describes: {one_line(exc)}") from exc
    nbytes = sum(t.numel() * t.element_size() for t in [*probe.parameters(), *probe.buffers()])
    check_bytes(nbytes, f"the model {where} describes")


@functools.lru_cache(maxsize=8)
def tokenizer_for(directory: str) -> Any:
    """The tokenizer saved in a model directory (loaded once per process)."""
    path = Path(directory)
    if not has_tokenizer(path):
        raise ConfigError(f"'{path}' has no tokenizer; pass token ids (a (batch, 2, length) tensor) instead")
    check_no_remote_code(path)
    try:
        return transformers_module().AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # the tokenizer library reading a user's files: any failure is the files'
        raise ArtifactError(f"cannot load the tokenizer in '{path}': {one_line(exc)}") from exc


def has_tokenizer(directory: Path) -> bool:
    """Whether a model folder holds tokenizer files."""
    return any((directory / name).is_file() for name in TOKENIZER_FILES)
