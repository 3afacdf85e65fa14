"""Model files: save and load a model with its architecture, without unpickling code, written atomically.

A keiryo model file is a `torch.save`d dict of plain data and tensors, so it loads with `weights_only=True`:

- `spec`: the factory that builds the architecture (`"cnn"`, `"pkg.mod:fn"`, `"file.py:fn"`) and its kwargs;
- `structure`: each module's shape attributes and parameter shapes, so pruned (reshaped) layers come back;
- `transforms`: class-changing steps (e.g. quantization) that `load` replays on the rebuilt float model;
- `state_dict` and `metadata` (input shape, classes, what produced it). Float tensors that are mostly zeros
  (unstructured pruning) are stored as their non-zero values plus a packed bitmask, and decoded by `read`.

Loading is *structure replay*: build from the spec, reshape to `structure`, replay `transforms`, load weights.
Nothing in a file is trusted: built-in factories, hf:DIR (read as config and weights) and "hf-config" (a class
that transformers ships, rebuilt from the recorded config) are always allowed; any other factory is imported
only with `trust_code=True` (TrustError otherwise). Every part of the payload is
checked for its type, and what it would allocate (the file itself, sparse tensors, recorded layer shapes, the
recorded input shape) is checked against `KEIRYO_MAX_BYTES` before anything is allocated; whatever is wrong
with a file ends as one line (ArtifactError, TrustError or ResourceError), never a raw exception.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keiryo import models
from keiryo.compress.fold import replay as replay_fold
from keiryo.compress.quantize import replay as replay_quantize
from keiryo.errors import (
    ArtifactError,
    KeiryoError,
    ModelError,
    ResourceError,
    TrustError,
    check_bytes,
    one_line,
)
from keiryo.fileio import atomic_torch_save, safe_torch_load
from keiryo.provenance import (
    METADATA_ATTR,
    PRIMITIVE,
    STRUCTURE_ATTR,
    TRANSFORMS_ATTR,
    capture_structure,
    metadata_of,
)
from keiryo.sparse import MAX_DIMS, checked_shape, decode_sparse, dense_bytes, encode_sparse, short

MODEL_FORMAT = "keiryo-model/1"
# Each class-changing step a file may record, and the function its own compress module provides to rebuild its
# layers on a freshly built float model (the weights are loaded afterwards), in place or by returning the
# module that replaces the model (a PT2E int8 program). A new step adds one line here.
REPLAY = {"quantize": replay_quantize, "fold_batchnorm": replay_fold}
EXAMPLE_BATCH = 64  # the batch of random inputs the CLI makes from a recorded input shape


def apply_structure(model: nn.Module, structure: dict[str, dict]) -> None:
    """Reshape a freshly built model to a recorded structure (e.g. after pruning removed channels).

    Only attributes that already hold plain values (sizes, head counts) are changed, and only to values of
    the same kind: a file cannot replace a method or a layer. Call `check_structure` first.
    """
    for name, entry in structure.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ArtifactError(f"it records a layer '{name}' that its factory does not build") from exc
        for key, value in entry["attrs"].items():
            current = getattr(module, key, None)
            restored = tuple(value) if isinstance(current, tuple) else value
            if _same_kind(current, restored) and current != restored:
                setattr(module, key, restored)
        for key, shape in entry["shapes"].items():
            store = module._parameters if key in module._parameters else module._buffers
            current = store.get(key)
            if current is None or list(current.shape) != shape:
                fresh = torch.zeros(shape, dtype=current.dtype if current is not None else torch.float32)
                if store is module._parameters:
                    requires_grad = current.requires_grad if current is not None else True
                    store[key] = nn.Parameter(fresh, requires_grad=requires_grad)
                else:
                    store[key] = fresh


def _same_kind(current: Any, value: Any) -> bool:
    """Whether a recorded attribute may replace `current`: plain values of the same type (lists: of plain
    values)."""
    if isinstance(current, (tuple, list)):
        return isinstance(value, type(current)) and all(isinstance(v, PRIMITIVE) for v in value)
    return isinstance(current, PRIMITIVE) and type(value) is type(current)


def check_structure(structure: Any, what: str) -> None:
    """Check a recorded structure's form and refuse, before allocating, shapes above `KEIRYO_MAX_BYTES`."""
    if not isinstance(structure, dict):
        raise ArtifactError(f"{what} has no valid 'structure' (a mapping of layer names)")
    elements = 0
    for name, entry in structure.items():
        if not (
            isinstance(name, str)
            and isinstance(entry, dict)
            and isinstance(entry.get("attrs"), dict)
            and isinstance(entry.get("shapes"), dict)
        ):
            raise ArtifactError(f"{what} has a malformed structure entry for layer {name!r}")
        for key, shape in entry["shapes"].items():
            elements += math.prod(checked_shape(shape, f"{what}: layer '{name}' tensor '{key}'"))
    check_bytes(4 * elements, f"{what}: the recorded layer shapes")


