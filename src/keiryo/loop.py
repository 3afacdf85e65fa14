"""The one training loop: evaluation each epoch, early stopping with the best weights kept, checkpoint/resume.

Every strategy and distillation reuse `fit`: they change the loss (`loss_fn`) or wrap the model, not the loop.
The budget fits the data: unless `epochs` is given, small data sets train for at least `min_steps` optimizer
steps, and validation accuracy decides when to stop and which epoch's weights to keep.
Resume is exact on CPU: epoch k always sees the same shuffle (the loader is seeded by seed and epoch), and the
checkpoint holds the model, the optimizer, the schedule, the RNG state, the best epoch so far and the position
inside the epoch. Workers restarted after a failure (torchrun --max-restarts) resume from their job's last
checkpoint by themselves (see `keiryo.checkpoints`). Nothing bad is trained on silently: options are checked
when the config is made, the model is fed one sample before any work, and a loss or weights that become
NaN/inf stop the run before a checkpoint could keep them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from keiryo import checkpoints, devices
from keiryo.batches import epoch_batches, on_device, reduce_device, worker_loader
from keiryo.checkpoints import LoadStates, RunState, own_state, restore_run, save_run
from keiryo.data import check_model_fits, describe, make_loader
from keiryo.errors import ConfigError, DataError, TrainingError, check_whole, is_finite
from keiryo.holdout import split_for_training
from keiryo.inputs import Example, forward
from keiryo.progress import TrainingProgress, epoch_line

LossFn = Callable[[nn.Module, Example, Tensor], tuple[Tensor, Tensor]]
"""(model, inputs, targets) -> (loss, outputs). Distillation and QAT pass their own."""

DEFAULT_EPOCHS = 10


@dataclass
class TrainConfig:
    """Everything the loop needs to know; the defaults fit data sets from a few hundred samples up.

    `epochs` None: 10, or more on small data so that training takes at least `min_steps` optimizer steps.
    `validation`: the share held out of data passed as one source (stratified; 0 trains on all of it).
    `patience`: epochs without a better validation accuracy before stopping; the best epoch's weights are
    kept. None runs every epoch and keeps the last weights.
    """

    epochs: int | None = None
    min_steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float | None = None
    validation: float = 0.15
    patience: int | None = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16
    compile: bool = False
    checkpoint: str | None = None  # path; written at each epoch end and every `checkpoint_every` steps
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values that would fail later or train on garbage, in one line, before any work starts."""
        if self.epochs is not None:
            check_whole("epochs", self.epochs, 1)
        check_whole("min_steps", self.min_steps, 0)
        check_whole("batch size", self.batch_size, 1)
        check_whole("checkpoint_every (steps; 0 checkpoints at epoch ends only)", self.checkpoint_every, 0)
        check_whole("seed", self.seed, None)
        if self.patience is not None:
            check_whole("patience (epochs; None never stops early)", self.patience, 1)
        if not is_finite(self.lr) or self.lr <= 0:
            raise ConfigError(f"learning rate must be a finite number > 0, got {self.lr}")
        if not is_finite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight decay must be a finite number ≥ 0, got {self.weight_decay}")
        if self.grad_clip is not None and (not is_finite(self.grad_clip) or self.grad_clip <= 0):
            raise ConfigError(f"grad_clip must be a finite number > 0 (or None), got {self.grad_clip}")
        if not is_finite(self.validation) or not 0 <= self.validation < 1:
            raise ConfigError(f"validation must be a fraction in [0, 1), got {self.validation}")
        if self.resume and not self.checkpoint:
            raise ConfigError("resume needs a checkpoint file to resume from (--checkpoint)")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"unknown optimizer '{self.optimizer}' (choose adamw or sgd)")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"unknown schedule '{self.schedule}' (choose cosine or constant)")
        devices.check_precision(self.precision)

    @classmethod
    def from_dict(cls, options: Mapping[str, object]) -> TrainConfig:
        """A config from named options (a recipe's, a saved model's provenance); unknown names are refused."""
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"unknown training option(s) {', '.join(sorted(map(str, unknown)))} "
                f"(known: {', '.join(cls.__dataclass_fields__)})"
            )
        return cls(**options)

    def epochs_for(self, steps_per_epoch: int) -> int:
        """The epochs to run: `epochs` when given, else enough for `min_steps` steps (at least 10)."""
        if self.epochs is not None:
            return self.epochs
        return max(DEFAULT_EPOCHS, math.ceil(self.min_steps / max(steps_per_epoch, 1)))


