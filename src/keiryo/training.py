"""`keiryo.train`: one call for every strategy, from a single process to a Ray parameter server.

The strategy says how the work is spread (keiryo.parallel.config); the `TrainConfig` says what training is
(epochs, lr, device, precision, validation, ...). Every strategy runs the same loop (`keiryo.loop.fit`), or
for async the parameter server with the same optimizer, and reports one history line per epoch.
"""

from __future__ import annotations

import os

from torch import nn

from keiryo.data import check_model_fits
from keiryo.errors import ConfigError
from keiryo.holdout import split_for_training
from keiryo.loop import LossFn, TrainConfig, TrainResult, classification_loss, fit
from keiryo.parallel import async_ps, launch
from keiryo.parallel.config import Async, Single, Strategy, strategy_of
from keiryo.progress import say


def train(
    model: nn.Module,
    data: object,
    strategy: str | Strategy = "single",
    config: TrainConfig | None = None,
    *,
    workers: int | None = None,
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """Train `model` in place on `data` and return it with its history.

    `data`: anything `load_data` accepts, of which `config.validation` is held out (`result.data` says how
    it was split), `{"train": ..., "validation": ...}`, or a `DataSplits` used as it is.
    `strategy`: "single" | "ddp" | "fsdp" | "pipeline" | "async", or a config (`DDP(workers=4)`,
    `Pipeline(split_points=[...])`, `Async(mode="bounded")`); `workers` sets the worker count of a named one.
    ddp, fsdp and pipeline start local processes, or join the torchrun job this process is part of; async
    trains on a Ray parameter server. `loss_fn(model, inputs, targets) -> (loss, outputs)`: None is the
    classification (or regression) loss.
    """
    spec = strategy_of(strategy, workers)
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    loss_fn = loss_fn or classification_loss
    if isinstance(spec, Single):
        return fit(model, data, config, loss_fn=loss_fn)
    splits, note = split_for_training(data, config.validation, config.seed)
    if note and config.progress and int(os.environ.get("RANK", "0")) == 0:
        say(note)
    if loss_fn is classification_loss:  # here, on the whole model, before any worker starts
        check_model_fits(model, splits)
    if isinstance(spec, Async):
        result = async_ps.run(model, splits, spec, config, loss_fn)
    else:
        result = launch.run(model, splits, spec, config, loss_fn)
    result.data = note
    return result
