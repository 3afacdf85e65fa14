"""The one training loop: progress, evaluation each epoch, checkpoint and resume.

Every strategy and distillation reuse `fit`: they change the loss (`loss_fn`) or wrap the model, not the loop.
Resume is exact on CPU: epoch k always sees the same shuffle (the loader is seeded by seed and epoch), and the
checkpoint holds the model, the optimizer, the schedule, the RNG state and the position inside the epoch.
Nothing bad is trained on silently: options are checked when the config is made, the model is fed one sample
before any work, and a loss or weights that become NaN/inf stop the run before a checkpoint could keep them.
"""

from __future__ import annotations

import glob
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from keiryo import devices
from keiryo.data import DataSplits, check_model_fits, describe, load_data, make_loader
from keiryo.errors import ArtifactError, ConfigError, DataError, TrainingError
from keiryo.fileio import atomic_torch_save, safe_torch_load

LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]
"""(model, inputs, targets) -> (loss, outputs). Distillation and QAT pass their own."""

CHECKPOINT_FORMAT = "keiryo-checkpoint/1"


@dataclass
class TrainConfig:
    """Everything the loop needs to know; the defaults train the reference models on digits well."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float | None = None
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
        _whole("epochs", self.epochs, 1)
        _whole("batch size", self.batch_size, 1)
        _whole("checkpoint_every (steps; 0 checkpoints at epoch ends only)", self.checkpoint_every, 0)
        _whole("seed", self.seed, None)
        if not _finite(self.lr) or self.lr <= 0:
            raise ConfigError(f"learning rate must be a finite number > 0, got {self.lr}")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight decay must be a finite number ≥ 0, got {self.weight_decay}")
        if self.grad_clip is not None and (not _finite(self.grad_clip) or self.grad_clip <= 0):
            raise ConfigError(f"grad_clip must be a finite number > 0 (or None), got {self.grad_clip}")
        if self.resume and not self.checkpoint:
            raise ConfigError("resume needs a checkpoint file to resume from (--checkpoint)")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"unknown optimizer '{self.optimizer}' (choose adamw or sgd)")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"unknown schedule '{self.schedule}' (choose cosine or constant)")
        devices.check_precision(self.precision)


def _whole(name: str, value: object, least: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        raise ConfigError(
            f"{name} must be a whole number{f' ≥ {least}' if least is not None else ''}, got {value}"
        )


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    load_state_dicts: Callable[[nn.Module, torch.optim.Optimizer, dict, dict], None] | None = None  # fsdp

    def all_sum(self, *values: float, device: torch.device | None = None) -> list[float]:
        """Sum numbers over all workers (itself alone when there is one)."""
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist

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


def classification_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy for class targets, mean squared error for float (regression) targets."""
    outputs = model(inputs)
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
    for inputs, targets in make_loader(dataset, batch_size):
        inputs, targets = devices.move_batch(inputs, dev), devices.move_batch(targets, dev)
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


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def _save_checkpoint(path, worker, model, optimizer, scheduler, position, history):
    """Rank 0 writes the checkpoint; with sharded state every worker takes part in gathering it first.

    Weights that became NaN/inf stop the run instead (every worker decides alike), so the checkpoint on disk
    stays the last good one.
    """
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    (bad,) = worker.all_sum(float(sum(not bool(torch.isfinite(p.detach()).all()) for p in local)))
    if bad:
        kept = f"; checkpoint '{path}' keeps the last good weights" if Path(path).exists() else ""
        raise TrainingError(
            f"training diverged: the weights became NaN/inf by step {position[2]}; "
            f"lower the learning rate or set grad_clip{kept}"
        )
    if worker.state_dicts is not None:
        model_state, optimizer_state = worker.state_dicts(model, optimizer)
    else:
        model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    if worker.rank != 0:
        return
    epoch, step_in_epoch, global_step = position
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "history": [asdict(h) for h in history],
            "rng": torch.get_rng_state(),
        },
        path,
    )


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint safely (weights_only), checking that it is one."""
    ckpt = safe_torch_load(path, what="checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"checkpoint '{path}' is not a keiryo training checkpoint")
    return ckpt


def _remove_stale_temps(path: str) -> None:
    """Delete the temporary files (`.name.*.tmp`) a killed run's atomic save left beside the checkpoint."""
    target = Path(path)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def _resume_state(path: str | None, worker: Worker) -> dict | None:
    """The checkpoint to resume from, or None; rank 0 reads it and sends it to the others (whose disks may
    not hold it), so that every worker makes the same choice."""
    if worker.world_size == 1:
        return load_checkpoint(path) if path and Path(path).exists() else None
    import torch.distributed as dist

    box = [load_checkpoint(path) if worker.rank == 0 and path and Path(path).exists() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _restore(ckpt: dict, path: str, worker: Worker, model, optimizer, scheduler) -> None:
    try:
        if worker.load_state_dicts is not None:
            worker.load_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"])
        else:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"checkpoint '{path}' does not match this model: {first}") from exc
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])