@dataclass
class Worker:
    """How `fit` runs as one of several workers; `keiryo.parallel` fills it in, the default is a lone process.

    Data parallel shards each batch over the workers (`shard_data`); a pipeline gives every stage the whole
    batch and replaces forward+backward with `step`. The hooks are None when the plain path is right.
    """

    rank: int = 0
    world_size: int = 1
    forward: nn.Module | None = None  # the wrapper that trains (DDP); None: the model itself
    shard_data: bool = False  # each worker takes its share of every batch (ddp, fsdp)
    shard_eval: bool = False  # each worker evaluates its share of the validation set (ddp)
    min_batch: int = 1  # a last batch smaller than this is skipped (so every worker gets samples)
    step: Callable[[Tensor, Tensor], tuple[Tensor | None, Tensor | None]] | None = None  # pipeline
    evaluate: Callable[[Dataset], tuple[float, float | None]] | None = None  # pipeline
    state_dicts: Callable[[nn.Module, torch.optim.Optimizer], tuple[dict, dict]] | None = None  # fsdp
    load_state_dicts: LoadStates | None = None  # fsdp

    def all_sum(self, *values: float, device: torch.device | None = None) -> list[float]:
        """Sum numbers over all workers (itself alone when there is one)."""
        if self.world_size == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.tolist()


@dataclass
class EpochLog:
    """One line of training history."""

    epoch: int
    train_loss: float
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    seconds: float


@dataclass
class TrainResult:
    """The trained model (the same object that went in) and what happened."""

    model: nn.Module
    history: list[EpochLog] = field(default_factory=list)
    resumed_from: int | None = None  # global step of the checkpoint the run resumed from
    parallel: dict | None = None  # strategy, workers, per-worker memory, pipeline stages (multi-worker runs)
    best_epoch: int | None = None  # the epoch whose weights the model holds (None: the last, no validation)
    data: str | None = None  # how the data passed in was split, when keiryo split it


