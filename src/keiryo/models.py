"""Reference models (mlp, cnn, transformer) and model factories named by string.

The three built-ins are small enough to train on digits in seconds on a CPU, yet each has the structure that
makes compression interesting: the cnn has residual additions and batch-norm (channels tied across layers),
the transformer has a timm-style `Attention` (one `qkv` Linear plus `num_heads`) that head pruning expects.

`build_model("cnn" | "pkg.mod:fn" | "path/file.py:fn", **kwargs)` builds a model and records the factory and
its (JSON-able) kwargs on it, so `keiryo.save` can rebuild the architecture without pickling code; a
transformers model object made elsewhere is rebuilt from its class and config (factory "hf-config").

Trust: a spec that names Python code ("pkg.mod:fn", "file.py:fn") is imported only with `trust_code=True`,
since importing and calling it runs whatever it contains; the built-ins, "hf:DIR" (read as config and
weights, never with the folder's code) and "hf-config" need no trust. Each built-in counts its parameters
before it builds, so a size that asks for more memory than `KEIRYO_MAX_BYTES` is refused before anything is
allocated.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import itertools
import math
import numbers
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keiryo.attention import qkv_attention
from keiryo.errors import ModelError, TrustError, check_bytes, one_line
from keiryo.hf import HF_CONFIG, config_spec, from_config, hf_factory, is_hf_spec

SPEC_ATTR = "_keiryo_spec"
MAX_LAYERS = (
    1000  # hidden layers / blocks a built-in may have: far above these small models, far below a bomb
)
"""Attribute set on every model `build_model` returns: {"factory": str, "kwargs": dict}."""


# --- the built-in models ------------------------------------------------------------------------------------


def mlp(
    in_features: int = 64, hidden: Sequence[int] = (256, 128), num_classes: int = 10, dropout: float = 0.0
) -> nn.Module:
    """Flatten, then Linear+ReLU(+Dropout) per hidden size, then the `classifier` Linear."""
    _check_positive("mlp", in_features=in_features, num_classes=num_classes)
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise ModelError(f"model 'mlp': hidden must be a list of layer sizes, got {hidden!r}")
    _check_count("mlp", "hidden", len(hidden))
    _check_positive("mlp", **{f"hidden[{i}]": h for i, h in enumerate(hidden)})
    _check_dropout("mlp", dropout)
    widths = [in_features, *hidden, num_classes]
    elements = sum(a * b + b for a, b in itertools.pairwise(widths))
    _check_size("mlp", elements, in_features=in_features, widest_hidden=max(hidden, default=0))
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = in_features
    for i, size in enumerate(hidden):
        layers[f"fc{i}"] = nn.Linear(width, size)
        layers[f"act{i}"] = nn.ReLU()
        if dropout > 0:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        width = size
    layers["classifier"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


class ResidualBlock(nn.Module):
    """Two 3x3 conv+BN with an identity skip: conv2's output channels are tied to the block's input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class CNN(nn.Module):
    """Conv stem, residual blocks at full resolution, global average pooling, `fc` classifier.

    There is no downsampling: the reference inputs are 8x8, and keeping every conv at full resolution makes
    conv compute dominate latency, so removing channels gives a real speed-up.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int, blocks: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def cnn(in_channels: int = 1, num_classes: int = 10, width: int = 64, blocks: int = 2) -> nn.Module:
    """A small residual CNN with batch-norm for (B, C, H, W) images such as digits (B, 1, 8, 8).

    width=64 trains to ~98% on digits in 3 epochs (under a second each on 2 CPU threads); halving it
    makes a forward about 3x faster, so channel pruning shows.
    """
    _check_positive("cnn", in_channels=in_channels, num_classes=num_classes, width=width)
    _check_positive("cnn", blocks=blocks, allow_zero=True)
    _check_count("cnn", "blocks", blocks)
    bn = 4 * width + 1  # weight, bias, running mean and variance per channel; the batch counter
    elements = (
        in_channels * width * 9 + bn + 2 * blocks * (width * width * 9 + bn) + (width + 1) * num_classes
    )
    _check_size("cnn", elements, in_channels=in_channels, width=width, blocks=blocks)
    return CNN(in_channels, num_classes, width, blocks)


class Attention(nn.Module):
    """Multi-head self-attention laid out like timm's: one `qkv` Linear, `proj`, and an int `num_heads`.

    The head size is read from `qkv` at every call, so the module still works after pruning removes heads
    or head dimensions (set `num_heads` to the new count).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        out = qkv_attention(self.qkv, x, self.num_heads, self.dropout if self.training else 0.0)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = mlp_ratio * dim
        self.mlp = nn.Sequential(
            OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim))
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Rows as tokens: (B, ...) → (B, seq_len, in_features) → embed + position → blocks → mean pool → head."""

    def __init__(self, in_features: int, seq_len: int, dim: int, blocks: list[Block], classes: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.embed = nn.Linear(in_features, dim)
        # Large enough (std 0.5, not ViT's 0.02) that rows are told apart from the first step: with 0.02 the
        # model needs ~20 epochs on digits instead of ~10.
        self.pos_embed = nn.Parameter(torch.randn(1, seq_len, dim) * 0.5)
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x.reshape(x.shape[0], self.seq_len, -1)) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


def transformer(
    tokens: Sequence[int] = (8, 8),
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    mlp_ratio: int = 2,
    num_classes: int = 10,
) -> nn.Module:
    """A small pre-norm transformer encoder over `tokens` = (sequence length, features per token): digits
    (B, 1, 8, 8) become 8 tokens of 8 pixels."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) or len(tokens) != 2:
        raise ModelError(f"model 'transformer': tokens must be [sequence length, features], got {tokens!r}")
    seq_len, in_features = tokens
    sizes = dict(in_features=in_features, seq_len=seq_len, dim=dim, heads=heads, mlp_ratio=mlp_ratio)
    _check_positive("transformer", num_classes=num_classes, **sizes)
    _check_positive("transformer", depth=depth, allow_zero=True)
    _check_count("transformer", "depth", depth)
    if dim % heads:
        raise ModelError(f"model 'transformer': dim ({dim}) must be a multiple of heads ({heads})")
    hidden = mlp_ratio * dim
    block = 4 * dim + 4 * dim * dim + 4 * dim + 2 * dim * hidden + hidden + dim  # norms, qkv+proj, mlp
    elements = (in_features + 1 + seq_len) * dim + depth * block + 2 * dim + (dim + 1) * num_classes
    _check_size("transformer", elements, dim=dim, depth=depth, mlp_ratio=mlp_ratio, seq_len=seq_len)
    blocks = [Block(dim, heads, mlp_ratio) for _ in range(depth)]
    return Transformer(in_features, seq_len, dim, blocks, num_classes)


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "transformer": transformer}