def save(
    model: nn.Module,
    path: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
    factory: str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Path:
    """Save `model` with its architecture to `path` atomically; returns the path.

    The model must come from `keiryo.models.build_model` or name its `factory` here.
    """
    spec = models.spec_of(model)
    if factory is not None:
        spec = {"factory": factory, "kwargs": dict(kwargs or {})}
    if spec is None:
        raise ArtifactError(
            "cannot save a model without a factory: build it with keiryo.models.build_model "
            "or pass factory='package.module:function'"
        )
    state = model.state_dict()
    payload = {
        "format": MODEL_FORMAT,
        "spec": spec,
        "structure": getattr(model, STRUCTURE_ATTR, None) or capture_structure(model),
        "transforms": list(getattr(model, TRANSFORMS_ATTR, [])),
        "state_dict": {  # torch.ao quantized Linear layers also store their dtype (a torch.dtype) here
            k: encode_sparse(v.detach().cpu()) if isinstance(v, torch.Tensor) else v for k, v in state.items()
        },
        # each module's state_dict version: torch.ao's quantized layers read their saved format from it
        "versions": {k: m.get("version") for k, m in getattr(state, "_metadata", {}).items()},
        "metadata": {**getattr(model, METADATA_ATTR, {}), **(metadata or {})},
        "torch": str(torch.__version__),
    }
    atomic_torch_save(payload, path)
    return Path(path)


def read(path: str | Path) -> dict[str, Any]:
    """The validated payload of a keiryo model file (nothing built), its sparse tensors decoded to dense."""
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ArtifactError(
            f"model file '{path}' is a PyTorch file but not a keiryo model "
            "(save models with keiryo.save or `keiryo train --out`)"
        )
    what = f"model file '{path}'"
    _check_payload(payload, what)
    state = payload["state_dict"]
    check_bytes(sum(dense_bytes(v, what) for v in state.values()), f"{what}: its sparse tensors decoded")
    payload["state_dict"] = {k: decode_sparse(v, what) for k, v in state.items()}
    return payload


def _check_payload(payload: dict, what: str) -> None:
    """Check that every part `load` reads has the type it expects; ArtifactError naming the part if not."""
    spec = payload.get("spec")
    if not (
        isinstance(spec, dict)
        and isinstance(spec.get("factory"), str)
        and spec["factory"].strip()
        and isinstance(spec.get("kwargs"), dict)
        and all(isinstance(k, str) for k in spec["kwargs"])
    ):
        raise ArtifactError(
            f"{what} has no valid 'spec' (the factory that builds it); it is corrupt or foreign"
        )
    check_structure(payload.get("structure"), what)
    transforms = payload.get("transforms", [])
    if not isinstance(transforms, list) or not all(
        isinstance(t, dict) and isinstance(t.get("kind"), str) and isinstance(t.get("options"), dict)
        for t in transforms
    ):
        raise ArtifactError(f"{what} has malformed 'transforms'")
    payload["transforms"] = transforms
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ArtifactError(f"{what} has no valid 'state_dict' (a mapping of tensor names)")
    for key in ("versions", "metadata"):
        if not isinstance(payload.get(key) or {}, dict):
            raise ArtifactError(f"{what} has a malformed '{key}' (not a mapping)")
    input_shape_of(payload.get("metadata") or {}, batch=1, what=what)  # one sample must fit


def input_shape_of(
    model_or_metadata: nn.Module | dict, batch: int = EXAMPLE_BATCH, *, what: str = "model"
) -> tuple[int, ...] | None:
    """The recorded input shape of one sample (None if none is recorded), checked to be whole numbers ≥ 1 and
    to fit `batch` float32 samples in `KEIRYO_MAX_BYTES`; use it before making example inputs from it."""
    meta = model_or_metadata if isinstance(model_or_metadata, dict) else metadata_of(model_or_metadata)
    shape = meta.get("input_shape")
    if shape is None:
        return None
    if (
        not isinstance(shape, (list, tuple))
        or not 1 <= len(shape) <= MAX_DIMS
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
    ):
        raise ArtifactError(
            f"{what} records input shape {short(shape)}, not a list of 1 to {MAX_DIMS} sizes ≥ 1"
        )
    check_bytes(4 * batch * math.prod(shape), f"{what}: a batch of {batch} inputs of its recorded shape")
    return tuple(shape)


def load(path: str | Path, *, trust_code: bool = False) -> nn.Module:
    """Rebuild the model saved at `path`: factory → recorded shapes → replayed transforms → weights.

    A factory other than a built-in or hf:DIR imports and runs code, so it is refused (TrustError) unless
    `trust_code=True`. Whatever else is wrong with the file is one ArtifactError or ResourceError line.
    """
    payload = read(path)
    what = f"model file '{path}'"
    spec = payload["spec"]
    factory = spec["factory"]
    if models.needs_trust(factory) and not trust_code:
        raise TrustError(
            f"{what} is built by '{factory}', which imports and runs Python code; "
            "pass --trust-code (Python: trust_code=True) only if you trust the file"
        )
    try:
        model = models.build_model(factory, trust_code=trust_code, **spec["kwargs"])
    except (ModelError, ResourceError) as exc:
        raise type(exc)(f"{what}: {exc}") from exc
    expected = {}
    try:
        apply_structure(model, payload["structure"])
        for transform in payload["transforms"]:
            model = _replay(model, transform)
        expected = _shapes(model.state_dict())
        model.load_state_dict(_with_versions(payload), strict=True, assign=True)
        if callable(getattr(model, "tie_weights", None)):
            model.tie_weights()  # transformers' tied embeddings: assigning loaded tensors untied them
    except KeiryoError as exc:  # a layer or transform this file cannot have: keep the kind, name the file
        raise type(exc)(f"{what}: {exc}") from exc
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        why = _mismatch(expected, payload["state_dict"]) if expected else one_line(exc)
        raise ArtifactError(
            f"{what} does not match its recorded architecture: {why or one_line(exc)}"
        ) from exc
    setattr(model, TRANSFORMS_ATTR, list(payload["transforms"]))
    if payload["transforms"]:
        setattr(model, STRUCTURE_ATTR, payload["structure"])
    model._keiryo_metadata = dict(payload.get("metadata") or {})
    model.eval()
    return model


def _shapes(state: dict) -> dict[str, list[int] | None]:
    return {k: list(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}


def _mismatch(expected: dict[str, list[int] | None], given: dict) -> str:
    """The first difference between the tensors a model expects and those a file holds, in words."""
    for key, shape in expected.items():
        if key not in given:
            return f"'{key}' is missing"
        if shape is not None and isinstance(given[key], torch.Tensor) and list(given[key].shape) != shape:
            return f"'{key}' has shape {list(given[key].shape)}, the layer needs {shape}"
    extra = next((k for k in given if k not in expected), None)
    return f"'{extra}' belongs to no layer" if extra else ""


def _with_versions(payload: dict) -> dict:
    """The saved state_dict with the module versions that `load_state_dict` reads from `_metadata`."""
    state = OrderedDict(payload["state_dict"])
    versions = payload.get("versions") or {}
    state._metadata = OrderedDict((k, {"version": v}) for k, v in versions.items() if v is not None)
    return state


def _replay(model: nn.Module, transform: dict) -> nn.Module:
    """Re-apply one recorded class-changing step to the rebuilt model (weights come after); returns it, or
    the module that replaced it."""
    kind = transform["kind"]
    rebuild = REPLAY.get(kind)
    if rebuild is None:
        raise ArtifactError(f"it records transform '{kind}', which this keiryo version cannot replay")
    return rebuild(model, **transform["options"]) or model
