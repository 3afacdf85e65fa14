"""Model (pipeline) parallel: the model cut into stages, one per worker, fed micro-batches by a schedule.

`torch.distributed.pipelining` traces the model (torch.export) and cuts it before the modules named as split
points; each worker keeps one stage. GPipe runs all micro-batches forward then all backward; 1F1B
interleaves them so that fewer activations are alive at once. Both leave the same idle "bubble" at the start
and end of each step: (stages - 1) / (micro-batches + stages - 1) of the time; more micro-batches shrink it.

The stages' buffers have the shape of one micro-batch, so a short last batch is padded to the full size and
its padding marked so that it adds nothing to the loss: every sample trains, as in a single process.

Limits: the loss is the built-in one on the outputs (cross-entropy, or MSE for float targets); batch-norm
layers run as traced in training mode (padding takes part in their batch statistics); no checkpoints (the
stages' optimizer states live apart).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from keiryo.data import make_loader
from keiryo.errors import ConfigError
from keiryo.loop import Worker
from keiryo.parallel.config import Pipeline

DEFAULT_SCHEDULE = "1f1b"
DEFAULT_MICROBATCHES = 4


def microbatches_of(spec: Pipeline) -> int:
    """Micro-batches per batch: the config's, or 4."""
    return spec.microbatches or DEFAULT_MICROBATCHES


IGNORE = -100  # the class target of padding (cross-entropy's ignore_index); float targets use NaN


class BatchMeanLoss:
    """The loss the last stage computes per micro-batch (`classification_loss` on outputs: cross-entropy, or
    MSE for float targets), scaled so that the schedule's average over the
    micro-batches is the mean over the batch's real samples: padding (targets IGNORE or NaN) adds nothing.

    `samples` is set to the real batch size before each step.
    """

    def __init__(self, microbatches: int) -> None:
        self.microbatches, self.samples = microbatches, 1

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if targets.is_floating_point():
            real = ~torch.isnan(targets)
            diff = (outputs.float().reshape(targets.shape) - torch.where(real, targets, 0.0)) * real
            total = diff.pow(2).sum() / max(targets[0].numel(), 1)
        else:
            total = F.cross_entropy(outputs.float(), targets, ignore_index=IGNORE, reduction="sum")
        return total * self.microbatches / self.samples


