"""Causal language models from a Hugging Face folder or a GGUF file, offline, with their tokenizer.

`load_causal_lm("hf:PATH" | "gguf:FILE" | a path)` returns a transformers `*ForCausalLM` in eval mode (float32
by default) and its tokenizer. transformers does the loading; keiryo checks first what a user's file could do
to it: a config.json or tokenizer_config.json naming its own code (`auto_map`) is refused with a TrustError
(keiryo never passes `trust_remote_code`), and a model that would unpack to more than `KEIRYO_MAX_BYTES`
of float weights is refused before anything is allocated. A GGUF file's quantized weights are dequantized to
float by transformers through the `gguf` package (so the float model carries whatever rounding the file had).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keiryo.errors import ConfigError, ModelError, TrustError, check_bytes
from keiryo.hf_files import transformers_module

HF_PREFIX = "hf:"
GGUF_PREFIX = "gguf:"
GGUF_MAGIC = b"GGUF"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_lm_spec(spec: object) -> bool:
    """Whether `spec` names a language model source: "hf:PATH" or "gguf:FILE"."""
    return isinstance(spec, str) and spec.startswith((HF_PREFIX, GGUF_PREFIX))


def spec_path(spec: str) -> Path:
    """The file or folder a model spec names: the path after "hf:"/"gguf:", or the spec itself."""
    return Path(spec.partition(":")[2] if is_lm_spec(spec) else spec)


def load_causal_lm(source: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from "hf:PATH", "gguf:FILE", a folder with config.json, or a .gguf file.

    The model is in eval mode with `dtype` weights and scaled-dot-product attention; nothing is downloaded.
    """
    path, kind = _resolve(source)
    transformers = transformers_module()
    if kind == "gguf":
        check_bytes(gguf_float_bytes(path, dtype), f"GGUF model '{path.name}' dequantized to {dtype}")
        _check_one_width(path)
        where, options = str(path.parent), {"gguf_file": path.name}
    else:
        check_folder(path)
        check_bytes(folder_float_bytes(path, dtype), f"model in '{path}' as {dtype}")
        where, options = str(path), {}
    common = {"local_files_only": True, "trust_remote_code": False, **options}
    # transformers draws its own tqdm bar while it dequantizes a GGUF file; a command draws its own
    quiet = contextlib.redirect_stderr(io.StringIO()) if kind == "gguf" else contextlib.nullcontext()
    try:
        with quiet:
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, **common)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, attn_implementation="sdpa", **common
            )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelError(f"cannot load a causal language model from '{path}': {_first_line(exc)}") from exc
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return model.eval(), tokenizer


def _resolve(source: str | os.PathLike) -> tuple[Path, str]:
    """(absolute path, "hf" | "gguf") of a spec or path; errors say what a valid source looks like."""
    text = os.fspath(source)
    kind = None
    if text.startswith(HF_PREFIX):
        kind, text = "hf", text[len(HF_PREFIX) :]
    elif text.startswith(GGUF_PREFIX):
        kind, text = "gguf", text[len(GGUF_PREFIX) :]
    if not text.strip():
        raise ConfigError("a language model source needs a path: use hf:FOLDER or gguf:FILE.gguf")
    path = Path(text).expanduser().resolve()
    if not path.exists():
        raise ModelError(f"language model source '{path}' does not exist")
    kind = kind or ("hf" if path.is_dir() else "gguf")
    if kind == "hf" and not (path.is_dir() and (path / "config.json").is_file()):
        raise ModelError(f"'{path}' is not a Hugging Face model folder (a folder with config.json)")
    if kind == "gguf":
        if not path.is_file():
            raise ModelError(f"'{path}' is not a GGUF file")
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelError(f"'{path}' is not a GGUF file (it does not start with the GGUF magic)")
    return path, kind


def check_folder(directory: Path) -> None:
    """Refuse a folder whose config asks transformers to import code shipped with the model (`auto_map`)."""
    for name in ("config.json", "tokenizer_config.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            content = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"'{file}' is not valid JSON: {_first_line(exc)}") from exc
        if not isinstance(content, dict):
            raise ModelError(f"'{file}' must hold a JSON object")
        if "auto_map" in content:
            raise TrustError(
                f"'{file}' names its own Python code (auto_map); keiryo never runs code shipped with a "
                "model: use a model whose architecture transformers has built in"
            )


def folder_float_bytes(directory: Path, dtype: torch.dtype) -> int:
    """Bytes the folder's weights take as `dtype`: from safetensors headers, else twice the .bin size."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for file in directory.iterdir():
        if file.suffix == ".safetensors":
            total += _safetensors_elements(file) * itemsize
        elif file.suffix == ".bin":
            total += 2 * file.stat().st_size  # a bf16/fp16 checkpoint loaded as float32 doubles at most
    return total


def _safetensors_elements(file: Path) -> int:
    with file.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelError(f"'{file}' is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(file.stat().st_size, 100 << 20):
            raise ModelError(f"'{file}' has a safetensors header larger than the file; it is corrupt")
        header = json.loads(f.read(length))
    count = 0
    for name, entry in header.items():
        if name != "__metadata__":
            elements = 1
            for size in entry.get("shape", []):
                elements *= int(size)
            count += elements
    return count


def gguf_float_bytes(file: Path, dtype: torch.dtype) -> int:
    """Bytes the GGUF file's tensors take once dequantized to `dtype` (read from its header)."""
    reader = _gguf_reader(file)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return sum(int(t.n_elements) for t in reader.tensors) * itemsize


def _check_one_width(file: Path) -> None:
    """Refuse, in one line, a GGUF file whose blocks have feed-forward layers of different widths (an array
    of lengths: keiryo's measured widths), which llama.cpp reads and transformers' GGUF loader cannot."""
    for name, field in _gguf_reader(file).fields.items():
        if name.endswith(".feed_forward_length") and len(field.data) > 1:
            raise ModelError(
                f"'{file.name}' gives each block its own feed-forward width, which llama.cpp reads but "
                "transformers cannot load: measure the keiryo LM file (.pt) of the same model instead"
            )


def _gguf_reader(file: Path):
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelError("GGUF models need the gguf package: pip install gguf") from exc
    try:
        return GGUFReader(str(file))
    except (ValueError, OSError, struct.error) as exc:
        raise ModelError(f"'{file}' is not a readable GGUF file: {_first_line(exc)}") from exc


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama/Qwen2/Mistral `model.layers`, GPT-2 `transformer.h`)."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks"):
        found = getattr(base, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise ModelError(f"{type(model).__name__} has no list of decoder layers (layers / h) that keiryo knows")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
