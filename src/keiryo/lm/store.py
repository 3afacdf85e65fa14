"""A compressed causal LM as one file of plain tensors, and back, without ever holding the float model.

The file is a `torch.save`d dict that loads with `weights_only=True`: the transformers config (JSON text), the
kind of each quantized layer, and a state dict in which

- int8 layers (weight-only, or W8A8: read back from fbgemm's packing) keep their int8 weight and bf16
  scales (a tied embedding shares the head's, stored once);
- int4 layers store their 4-bit integers two to a byte in plain row order, with bf16 scales and zeros — not
  the CPU kernel's packed layout, which differs between CPUs (AVX2, AVX-512) — and are packed on load;
- float tensors that are mostly zeros (pruned weights) go through keiryo's sparse storage (values + bitmask).

The tokenizer, when given, is kept beside the weights (its tokenizer.json text and special tokens), so that
`load_lm` gives a keiryo file back with its tokenizer, as it does a Hugging Face folder or a GGUF file.

`load_compressed` builds the architecture on the meta device (no memory), puts the stored tensors in place,
and computes the few non-persistent buffers (rotary frequencies) on the CPU: resident memory is what the
compressed model needs, not the float model's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from keiryo.compress.prune_transformers import feed_forwards
from keiryo.errors import ArtifactError, ConfigError, ModelError, TrustError, check_bytes
from keiryo.fileio import atomic_torch_save, safe_torch_load
from keiryo.hf_files import transformers_module
from keiryo.lm.calibrate import linearize
from keiryo.lm.kernels import Int4Linear, Int8Embedding, Int8Linear, W8A8Linear
from keiryo.lm.load import is_lm_spec, load_causal_lm
from keiryo.sparse import decode_sparse, encode_sparse

FORMAT = "keiryo-lm/1"


def save_compressed(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None) -> int:
    """Write `model` (float, pruned or quantized by keiryo.lm) and its (fast) `tokenizer` to `path`
    atomically; returns its bytes."""
    layers: dict[str, dict[str, Any]] = {}
    state: dict[str, Any] = {}
    handled: set[str] = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Int4Linear):
            q = module.integers()
            scale, zero = module.scale_zero()
            layers[name] = {"kind": "int4", "group_size": module.group_size}
            state[prefix + "q4"] = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
            state[prefix + "scale"] = scale.to(torch.bfloat16)
            state[prefix + "zero"] = zero.to(torch.bfloat16)
        elif isinstance(module, Int8Linear):
            layers[name] = {"kind": "int8"}
            state[prefix + "weight_int8"] = module.weight_int8
            state[prefix + "scale"] = module.scale
        elif isinstance(module, W8A8Linear):  # the int8 weight and scales, read back from fbgemm's packing
            layers[name] = {"kind": "w8a8", "per_token": module.per_token}
            state[prefix + "weight_int8"], state[prefix + "scale"] = module.int8_weight()
        elif isinstance(module, Int8Embedding):
            layers[name] = {"kind": "int8-embedding", "padding_idx": module.padding_idx}
            state[prefix + "weight_int8"] = module.weight_int8  # the same storage as a tied head: saved once
            state[prefix + "scale"] = module.scale
        else:
            continue
        if getattr(module, "bias", None) is not None:
            state[prefix + "bias"] = module.bias.detach()
        handled.update(f"{prefix}{key}" for key in module.state_dict())
    for key, tensor in model.state_dict().items():
        if key not in handled:
            state[key] = encode_sparse(tensor.detach())
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF file's: the weights here are keiryo's, not GGUF's
    payload = {"format": FORMAT, "config": json.dumps(config), "layers": layers, "state": state}
    if tokenizer is not None:
        payload["tokenizer"] = _tokenizer_record(tokenizer)
    atomic_torch_save(payload, path)
    return Path(path).stat().st_size


def load_compressed(path: str | os.PathLike) -> nn.Module:
    """The model saved by `save_compressed`, in eval mode, built without allocating its float weights."""
    return _build(safe_torch_load(path, what="language model file"), f"language model file '{path}'")


def _build(payload: Any, what: str) -> nn.Module:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ArtifactError(f"{what} is not a keiryo language model file ({FORMAT})")
    try:
        config_dict = json.loads(payload["config"])
        layers, state = payload["layers"], payload["state"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{what} is missing its config, layers or state") from exc
    if "auto_map" in config_dict:
        raise TrustError(f"{what} names its own Python code (auto_map); keiryo never runs code from a model")
    check_bytes(_stored_bytes(state), what)
    transformers = transformers_module()
    try:
        config = transformers.AutoConfig.for_model(**config_dict)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
            linearize(model)
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{what} has a config transformers cannot build: {exc}") from exc
    for name, entry in layers.items():
        _place(model, name, entry, state, what)
    rest = {k: decode_sparse(v, what) for k, v in state.items() if not _belongs(k, layers)}
    _fit_widths(model, rest, what)
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor of another shape than the architecture's
        raise ArtifactError(f"{what} does not fit its config: {str(exc).splitlines()[-1].strip()}") from exc
    if unexpected:
        raise ArtifactError(f"{what} has tensors the architecture does not: {unexpected[:3]}")
    _materialize_buffers(model, what)
    if missing := [n for n, p in model.named_parameters() if p.device.type == "meta"]:
        raise ArtifactError(f"{what} lacks weights for {missing[:3]}")
    return model.eval()


def load_lm(source: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from "hf:FOLDER", "gguf:FILE" or a keiryo language model file (tokenizer None
    when the file was saved without one)."""
    if is_lm_spec(source) or Path(source).is_dir() or Path(source).suffix == ".gguf":
        return load_causal_lm(source)
    path = Path(source)
    if not path.is_file():
        raise ModelError(f"language model file '{path}' does not exist")
    payload = safe_torch_load(path, what="language model file")
    what = f"language model file '{path}'"
    model = _build(payload, what)
    record = payload.get("tokenizer")
    return model, None if record is None else _tokenizer_from(record, what)