def classification_loss(model: nn.Module, inputs: Example, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy for class targets, mean squared error for float (regression) targets.

    `inputs` is a Tensor, a tuple of arguments or a dict of keyword arguments; a model returning a tuple,
    dict or `ModelOutput` is scored on its main output (`logits`, ...).
    """
    outputs = forward(model, inputs)
    if targets.is_floating_point():
        return F.mse_loss(outputs.float().reshape(targets.shape), targets), outputs
    return F.cross_entropy(outputs.float(), targets), outputs


def _correct(outputs: Tensor, targets: Tensor) -> int | None:
    if targets.is_floating_point():
        return None
    return int((outputs.argmax(dim=-1) == targets).sum())


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    loss_fn: LossFn = classification_loss,
) -> tuple[float, float | None]:
    """Mean loss and accuracy (None for regression) of a model on a data set, in eval mode."""
    dev = devices.resolve_device(device)
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    has_acc = True
    for batch in make_loader(dataset, batch_size):
        inputs, targets = on_device(batch, dev)
        with devices.autocast(dev, precision):
            loss, outputs = loss_fn(model, inputs, targets)
        total_loss += float(loss) * len(targets)
        c = _correct(outputs, targets)
        has_acc = has_acc and c is not None
        correct += c or 0
        count += len(targets)
    model.train(was_training)
    if count == 0:
        return math.nan, None
    return total_loss / count, (correct / count if has_acc else None)


def fit(
    model: nn.Module,
    data: object,
    config: TrainConfig | None = None,
    *,
    loss_fn: LossFn = classification_loss,
    worker: Worker | None = None,
) -> TrainResult:
    """Train `model` in place on `data` and return it with its history.

    `data`: a `DataSplits` used as it is, `{"train": ..., "validation": ...}`, or one source `load_data`
    accepts, of which `config.validation` is held out (the line saying so is printed and kept in the result).
    Inside a multi-worker run `worker` says this process's rank and what the strategy wrapped; the loop is the
    same: only rank 0 prints and writes checkpoints, and the epoch figures are summed over all workers.
    """
    config = config or TrainConfig()
    config.validate()
    worker = worker or Worker()
    splits, note = split_for_training(data, config.validation, config.seed)
    if len(splits.train) == 0:
        raise DataError(f"{describe(splits)} has no training samples")
    device = devices.resolve_device(config.device)
    torch.manual_seed(config.seed)
    model.to(device)
    if worker.world_size == 1 and worker.step is None and loss_fn is classification_loss:
        check_model_fits(model, splits)  # other losses (distillation) feed the model their own way
    if config.checkpoint and worker.rank == 0:
        checkpoints.remove_stale_temps(config.checkpoint)
    forward_model = worker.forward or devices.maybe_compile(model, config.compile)
    steps_per_epoch = len(
        epoch_batches(len(splits.train), config.batch_size, config.seed, 0, worker.min_batch)
    )
    epochs = config.epochs_for(steps_per_epoch)
    optimizer = make_optimizer(model, config)
    run = RunState(model, optimizer, make_scheduler(optimizer, config, steps_per_epoch * epochs), worker)
    scaler = devices.grad_scaler(device, config.precision)

    start_epoch, skip_steps, global_step, resumed_from = 0, 0, 0, None
    restart, ckpt = checkpoints.restart_count(), None
    if config.checkpoint and (config.resume or restart):  # a restart resumes from its own job's checkpoint
        job = None if config.resume else checkpoints.job_key()
        ckpt = checkpoints.resume_state(config.checkpoint, worker.rank, worker.world_size, job)
    if ckpt is not None:
        restore_run(ckpt, config.checkpoint, run)
        run.history = [EpochLog(**h) for h in ckpt["history"]]
        start_epoch, skip_steps = ckpt["epoch"], ckpt["step_in_epoch"]
        global_step = resumed_from = ckpt["global_step"]
        if skip_steps >= steps_per_epoch:
            start_epoch, skip_steps = start_epoch + 1, 0
        if run.stopped:
            start_epoch = epochs

    progress = TrainingProgress(config.progress and worker.rank == 0, epochs, steps_per_epoch)
    with progress:
        if note and ckpt is None:
            progress.line(note)
        if restart:
            progress.line(
                f"restart {restart}: resuming from step {global_step} of {config.checkpoint}"
                if ckpt is not None
                else f"restart {restart}: no checkpoint of this run yet; training from the start"
            )
        for epoch in range(start_epoch, epochs):
            model.train()
            started = time.perf_counter()
            loss_sum, correct, seen, has_acc = 0.0, 0, 0, True
            batches = epoch_batches(
                len(splits.train), config.batch_size, config.seed, epoch, worker.min_batch
            )
            batch_sizes = [len(b) for b in batches]
            shards = worker.world_size if worker.shard_data else 1
            loader = worker_loader(splits.train, batches, worker.rank, shards, device)
            progress.start_epoch(epoch, completed=skip_steps)
            for step, batch in enumerate(loader):
                if step < skip_steps:
                    continue
                inputs, targets = on_device(batch, device)
                optimizer.zero_grad(set_to_none=True)
                if worker.step is not None:  # pipeline: forward and backward of all micro-batches, all stages
                    with devices.autocast(device, config.precision):
                        loss, outputs = worker.step(inputs, targets)
                else:
                    with devices.autocast(device, config.precision):
                        loss, outputs = loss_fn(forward_model, inputs, targets)
                    # A worker's share of the batch weighs by its size, so that the gradients DDP/FSDP average
                    # over workers equal the whole batch's mean-loss gradient, even for an uneven last batch.
                    weight = (
                        len(targets) * worker.world_size / batch_sizes[step] if worker.shard_data else 1.0
                    )
                    weighted = loss if weight == 1.0 else loss * weight
                    if scaler is not None:
                        scaler.scale(weighted).backward()
                        scaler.unscale_(optimizer)
                    else:
                        weighted.backward()
                if config.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                run.scheduler.step()
                global_step += 1
                if loss is not None:  # a pipeline's loss lives on its last stage only
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise _diverged(value, (epoch, step, global_step), config)
                    loss_sum += value * len(targets)
                    c = _correct(outputs.detach(), targets)
                    has_acc = has_acc and c is not None
                    correct += c or 0
                    seen += len(targets)
                progress.step(loss_sum / max(seen, 1), correct / seen if has_acc and seen else None)
                if (
                    config.checkpoint
                    and config.checkpoint_every
                    and global_step % config.checkpoint_every == 0
                ):
                    save_run(config.checkpoint, run, (epoch, step + 1, global_step))
            skip_steps = 0
            loss_sum, correct, seen = worker.all_sum(loss_sum, correct, seen, device=reduce_device(device))
            val_loss, val_acc = (None, None)
            if len(splits.val):
                val_loss, val_acc = _evaluate_val(
                    forward_model, model, splits.val, device, config, worker, loss_fn
                )
            log = EpochLog(
                epoch=epoch + 1,
                train_loss=loss_sum / max(seen, 1),
                train_accuracy=(correct / seen) if (has_acc and seen) else None,
                val_loss=val_loss,
                val_accuracy=val_acc,
                seconds=time.perf_counter() - started,
            )
            run.history.append(log)
            progress.line(epoch_line(log, epochs))
            _track_best(run, log, config.patience)
            if config.checkpoint:
                save_run(config.checkpoint, run, (epoch + 1, 0, global_step))
            if run.stopped:
                progress.line(
                    f"stopped early after epoch {epoch + 1}: no better validation result for "
                    f"{config.patience} epochs"
                )
                break
        if run.best_weights is not None and run.best_epoch != len(run.history):
            model.load_state_dict(run.best_weights)
            progress.line(f"kept the weights of epoch {run.best_epoch}, the best on validation")
    model.eval()
    return TrainResult(model, run.history, resumed_from, best_epoch=run.best_epoch, data=note)


def _track_best(run: RunState, log: EpochLog, patience: int | None) -> None:
    """Keep this epoch's weights if they are the best on validation so far.

    Better means a higher validation accuracy, or the same accuracy with a lower loss (regression: lower
    loss). `patience` epochs without a better one stop the run.
    """
    if patience is None or log.val_loss is None or not math.isfinite(log.val_loss):
        return
    score = (-log.val_loss,) if log.val_accuracy is None else (log.val_accuracy, -log.val_loss)
    if run.best_score is None or score > run.best_score:
        run.best_epoch, run.best_score = log.epoch, score
        run.best_weights = own_state(run.model)
        return
    run.stopped = log.epoch - run.best_epoch >= patience


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `config` names, over the trainable parameters (the parameter server uses it too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule `config` names, over `total_steps` optimizer steps."""
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def _diverged(value: float, where: tuple[int, int, int], config: TrainConfig) -> TrainingError:
    """The error for a NaN/inf loss: where it happened, what to try, and that the checkpoint was kept."""
    epoch, step, global_step = where
    kept = ""
    if config.checkpoint and Path(config.checkpoint).exists():
        kept = f"; checkpoint '{config.checkpoint}' keeps the last good weights"
    return TrainingError(
        f"training diverged: the loss became {value} at epoch {epoch + 1}, step {step + 1} "
        f"(step {global_step} overall); lower the learning rate (now {config.lr:g}) or set grad_clip{kept}"
    )


def _evaluate_val(
    forward_model, model, dataset, device, config, worker, loss_fn
) -> tuple[float, float | None]:
    """Validation loss and accuracy over the whole set, whatever way the strategy splits the work."""
    if worker.evaluate is not None:
        return worker.evaluate(dataset)
    if not worker.shard_eval or worker.world_size == 1:  # fsdp: every worker runs every batch in lockstep
        return evaluate(forward_model, dataset, device=device, precision=config.precision, loss_fn=loss_fn)
    share = Subset(dataset, range(worker.rank, len(dataset), worker.world_size))
    loss, acc = evaluate(model, share, device=device, precision=config.precision, loss_fn=loss_fn)
    n = len(share)
    total_loss, total_correct, count = worker.all_sum(
        loss * n if n else 0.0, (acc or 0.0) * n, n, device=reduce_device(device)
    )
    return total_loss / max(count, 1), (total_correct / count if acc is not None and count else None)
