"""What pruning needs to know about a model before it starts, and what to say when a forward fails.

Example inputs follow `keiryo.inputs` (a Tensor, a tuple of positional arguments, or a dict of keyword
arguments); data samples may be tuples or dicts too. A failing forward becomes one line naming the layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from keiryo import inputs as model_io
from keiryo.data import DataSplits, example_inputs
from keiryo.errors import ConfigError, ModelError, one_line

PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def check_model(model: object) -> None:
    """Refuse what is not a module, and models already quantized (pruning must come first)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prune needs a torch.nn.Module, got a {type(model).__name__}")
    if getattr(model, "_keiryo_transforms", None):
        raise ConfigError(
            "this model was already quantized (or transformed otherwise): prune before quantizing"
        )


def example_for(
    model: nn.Module,
    example: model_io.Example | None,
    splits: DataSplits | None,
    count: int = 8,
    *,
    random_ok: bool = True,
) -> model_io.Example:
    """Up to `count` samples on the CPU: of the given example, else of the data, else (`random_ok`, enough
    to trace with) random ones of the model's recorded input shape."""
    if example is not None:
        example = model_io.check_example(example)
        return model_io.to_device(model_io.take(example, 0, count), "cpu")
    if splits is not None:
        return example_inputs(splits, count)
    shape = getattr(model, "_keiryo_metadata", {}).get("input_shape")
    if not shape or not random_ok:
        why = "to score activations" if not random_ok else "to trace the model"
        raise ConfigError(f"pruning needs example inputs (or data) {why}; pass example_inputs=")
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))


def protected_layers(
    original: nn.Module,
    pruned: nn.Module,
    example: model_io.Example,
    protect: Sequence[str | nn.Module],
) -> list[str]:
    """Names of the classifier (the last Linear/Conv to run: its outputs are the classes) and of `protect`."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: order.append(mod))
        for m in pruned.modules()
        if isinstance(m, PRUNABLE)
    ]
    try:
        check_forward(pruned, example, "on the example inputs")
    finally:
        for hook in hooks:
            hook.remove()
    names = {m: n for n, m in pruned.named_modules()}
    protected = [names[m] for m in order[-1:]]
    known = {m: n for n, m in original.named_modules()}
    layers = dict(original.named_modules())
    for item in protect:
        name = known.get(item) if isinstance(item, nn.Module) else item
        if name is None or name not in layers:
            listed = ", ".join(n for n, m in layers.items() if isinstance(m, PRUNABLE))
            raise ConfigError(
                f"cannot protect layer {item!r}: the model has no such layer (layers: {listed})"
            )
        protected.append(name)
    return protected


def check_forward(model: nn.Module, example: model_io.Example, when: str) -> None:
    """Run one forward; a failure becomes a ModelError that names the layer it happened in."""
    try:
        with torch.no_grad():
            model_io.call(model, example)
    except Exception as exc:
        raise ModelError(f"the model fails {when}{failing_layer(model, example)}: {one_line(exc)}") from exc


def failing_layer(model: nn.Module, example: model_io.Example) -> str:
    """' in layer NAME (Type)' for the innermost module running when the forward raised, or ''."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    failed: list[nn.Module] = []

    def enter(module, args) -> None:
        stack.append(module)

    def leave(module, args, output) -> None:  # a hook returning something would replace the output
        stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        with torch.no_grad():
            model_io.call(model, example)
    except Exception:
        failed = stack[-1:]
    finally:
        for handle in handles:
            handle.remove()
    if not failed:
        return ""
    name = names.get(failed[0]) or "(the model's own forward)"
    return f" in layer '{name}' ({type(failed[0]).__name__})"
