"""Model inputs and outputs as PyTorch passes them: one convention for every keiryo call of a model.

An *example* (what `example_inputs` means everywhere in keiryo, as in `torch.export` and torchao's PT2E) is

- a `Tensor` — the model is called as `model(x)`;
- a `tuple` (or list) of positional arguments — `model(*args)`;
- a `dict` of keyword arguments — `model(**kwargs)` (what Hugging Face models and their datasets use).

The first dimension of every tensor in an example is the batch. A model's output may be a Tensor, a
tuple/list, a dict or a Hugging Face `ModelOutput`; `main_output` picks the tensor keiryo compares and
measures (`logits`, else `last_hidden_state`, else the first tensor); `output_name` says which it picked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from keiryo.errors import ConfigError, ModelError

Example = Tensor | tuple | list | dict
PREFERRED_OUTPUTS = ("logits", "last_hidden_state", "pooler_output", "prediction_logits")
LABEL_KEYS = ("labels", "label", "targets", "target")


def check_example(example: object, what: str = "example_inputs") -> Example:
    """The example itself if it follows the convention (a Tensor, a tuple/list or dict holding at least one
    tensor); otherwise a one-line ConfigError naming what was given."""
    if isinstance(example, Tensor):
        return example
    if isinstance(example, (tuple, list, Mapping)):
        if not tensors(example):
            raise ConfigError(
                f"{what} holds no tensor: pass a Tensor, a tuple of arguments or a dict of them"
            )
        return dict(example) if isinstance(example, Mapping) else example
    raise ConfigError(
        f"{what} is a {type(example).__name__}: pass a Tensor, a tuple of positional arguments "
        "or a dict of keyword arguments"
    )


def args_kwargs(example: Example) -> tuple[tuple, dict]:
    """The positional and keyword arguments an example stands for."""
    if isinstance(example, Tensor):
        return (example,), {}
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    raise ConfigError(f"model inputs must be a Tensor, a tuple or a dict, not {type(example).__name__}")


def call(model: Callable[..., Any], example: Example) -> Any:
    """`model(x)`, `model(*args)` or `model(**kwargs)`, as the example says."""
    args, kwargs = args_kwargs(example)
    return model(*args, **kwargs)


def map_tensors(example: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """The example (or output) with `fn` applied to every tensor in it, nested tuples/lists/dicts kept."""
    if isinstance(example, Tensor):
        return fn(example)
    if isinstance(example, Mapping):
        return {k: map_tensors(v, fn) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return (
            type(example)(map_tensors(v, fn) for v in example) if type(example) in (tuple, list) else example
        )
    return example


def to_device(example: Any, device: torch.device | str, float_dtype: torch.dtype | None = None) -> Any:
    """Every tensor moved to `device`; floating ones also cast to `float_dtype` when given (ids stay ints)."""

    def move(t: Tensor) -> Tensor:
        if float_dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=float_dtype)
        return t.to(device)

    return map_tensors(example, move)


def tensors(example: Any) -> list[Tensor]:
    """Every tensor in an example or output, in order."""
    if isinstance(example, Tensor):
        return [example]
    if isinstance(example, Mapping):
        return [t for v in example.values() for t in tensors(v)]
    if isinstance(example, (tuple, list)):
        return [t for v in example for t in tensors(v)]
    return []


def batch_size(example: Example) -> int:
    """The batch: the first dimension of the example's first tensor that has one."""
    for t in tensors(example):
        if t.dim() > 0:
            return int(t.shape[0])
    raise ConfigError("example_inputs have no batch dimension (every tensor in them is a scalar)")


def take(example: Example, start: int, stop: int | None = None) -> Example:
    """Samples `start:stop` of an example: every tensor whose first dimension is the batch is sliced."""
    n = batch_size(example)
    return map_tensors(example, lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == n else t)


def index(example: Example, rows: Tensor | Sequence[int]) -> Example:
    """The samples at `rows` (e.g. a shuffled batch) of every batch-first tensor."""
    n = batch_size(example)
    rows = torch.as_tensor(rows, dtype=torch.long)
    return map_tensors(example, lambda t: t[rows] if t.dim() > 0 and t.shape[0] == n else t)


def resize_batch(example: Example, size: int) -> Example:
    """An example of exactly `size` samples: the first samples, repeated cyclically when there are too few."""
    n = batch_size(example)
    if n == size:
        return example
    rows = torch.arange(size) % n
    return index(example, rows)


def concat(examples: Iterable[Example]) -> Example:
    """Examples of the same form joined along the batch: tensors concatenated, other values from the first."""
    examples = list(examples)
    if not examples:
        raise ConfigError("no inputs to join")
    first = examples[0]
    if isinstance(first, Tensor):
        return torch.cat(list(examples), dim=0) if first.dim() > 0 else first
    if isinstance(first, Mapping):
        return {k: concat([e[k] for e in examples]) if isinstance(v, Tensor) else v for k, v in first.items()}
    if isinstance(first, (tuple, list)):
        joined = [
            concat([e[i] for e in examples]) if isinstance(v, Tensor) else v for i, v in enumerate(first)
        ]
        return type(first)(joined)
    return first


def split_batch(batch: Any) -> tuple[Example, Tensor | None]:
    """A loader batch as (inputs, targets): `(x, y)` pairs, dicts with a `labels` key (Hugging Face style,
    the rest are the inputs), or bare inputs (targets None)."""
    if isinstance(batch, Mapping):
        label_key = next((k for k in LABEL_KEYS if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k != label_key}
        return inputs, (batch[label_key] if label_key else None)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        return tuple(batch[:-1]), batch[-1]
    return batch, None


def output_name(output: Any) -> str:
    """Which part of an output keiryo compares: 'output', 'logits', 'last_hidden_state', 'output[0]'..."""
    if isinstance(output, Tensor):
        return "output"
    if isinstance(output, Mapping):
        for key in PREFERRED_OUTPUTS:
            if isinstance(output.get(key), Tensor):
                return key
        for key, value in output.items():
            if isinstance(value, Tensor):
                return str(key)
    if isinstance(output, (tuple, list)):
        for i, value in enumerate(output):
            if isinstance(value, Tensor):
                return f"output[{i}]"
    raise ModelError(f"the model returned {type(output).__name__}, which holds no tensor to compare")


def main_output(output: Any) -> Tensor:
    """The tensor of a model's output that keiryo compares and measures (see `output_name`)."""
    if isinstance(output, Tensor):
        return output
    name = output_name(output)
    if isinstance(output, Mapping):
        return output[name]
    return output[int(name[len("output[") : -1])]


def forward(model: nn.Module, example: Example) -> Tensor:
    """`main_output(call(model, example))`: the one tensor keiryo compares for this model and input."""
    return main_output(call(model, example))


def describe(example: Example) -> str:
    """An example's form in short: '(64, 8) float32' or 'input_ids (2, 16) int64, attention_mask ...'."""

    def one(t: Any) -> str:
        if isinstance(t, Tensor):
            return f"({', '.join(str(s) for s in t.shape)}) {str(t.dtype).replace('torch.', '')}"
        return type(t).__name__

    if isinstance(example, Tensor):
        return one(example)
    if isinstance(example, Mapping):
        return ", ".join(f"{k} {one(v)}" for k, v in example.items())
    return ", ".join(one(v) for v in example)