# --- building models from a spec ----------------------------------------------------------------------------


def build_model(spec: str, *, trust_code: bool = False, **kwargs: Any) -> nn.Module:
    """Build a model from a built-in name, "package.module:factory", "path/file.py:factory" or "hf:DIR".

    Specs that name Python code are refused (TrustError) unless `trust_code=True`. The factory and its kwargs
    are recorded on the model (`SPEC_ATTR`) so it can be saved and rebuilt; kwargs must therefore be JSON-able
    (tuples are stored, and passed, as lists).
    """
    name, factory = _locate(spec, trust_code)
    clean = {key: _json_value(value, f"model '{spec}': argument '{key}'") for key, value in kwargs.items()}
    try:
        inspect.signature(factory).bind(**clean)
    except TypeError as exc:
        raise ModelError(f"model '{spec}': {exc}") from exc
    except ValueError:  # no signature to check (some builtins); the call itself will tell
        pass
    try:
        model = factory(**clean)
    except ModelError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"model '{spec}' could not be built with {clean}: {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory '{spec}' returned a {type(model).__name__}, not a torch.nn.Module")
    setattr(model, SPEC_ATTR, {"factory": name, "kwargs": clean})
    return model


def needs_trust(spec: str) -> bool:
    """Whether building `spec` imports and runs Python code: "pkg.mod:fn" and "file.py:fn" do; built-in
    names and "hf:DIR" do not (an unknown name imports nothing: building it is a ModelError)."""
    return isinstance(spec, str) and ":" in spec and not is_hf_spec(spec)


def check_trusted(spec: str, trust_code: bool, where: str = "") -> None:
    """Refuse (TrustError) a spec that runs code unless the caller trusted it; `where` says who named it."""
    if trust_code or not needs_trust(spec):
        return
    raise TrustError(
        f"{where + ': ' if where else ''}model '{spec}' imports and runs Python code; keiryo builds only its "
        f"built-in models ({_builtin_names()}) and hf:DIR unless you pass --trust-code "
        "(Python: trust_code=True), so do that only for code you trust"
    )


def resolve_factory(factory: str, *, trust_code: bool = False) -> Callable[..., nn.Module]:
    """The callable a built-in name, "package.module:fn" or "path/file.py:fn" names (code needs trust)."""
    return _locate(factory, trust_code)[1]