def pad_batch(inputs: Tensor, targets: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Pad a short batch to `size`: copies of its first input, targets marked as padding."""
    missing = size - len(targets)
    if missing <= 0:
        return inputs, targets
    mark = float("nan") if targets.is_floating_point() else IGNORE
    pad = targets[:1].expand(missing, *targets.shape[1:]).clone().fill_(mark)
    return torch.cat([inputs, inputs[:1].expand(missing, *inputs.shape[1:])]), torch.cat([targets, pad])


def split_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Where the model may be cut, in registration order (taken as execution order): the children of the
    top-level containers (nn.Sequential / nn.ModuleList), and the other top-level children themselves."""
    units = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            units += [(f"{name}.{sub}", module) for sub, module in child.named_children()]
        else:
            units.append((name, child))
    return units


def balanced_split_points(model: nn.Module, stages: int) -> list[str]:
    """`stages - 1` split points that spread the parameters as evenly as the model's units allow.

    A point cuts before the unit that would take its stage further past its share (k/stages of the total) than
    the stage falls short without it; every stage keeps at least one unit.
    """
    units = split_units(model)
    if len(units) < stages:
        names = ", ".join(n for n, _ in units)
        raise ConfigError(
            f"pipeline: {stages} stages need {stages} units; the model has {len(units)} ({names})"
        )
    sizes = [sum(p.numel() for p in m.parameters()) for _, m in units]
    total, points, running = sum(sizes), [], 0
    for i, (name, _) in enumerate(units[1:], start=1):
        running += sizes[i - 1]
        k = len(points) + 1
        if k == stages:
            break
        target = k * total / stages
        if running + sizes[i] - target > target - running or len(units) - i == stages - k:
            points.append(name)
    return points


def apply_pipeline(
    model: nn.Module, example_batch: Tensor, device: torch.device, spec: Pipeline
) -> tuple[nn.Module, Worker, dict]:
    """Cut `model` into one stage per worker and return (this worker's stage module, its Worker, stage info).

    `example_batch` is one whole training batch; its micro-batch shape fixes the stage buffers. `spec` gives
    the split points (None: balanced), the schedule (None: 1f1b) and the micro-batches (None: 4).
    """
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline

    rank, world = dist.get_rank(), dist.get_world_size()
    schedule, microbatches = spec.schedule or DEFAULT_SCHEDULE, microbatches_of(spec)
    if len(example_batch) % microbatches:
        raise ConfigError(
            f"batch size {len(example_batch)} must split into {microbatches} equal micro-batches"
        )
    points = list(spec.split_points) if spec.split_points else balanced_split_points(model, world)
    known = {name for name, _ in model.named_modules()}
    unknown = [p for p in points if p not in known]
    if unknown:
        raise ConfigError(f"pipeline split point(s) {', '.join(unknown)} are not module names of the model")
    if len(points) != world - 1:
        raise ConfigError(
            f"pipeline: {len(points)} split point(s) make {len(points) + 1} stages for {world} workers"
        )
    micro = example_batch[: len(example_batch) // microbatches].to(device)
    pipe = pipeline(model.to(device), mb_args=(micro,), split_spec={p: SplitPoint.BEGINNING for p in points})
    stage = pipe.build_stage(rank, device)
    kind = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
    loss = BatchMeanLoss(microbatches)
    train_schedule = kind(stage, microbatches, loss_fn=loss)
    batch_size = len(example_batch)

    def step(inputs: Tensor, targets: Tensor) -> tuple[Tensor | None, Tensor | None]:
        samples, losses = len(targets), []
        inputs, targets = pad_batch(inputs, targets, batch_size)
        loss.samples = samples
        args = (inputs,) if stage.is_first else ()
        outputs = train_schedule.step(*args, target=targets if stage.is_last else None, losses=losses)
        if not stage.is_last:
            return None, None
        return torch.stack(losses).mean(), outputs[:samples]  # the mean over the batch's real samples

    worker = Worker(rank=rank, world_size=world, step=step)

    @torch.no_grad()
    def evaluate(dataset: Dataset) -> tuple[float, float | None]:
        """Forward-only passes over the whole set through the training schedule (a second schedule on the
        same stage would re-initialize its buffers and corrupt the next training step); a short last batch
        is padded, the padding ignored."""
        loss_sum, correct, count, has_acc = 0.0, 0, 0, True
        for inputs, targets in make_loader(dataset, batch_size):
            n, losses = len(targets), []
            inputs, padded = pad_batch(inputs, targets, batch_size)
            loss.samples = n
            args = (inputs.to(device),) if stage.is_first else ()
            last = stage.is_last
            outputs = train_schedule.eval(*args, target=padded.to(device) if last else None, losses=losses)
            if last:
                outputs, targets = outputs[:n], targets.to(device)
                loss_sum += float(torch.stack(losses).mean()) * n
                has_acc = has_acc and not targets.is_floating_point()
                correct += int((outputs.argmax(-1) == targets).sum()) if has_acc else 0
                count += n
        reduce_device = device if device.type == "cuda" else torch.device("cpu")
        loss_sum, correct, count = worker.all_sum(loss_sum, correct, count, device=reduce_device)
        flags = [None] * world
        dist.all_gather_object(flags, has_acc if stage.is_last else True)
        return loss_sum / max(count, 1), (correct / count if all(flags) and count else None)

    worker.evaluate = evaluate
    sizes = [None] * world
    dist.all_gather_object(sizes, sum(p.numel() * p.element_size() for p in stage.submod.parameters()))
    info = {
        "split_points": points,
        "schedule": schedule,
        "microbatches": microbatches,
        "stage_param_bytes": sizes,
        "bubble": (world - 1) / (microbatches + world - 1),
    }
    return stage.submod, worker, info


def gather_stages(stage_module: nn.Module) -> dict:
    """Every stage's state merged into one state dict (stages keep the original names), on every worker."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in stage_module.state_dict().items()})
    return {k: v for part in parts for k, v in part.items()}