def _tokenizer_record(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"only fast tokenizers can be stored with a model, not {type(tokenizer).__name__}")
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    special = {name: str(getattr(tokenizer, name)) for name in names if getattr(tokenizer, name, None)}
    return {"json": backend.to_str(), "special": special}


def _tokenizer_from(record: Any, what: str) -> Any:
    transformers = transformers_module()
    try:
        from tokenizers import Tokenizer

        core = Tokenizer.from_str(record["json"])
        special = {k: v for k, v in record.get("special", {}).items() if isinstance(v, str)}
        return transformers.PreTrainedTokenizerFast(tokenizer_object=core, **special)
    except Exception as exc:  # tokenizers raises a plain Exception for text that is not its JSON
        raise ArtifactError(f"{what} has a corrupt tokenizer: {exc}") from exc


def _belongs(key: str, layers: dict) -> bool:
    module = key.rpartition(".")[0]
    return module in layers


def _place(model: nn.Module, name: str, entry: dict, state: dict, what: str) -> None:
    """Put a quantized layer, rebuilt from its stored tensors, in place of the meta module `name`."""
    prefix = f"{name}."
    bias = state.get(prefix + "bias")
    try:
        kind = entry["kind"]
        if kind == "int4":
            packed = state[prefix + "q4"]
            q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
            scale, zero = state[prefix + "scale"].float(), state[prefix + "zero"].float()
            module: nn.Module = Int4Linear(q, scale, zero, int(entry["group_size"]), bias)
        elif kind == "int8":
            module = Int8Linear(state[prefix + "weight_int8"], state[prefix + "scale"], bias)
        elif kind == "w8a8":
            per_token = entry.get("per_token", False)  # files written before per-token scales had none
            if not isinstance(per_token, bool):
                raise ArtifactError(f"{what}: layer '{name}' has a non-boolean per_token")
            module = W8A8Linear(
                state[prefix + "weight_int8"], state[prefix + "scale"], bias, per_token=per_token
            )
        elif kind == "int8-embedding":
            module = Int8Embedding(
                state[prefix + "weight_int8"], state[prefix + "scale"], entry["padding_idx"]
            )
        else:
            raise ArtifactError(f"{what} has a layer of unknown kind {kind!r}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise ArtifactError(f"{what} has a corrupt quantized layer '{name}': {exc}") from exc


def _fit_widths(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Give the (meta) feed-forward layers the widths their stored weights have: blocks pruned to different
    widths (`Structured(ffn_widths="measured")`), which the config, saying one width, cannot describe. Only
    whole feed-forward layers change, and each block's layers must agree on its width."""
    names = {id(m): name for name, m in model.named_modules()}
    for ffn in feed_forwards(model):
        layers = [*ffn.ups, ffn.down]
        if not all(isinstance(layer, nn.Linear) and layer.weight.device.type == "meta" for layer in layers):
            continue
        stored = [state.get(f"{names[id(layer)]}.weight") for layer in layers]
        if any(not isinstance(t, Tensor) or t.dim() != 2 for t in stored):
            continue  # missing or quantized: load_state_dict or the quantized layer says so
        widths = {t.shape[0] for t in stored[:-1]} | {stored[-1].shape[1]}
        if len(widths) != 1:
            raise ArtifactError(f"{what} has a feed-forward layer whose weights disagree on its width")
        (width,) = widths
        for layer in ffn.ups:
            _resize(layer, width, layer.in_features)
        _resize(ffn.down, ffn.down.out_features, width)


def _resize(layer: nn.Linear, rows: int, columns: int) -> None:
    if (layer.out_features, layer.in_features) != (rows, columns):
        layer.out_features, layer.in_features = rows, columns
        layer.weight = nn.Parameter(torch.empty(rows, columns, device="meta"))
        if layer.bias is not None:
            layer.bias = nn.Parameter(torch.empty(rows, device="meta"))


def _materialize_buffers(model: nn.Module, what: str) -> None:
    """Non-persistent buffers (not in any state dict) are still on the meta device: compute them on the CPU
    with transformers' own initialisation (rotary embeddings' inverse frequencies)."""
    for module in model.modules():
        if any(b is not None and b.device.type == "meta" for b in module.buffers(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
            if "RotaryEmbedding" not in type(module).__name__:
                raise ArtifactError(f"{what}: cannot rebuild the buffers of {type(module).__name__}")


def _stored_bytes(state: dict) -> int:
    total = 0
    for value in state.values():
        if isinstance(value, Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict) and "shape" in value:
            count = 1
            for size in value["shape"]:
                count *= int(size)
            total += count * 4
    return total