def fit(
    model: nn.Module,
    data: DataSplits | object,
    config: TrainConfig | None = None,
    *,
    loss_fn: LossFn = classification_loss,
    worker: Worker | None = None,
) -> TrainResult:
    """Train `model` in place on `data` (anything `load_data` accepts) and return it with its history.

    Inside a multi-worker run `worker` says this process's rank and what the strategy wrapped; the loop is the
    same: only rank 0 prints and writes checkpoints, and the epoch figures are summed over all workers.
    """
    config = config or TrainConfig()
    config.validate()
    worker = worker or Worker()
    splits = data if isinstance(data, DataSplits) else load_data(data, seed=config.seed)
    if len(splits.train) == 0:
        raise DataError(f"{describe(splits)} has no training samples")
    device = devices.resolve_device(config.device)
    torch.manual_seed(config.seed)
    model.to(device)
    if worker.world_size == 1 and worker.step is None and loss_fn is classification_loss:
        check_model_fits(model, splits)  # other losses (distillation) feed the model their own way
    if config.checkpoint and worker.rank == 0:
        _remove_stale_temps(config.checkpoint)
    forward_model = worker.forward or devices.maybe_compile(model, config.compile)
    optimizer = _optimizer(model, config)
    steps_per_epoch = len(_global_batches(len(splits.train), config, 0, worker))
    scheduler = _scheduler(optimizer, config, steps_per_epoch * config.epochs)
    scaler = devices.grad_scaler(device, config.precision)

    history: list[EpochLog] = []
    start_epoch, skip_steps, global_step, resumed_from = 0, 0, 0, None
    ckpt = _resume_state(config.checkpoint, worker) if config.resume else None
    if ckpt is not None:
        _restore(ckpt, config.checkpoint, worker, model, optimizer, scheduler)
        start_epoch, skip_steps = ckpt["epoch"], ckpt["step_in_epoch"]
        global_step = resumed_from = ckpt["global_step"]
        history = [EpochLog(**h) for h in ckpt["history"]]
        if skip_steps >= steps_per_epoch:
            start_epoch, skip_steps = start_epoch + 1, 0

    progress = _Progress(config.progress and worker.rank == 0, config.epochs, steps_per_epoch)
    with progress:
        for epoch in range(start_epoch, config.epochs):
            model.train()
            started = time.perf_counter()
            loss_sum, correct, seen, has_acc = 0.0, 0, 0, True
            loader, batch_sizes = _epoch_loader(splits.train, config, epoch, worker, device)
            progress.start_epoch(epoch, completed=skip_steps)
            for step, (inputs, targets) in enumerate(loader):
                if step < skip_steps:
                    continue
                inputs, targets = devices.move_batch(inputs, device), devices.move_batch(targets, device)
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
                scheduler.step()
                global_step += 1
                if loss is not None:  # a pipeline's loss lives on its last stage only
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise _diverged(value, epoch, step, global_step, config)
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
                    position = (epoch, step + 1, global_step)
                    _save_checkpoint(
                        config.checkpoint, worker, model, optimizer, scheduler, position, history
                    )
            skip_steps = 0
            loss_sum, correct, seen = worker.all_sum(loss_sum, correct, seen, device=_reduce_device(device))
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
            history.append(log)
            progress.end_epoch(log, config.epochs)
            if config.checkpoint:
                position = (epoch + 1, 0, global_step)
                _save_checkpoint(config.checkpoint, worker, model, optimizer, scheduler, position, history)
    model.eval()
    return TrainResult(model=model, history=history, resumed_from=resumed_from)


def _diverged(value: float, epoch: int, step: int, global_step: int, config: TrainConfig) -> TrainingError:
    """The error for a NaN/inf loss: where it happened, what to try, and that the checkpoint was kept."""
    kept = ""
    if config.checkpoint and Path(config.checkpoint).exists():
        kept = f"; checkpoint '{config.checkpoint}' keeps the last good weights"
    return TrainingError(
        f"training diverged: the loss became {value} at epoch {epoch + 1}, step {step + 1} "
        f"(step {global_step} overall); lower the learning rate (now {config.lr:g}) or set grad_clip{kept}"
    )


def _global_batches(n: int, config: TrainConfig, epoch: int, worker: Worker) -> list[list[int]]:
    """The epoch's batches of sample indices in `make_loader`'s seeded order (the same on every worker)."""
    order = torch.tensor(list(make_loader(range(n), 1, shuffle=True, seed=config.seed, epoch=epoch).sampler))
    batches = [b.tolist() for b in order.split(config.batch_size)]
    return [b for b in batches if len(b) >= worker.min_batch]


def _epoch_loader(
    dataset: Dataset, config: TrainConfig, epoch: int, worker: Worker, device: torch.device
) -> tuple[DataLoader, list[int]]:
    """This worker's loader for one epoch, and the size of each whole (all-worker) batch.

    Data parallel workers each take a contiguous share of every batch: together they see exactly the batches
    one worker would, reshuffled per epoch. Pinned memory lets CUDA copies overlap with compute.
    """
    batches = _global_batches(len(dataset), config, epoch, worker)
    sizes = [len(b) for b in batches]
    if worker.shard_data and worker.world_size > 1:
        batches = [
            list(torch.tensor(b).tensor_split(worker.world_size)[worker.rank].tolist()) for b in batches
        ]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=0, pin_memory=device.type == "cuda")
    return loader, sizes


