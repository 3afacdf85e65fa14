"""Provenance: what a model went through, recorded on the model so a saved file can be rebuilt.

A class-changing step (quantization) calls `record_transform` before it changes any module, so the model
remembers its float structure and the step's options; `keiryo.artifacts` saves both and replays the step on
load through the rebuild function the step's own module provides. `metadata_of` reads what was saved beside
the weights (input shape, classes, what produced it).
"""

from __future__ import annotations

from typing import Any

from torch import nn

TRANSFORMS_ATTR = "_keiryo_transforms"
STRUCTURE_ATTR = "_keiryo_float_structure"
METADATA_ATTR = "_keiryo_metadata"
PRIMITIVE = (bool, int, float, str)


def record_transform(model: nn.Module, kind: str, **options: Any) -> None:
    """Note a class-changing step (quantization...) so `load` can replay it; call before changing classes."""
    if not hasattr(model, STRUCTURE_ATTR):
        setattr(model, STRUCTURE_ATTR, capture_structure(model))
    transforms = list(getattr(model, TRANSFORMS_ATTR, []))
    transforms.append({"kind": kind, "options": options})
    setattr(model, TRANSFORMS_ATTR, transforms)


def capture_structure(model: nn.Module) -> dict[str, dict]:
    """Each module's class, primitive attributes and parameter/buffer shapes."""
    structure = {}
    for name, module in model.named_modules():
        attrs = {}
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training":
                continue
            if isinstance(value, PRIMITIVE) or (
                isinstance(value, (tuple, list)) and all(isinstance(v, PRIMITIVE) for v in value)
            ):
                attrs[key] = list(value) if isinstance(value, tuple) else value
        tensors = {
            k: list(v.shape) for k, v in {**module._parameters, **module._buffers}.items() if v is not None
        }
        structure[name] = {"class": type(module).__qualname__, "attrs": attrs, "shapes": tensors}
    return structure


def metadata_of(model: nn.Module) -> dict[str, Any]:
    """What was saved beside the weights (input shape, classes, provenance)."""
    return dict(getattr(model, METADATA_ATTR, {}))
