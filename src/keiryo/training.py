"""`keiryo.train`: one call for every strategy, from a single process to a Ray parameter server.

The strategy says how the work is spread (keiryo.parallel.config); the `TrainConfig` says what training is
(epochs, lr, device, precision, ...). Every strategy runs the same loop (`keiryo.loop.fit`).
"""

from __future__ import annotations

import math

from torch import nn

from keiryo.data import DataSplits, check_model_fits, load_data
from keiryo.errors import ConfigError
from keiryo.loop import EpochLog, LossFn, TrainConfig, TrainResult, classification_loss, fit
from keiryo.parallel import async_ps, launch
from keiryo.parallel.config import Async, Pipeline, Single, Strategy, strategy_of


def train(
    model: nn.Module,
    data: object,
    strategy: str | Strategy = "single",
    config: TrainConfig | None = None,
    *,
    workers: int | None = None,
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """Train `model` in place on `data` (anything `load_data` accepts) and return it with its history.

    `strategy`: "single" | "ddp" | "fsdp" | "pipeline" | "async", or a config (`DDP(workers=4)`,
    `Pipeline(split_points=[...])`, `Async(mode="bounded")`); `workers` sets the worker count of a named one.
    ddp, fsdp and pipeline start local processes, or join the torchrun job this process is part of; async
    trains on a Ray parameter server, `epochs` counting updates as epochs of the whole training split.
    `loss_fn(model, inputs, targets) -> (loss, outputs)`: None is classification/regression loss.
    """
    spec = strategy_of(strategy, workers)
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    loss_fn = loss_fn or classification_loss
    if isinstance(spec, Single):
        return fit(model, data, config, loss_fn=loss_fn)
    splits = data if isinstance(data, DataSplits) else load_data(data, seed=config.seed)
    if loss_fn is classification_loss:  # here, on the whole model, before any worker starts
        check_model_fits(model, splits)
    if isinstance(spec, Async):
        return _train_async(model, splits, spec, config, loss_fn)
    pipeline = {}
    if isinstance(spec, Pipeline):
        pipeline = {
            k: v
            for k, v in (
                ("split_points", spec.split_points),
                ("schedule", spec.schedule),
                ("microbatches", spec.microbatches),
            )
            if v is not None
        }
    return launch.train_parallel(
        model,
        splits,
        config,
        loss_fn,
        strategy=spec.kind,
        workers=spec.workers,
        timeout_s=spec.timeout,
        pipeline=pipeline,
    )


def _train_async(
    model: nn.Module, splits: DataSplits, spec: Async, config: TrainConfig, loss_fn: LossFn
) -> TrainResult:
    """The async strategy: `epochs` of updates on a Ray parameter server, history one line per epoch."""
    steps = math.ceil(len(splits.train) / config.batch_size)
    async_config = async_ps.AsyncConfig(
        workers=spec.workers,
        mode=spec.mode,
        staleness_bound=spec.staleness_bound,
        dc_lambda=spec.dc_lambda,
        lr=spec.lr if spec.lr is not None else config.lr,
        momentum=spec.momentum,
        batch_size=config.batch_size,
        max_updates=steps * config.epochs,
        time_limit=spec.time_limit,
        target_accuracy=spec.target_accuracy,
        eval_every=spec.eval_every,
        slowdown=spec.slowdown,
        on_failure=spec.on_failure,
        checkpoint=config.checkpoint,
        checkpoint_every=spec.checkpoint_every,
        resume=config.resume,
        ray_address=spec.ray_address,
        seed=config.seed,
        progress=config.progress,
    )
    result = async_ps.train_async(model, splits, async_config, loss_fn=loss_fn)
    history, last, used = [], 0.0, set()
    for epoch in range(1, config.epochs + 1):
        point = next((t for t in result.timeline if t["version"] >= epoch * steps), None)
        if point is None or id(point) in used:  # the driver checks every eval_every seconds, not every epoch
            continue
        used.add(id(point))
        history.append(
            EpochLog(epoch, point["loss"], None, None, point["val_accuracy"], point["seconds"] - last)
        )
        last = point["seconds"]
    return TrainResult(model=result.model, history=history)