def _reduce_device(device: torch.device) -> torch.device:
    """NCCL sums CUDA tensors, gloo CPU ones."""
    return device if device.type == "cuda" else torch.device("cpu")


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
        loss * n if n else 0.0, (acc or 0.0) * n, n, device=_reduce_device(device)
    )
    return total_loss / max(count, 1), (total_correct / count if acc is not None and count else None)


class _Progress:
    """A rich progress bar with live loss/accuracy, and one summary line per epoch; silent when disabled."""

    def __init__(self, enabled: bool, epochs: int, steps: int) -> None:
        self.enabled, self.epochs, self.steps = enabled, epochs, steps
        self._bar = None
        self._task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                transient=True,
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start_epoch(self, epoch: int, completed: int = 0) -> None:
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(
                f"epoch {epoch + 1}/{self.epochs}", total=self.steps, completed=completed, stats=""
            )

    def step(self, loss: float, accuracy: float | None) -> None:
        if self._bar is not None:
            stats = f"loss {loss:.4f}" + (f"  acc {accuracy:.1%}" if accuracy is not None else "")
            self._bar.update(self._task, advance=1, stats=stats)

    def end_epoch(self, log: EpochLog, epochs: int) -> None:
        if self._bar is not None:
            parts = [f"epoch {log.epoch:>3}/{epochs}", f"loss {log.train_loss:.4f}"]
            if log.train_accuracy is not None:
                parts.append(f"acc {log.train_accuracy:.1%}")
            if log.val_accuracy is not None:
                parts.append(f"val acc {log.val_accuracy:.1%}")
            elif log.val_loss is not None:
                parts.append(f"val loss {log.val_loss:.4f}")
            parts.append(f"{log.seconds:.1f}s")
            self._bar.console.print("  ".join(parts))


STRATEGIES = ("single", "ddp", "fsdp", "pipeline", "async")


def train(
    model: nn.Module,
    data: object,
    *,
    strategy: str = "single",
    workers: int = 1,
    device: str = "auto",
    precision: str = "fp32",
    loss_fn: LossFn = classification_loss,
    timeout: float = 120.0,
    split_points: list[str] | None = None,
    pipeline_schedule: str | None = None,
    microbatches: int | None = None,
    async_options: dict | None = None,
    **options,
) -> TrainResult:
    """Train a model with a strategy; `options` are `TrainConfig` fields (epochs, lr, checkpoint, ...).

    ddp, fsdp and pipeline start `workers` local processes, or join the torchrun job this process is part of;
    a worker that fails or hangs stops the run within `timeout` seconds. `split_points` (module names),
    `pipeline_schedule` (gpipe | 1f1b) and `microbatches` shape the pipeline. async trains on a Ray
    parameter server with `workers` workers; `async_options` are `AsyncConfig` fields (mode, staleness_bound,
    slowdown, ray_address, ...), and `epochs` counts updates as epochs of the whole training split.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    unknown = set(options) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(
            f"unknown training option(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(TrainConfig.__dataclass_fields__)})"
        )
    config = TrainConfig(device=device, precision=precision, **options)
    pipeline = {
        k: v
        for k, v in (
            ("split_points", split_points),
            ("schedule", pipeline_schedule),
            ("microbatches", microbatches),
        )
        if v is not None
    }
    if strategy == "single":
        if workers != 1 or pipeline:
            extra = f"workers={workers}" if workers != 1 else ", ".join(pipeline)
            raise ConfigError(f"strategy 'single' runs one worker without pipeline options; got {extra}")
        return fit(model, data, config, loss_fn=loss_fn)
    if strategy != "async" and timeout <= 0:
        raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
    splits = data if isinstance(data, DataSplits) else load_data(data, seed=config.seed)
    if loss_fn is classification_loss:  # here, on the whole model, before any worker starts
        check_model_fits(model, splits)
    if strategy == "async":
        return _train_async(model, splits, config, loss_fn, workers, async_options or {})
    from keiryo.parallel.launch import train_parallel

    return train_parallel(
        model,
        splits,
        config,
        loss_fn,
        strategy=strategy,
        workers=workers,
        timeout_s=timeout,
        pipeline=pipeline,
    )


def _train_async(model, splits, config, loss_fn, workers, options) -> TrainResult:
    """The async strategy: `epochs` of updates on a Ray parameter server, history one line per epoch."""
    from keiryo.parallel.async_ps import AsyncConfig, train_async

    unknown = set(options) - set(AsyncConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown async option(s) {', '.join(sorted(unknown))}")
    steps = math.ceil(len(splits.train) / config.batch_size)
    async_config = AsyncConfig(
        workers=workers,
        lr=options.pop("lr", config.lr),
        batch_size=config.batch_size,
        max_updates=steps * config.epochs,
        checkpoint=config.checkpoint,
        resume=config.resume,
        seed=config.seed,
        progress=config.progress,
        **options,
    )
    result = train_async(model, splits, async_config, loss_fn=loss_fn)
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
