"""A (compressed) Hugging Face model written back as a Hugging Face folder that transformers loads by itself.

The folder has the `save_pretrained` layout — config.json, model.safetensors (and generation_config.json) —
plus the tokenizer or image-processor files of the folder the model came from. Float, fp16 and bf16 weights
are written as they are. Pruning may have narrowed layers, so the config's sizes are read from the weights
(feed-forward width; attention and key/value heads where the config states a head size), and a fresh model
built from that config must take every weight with its exact shape, or the export is refused in one line
(e.g. BERT heads pruned: its config derives the head size from the hidden size). keiryo's fused BERT
attention (`FusedSelfAttention`) is written back as transformers' query/key/value layers.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from keiryo import hf_files
from keiryo.errors import ModelError, one_line
from keiryo.hf import FusedSelfAttention, HFModel

# Files a model folder may hold beside config and weights that a user of the folder needs: the tokenizer's
# and the image processor's (read as data by transformers, never as code).
SIDE_FILES = (
    *hf_files.TOKENIZER_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "tokenizer.model",
    "preprocessor_config.json",
)
# Feed-forward layers by name, and how wide each is: (name ends with, width of the module).
FEED_FORWARD: tuple[tuple[str, Callable[[nn.Module], int]], ...] = (
    ("intermediate.dense", lambda m: m.out_features),  # BERT, ViT
    ("mlp.gate_proj", lambda m: m.out_features),  # Llama, Qwen2, Mistral
    ("mlp.c_fc", lambda m: m.weight.shape[1]),  # GPT-2's Conv1D (in, out)
    ("mlp.fc1", lambda m: m.out_features),
)


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside `model`: an `HFModel`'s, or the model itself."""
    inner = model.model if isinstance(model, HFModel) else model
    if not type(inner).__module__.startswith("transformers.") or not hasattr(inner, "config"):
        raise ModelError(
            f"a Hugging Face folder needs a transformers model (hf:PATH or an AutoModel object), "
            f"got {type(model).__name__}; export it as onnx, torch-export or safetensors instead"
        )
    return inner


def write_folder(model: nn.Module, folder: Path) -> nn.Module:
    """Write `model` (a transformers model or `HFModel`) to `folder` in the save_pretrained layout; returns
    the fresh transformers model the folder was written from (its class is what loads the folder)."""
    inner = transformers_model(model)
    hf_files.transformers_module()  # offline, no progress bars
    state = _plain_state(inner)
    config = _config_for(inner)
    fresh = _fresh_model(inner, config, state)
    fresh.save_pretrained(str(folder), safe_serialization=True)
    source = _source_folder(model, inner)
    if source is not None:
        for name in SIDE_FILES:
            if (source / name).is_file() and not (folder / name).exists():
                shutil.copyfile(source / name, folder / name)
    return fresh


def load_folder(fresh: nn.Module, folder: Path) -> nn.Module:
    """The folder loaded by transformers alone (the class's `from_pretrained`, offline), in eval mode."""
    try:
        return type(fresh).from_pretrained(str(folder), local_files_only=True, trust_remote_code=False).eval()
    except Exception as exc:  # transformers reading what was just written: any failure makes it unusable
        raise ModelError(f"transformers cannot load the written folder: {one_line(exc)}") from exc


def like(model: nn.Module, loaded: nn.Module) -> nn.Module:
    """`model` with its transformers model replaced by `loaded` (an HFModel's pooling kept), to compare."""
    if isinstance(model, HFModel):
        twin = copy.copy(model)
        twin._modules = {**model._modules, "model": loaded}
        return twin
    return loaded


def _plain_state(inner: nn.Module) -> dict[str, Tensor]:
    """The weights under transformers' own names: each fused qkv split back into query, key and value."""
    state = dict(inner.state_dict())
    for name, module in inner.named_modules():
        if isinstance(module, FusedSelfAttention):
            for kind in ("weight", "bias"):
                fused = state.pop(f"{name}.qkv.{kind}")
                for part, value in zip(("query", "key", "value"), fused.chunk(3), strict=True):
                    state[f"{name}.{part}.{kind}"] = value
    return state


def _config_for(inner: nn.Module) -> Any:
    """A copy of the model's config whose sizes are the weights' (pruning may have changed them)."""
    config = copy.deepcopy(inner.config)
    ffn = _uniform("feed-forward width", _widths(inner))
    if ffn is not None:
        setattr(config, "n_inner" if hasattr(config, "n_inner") else "intermediate_size", ffn)
    heads = [
        (m.q_proj.out_features // m.head_dim, m.k_proj.out_features // m.head_dim, m.head_dim)
        for m in inner.modules()
        if isinstance(getattr(m, "q_proj", None), nn.Linear) and isinstance(getattr(m, "head_dim", None), int)
    ]
    counts = _uniform("attention heads (query, key/value, size)", heads)
    if counts is not None and hasattr(config, "num_key_value_heads"):
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = counts
    weight = next((p for p in inner.parameters() if p.is_floating_point()), None)
    if weight is not None:
        config.dtype = weight.dtype
    return config


def _widths(inner: nn.Module) -> Iterator[int]:
    for name, module in inner.named_modules():
        for suffix, width in FEED_FORWARD:
            if name.endswith(suffix):
                yield int(width(module))


def _uniform(what: str, values: Any) -> Any:
    """The one value every layer has, None if there are none; a ModelError when layers differ."""
    found = list(dict.fromkeys(values))
    if len(found) > 1:
        shown = ", ".join(str(v) for v in found[:4])
        raise ModelError(
            f"the layers were pruned to different {what} ({shown}), which one transformers config cannot "
            "hold; prune with the same ratio in every layer, or keep the keiryo .pt file (keiryo.load)"
        )
    return found[0] if found else None


def _fresh_model(inner: nn.Module, config: Any, state: dict[str, Tensor]) -> nn.Module:
    """The model's class built from `config`, holding `state` exactly: every weight must fit its layer."""
    with hf_files.no_init_weights():
        fresh = type(inner)(config)
    expected = fresh.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise ModelError(f"'{key}' has no place in a {type(inner).__name__} built from its config")
        if expected[key].shape != value.shape:
            raise ModelError(
                f"'{key}' has shape {tuple(value.shape)} but a {type(inner).__name__} config can only give "
                f"it {tuple(expected[key].shape)} (pruned in a way its config cannot state); keep the keiryo "
                ".pt file (keiryo.load), or prune only the feed-forward layers"
            )
    missing = [k for k in expected if k not in state and not _dropped(inner, k)]
    if missing:
        raise ModelError(f"the model has no weights for '{missing[0]}', which its config builds")
    fresh.load_state_dict(state, strict=False, assign=True)
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, torch.dtype):
        fresh.to(dtype)
    fresh.tie_weights()
    return fresh.eval()


def _dropped(inner: nn.Module, key: str) -> bool:
    """Whether `key` belongs to a layer the model was built without (set to None, as an embedding model's
    unused pooler): transformers initialises it when loading the folder."""
    module = inner
    for part in key.split(".")[:-1]:
        if part not in module._modules:
            return False
        if module._modules[part] is None:
            return True
        module = module._modules[part]
    return False


def _source_folder(model: nn.Module, inner: nn.Module) -> Path | None:
    """The folder the model was loaded from (for its tokenizer files), if it is one and holds no code."""
    where = model.source if isinstance(model, HFModel) else getattr(inner, "name_or_path", "")
    path = Path(where) if where else None
    if path is None or not (path / "config.json").is_file():
        return None
    hf_files.check_no_remote_code(path)
    return path