def spec_of(model: nn.Module) -> dict | None:
    """The {"factory", "kwargs"} that built `model` with `build_model` — for a transformers model object, its
    class and current config (which pruning may have changed) — or None if it was built otherwise."""
    spec = getattr(model, SPEC_ATTR, None)
    if not isinstance(spec, dict) or spec["factory"] == HF_CONFIG:
        return config_spec(model)
    return {"factory": spec["factory"], "kwargs": dict(spec["kwargs"])}


def kwargs_for_data(name: str, input_shape: tuple[int, ...], num_classes: int | None) -> dict:
    """The kwargs that size built-in model `name` to inputs of `input_shape` (one sample) and the classes.

    `num_classes=None` means regression: one output.
    """
    if name not in BUILTIN:
        raise ModelError(f"cannot size model '{name}' to the data: only built-ins are ({_builtin_names()})")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ModelError(f"model '{name}': the data's input shape {shape} has no features")
    outputs = 1 if num_classes is None else int(num_classes)
    if name == "mlp":
        return {"in_features": math.prod(shape), "num_classes": outputs}
    if name == "cnn":
        if len(shape) != 3:
            raise ModelError(f"model 'cnn' needs images (channels, height, width); the data's are {shape}")
        return {"in_channels": shape[0], "num_classes": outputs}
    seq_len = shape[-2] if len(shape) >= 2 else 1
    return {"tokens": [seq_len, math.prod(shape) // seq_len], "num_classes": outputs}


def _locate(spec: str, trust_code: bool) -> tuple[str, Callable[..., nn.Module]]:
    """(the name to record, the factory) for a spec; file paths are recorded absolute.

    The spec's form is checked first, then trust, and only then is anything imported.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError(f"model must be a name such as 'cnn' or 'package.module:function', got {spec!r}")
    if is_hf_spec(spec):  # a local Hugging Face directory (needs the `hf` extra)
        return hf_factory(spec)
    if spec == HF_CONFIG:  # a transformers class (by name) and its config: no code of the file's
        return spec, from_config
    if ":" not in spec:
        if spec in BUILTIN:
            return spec, BUILTIN[spec]
        if spec.endswith(".py"):
            raise ModelError(f"model file '{spec}' needs a factory function: use '{spec}:function'")
        raise ModelError(
            f"unknown model '{spec}' (built-in models: {_builtin_names()}; "
            "or 'package.module:function', or 'path/to/file.py:function')"
        )
    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise ModelError(f"model '{spec}' must look like 'package.module:function' or 'file.py:function'")
    check_trusted(spec, trust_code)
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        module = _import_file(path)
        name = f"{path}:{attr}"
    else:
        module = _import_module(where)
        name = spec
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelError(f"model factory '{spec}': '{where}' has no '{attr}'")
    if not callable(factory):
        raise ModelError(f"model factory '{spec}': '{attr}' is a {type(factory).__name__}, not a function")
    return name, factory


def _import_module(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ModelError(f"cannot import module '{module_name}' for a model: {one_line(exc)}") from exc
    except Exception as exc:  # the user's code failed while importing; say so in one line
        raise ModelError(f"importing module '{module_name}' failed: {one_line(exc)}") from exc


def _import_file(path: Path) -> Any:
    """Import a .py file once per process (like `import`), under a name unique to its path."""
    if not path.is_file():
        raise ModelError(f"model file '{path}' does not exist")
    module_name = f"keiryo_factory_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"model file '{path}' cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look a class's module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code failed while importing; say so in one line
        del sys.modules[module_name]
        raise ModelError(f"importing model file '{path}' failed: {one_line(exc)}") from exc
    return module


def _json_value(value: Any, what: str) -> Any:
    """`value` as plain JSON data (tuples → lists, numpy scalars → Python), or a ModelError saying why not."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v, what) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v, what) for k, v in value.items()}
    raise ModelError(f"{what} must be a number, string, list or dict, got a {type(value).__name__}")


def _check_positive(model: str, allow_zero: bool = False, **values: Any) -> None:
    for key, value in values.items():
        least = 0 if allow_zero else 1
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ModelError(f"model '{model}': {key} must be a whole number ≥ {least}, got {value!r}")


def _check_dropout(model: str, dropout: Any) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ModelError(f"model '{model}': dropout must be a number in [0, 1), got {dropout!r}")


def _check_count(model: str, key: str, count: int) -> None:
    if count > MAX_LAYERS:
        raise ModelError(f"model '{model}': {key} asks for {count} layers; at most {MAX_LAYERS} are allowed")


def _check_size(model: str, elements: int, **sizes: Any) -> None:
    """Refuse, before allocating, a built-in whose float32 parameters would pass `KEIRYO_MAX_BYTES`."""
    shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
    check_bytes(4 * elements, f"model '{model}' ({shown})")


def _builtin_names() -> str:
    return ", ".join(sorted(BUILTIN))
