"""What a command or a recipe prepares before it calls the API: a model sized to the data, and example inputs.

Example inputs come from the data's test split when there is data, else are random ones of the input shape a
model file records (keiryo saves it beside the weights), so a model file can be measured or exported alone.
Sizes are checked against KEIRYO_MAX_BYTES before anything is allocated.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from keiryo import data, models, provenance
from keiryo.errors import ConfigError, check_bytes


def model_for_data(
    spec: str,
    splits: data.DataSplits,
    args: dict[str, Any] | None = None,
    seed: int = 0,
    trust_code: bool = False,
) -> nn.Module:
    """Build model `spec`; a built-in is sized to the data's input shape and classes (`args` override).

    The initial weights are seeded, so runs repeat exactly. A spec that imports code needs `trust_code`.
    """
    torch.manual_seed(seed)
    sized = (
        models.kwargs_for_data(spec, splits.input_shape, splits.num_classes) if spec in models.BUILTIN else {}
    )
    return models.build_model(spec, trust_code=trust_code, **{**sized, **(args or {})})


def example_inputs(
    model: nn.Module, splits: data.DataSplits | None, batch: int, seed: int = 0, source: str = "the model"
) -> Tensor:
    """A batch to measure or export `model` with: the data's test inputs, else random ones of its recorded
    input shape. `source` names the model in the error that says its file records no shape."""
    if splits is not None:
        check_bytes(batch * 4 * math.prod(splits.input_shape), f"a batch of {batch} inputs")
        return data.example_inputs(splits, batch)
    shape = provenance.metadata_of(model).get("input_shape")
    if not shape:
        raise ConfigError(f"'{source}' does not record its input shape; pass --data")
    check_bytes(batch * 4 * math.prod(shape), f"a batch of {batch} inputs")
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def metadata_for(splits: data.DataSplits, test_accuracy: float | None) -> dict[str, Any]:
    """What a model file trained on `splits` records beside its weights (read back by `example_inputs`)."""
    return {
        "data": splits.name,
        "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes,
        "classes": splits.classes,
        "test_accuracy": test_accuracy,
    }
