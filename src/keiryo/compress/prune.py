"""Pruning that removes what it prunes: structured (neurons, channels, heads) and unstructured (weights).

`prune(model, Structured(ratio=0.5))` cuts whole channels of Conv layers, neurons of Linear layers, and
attention heads and feed-forward width of transformer blocks, with every layer tied to them (batch-norm,
residual additions, concatenations) found by torch-pruning's dependency graph (`prune_graph`): the result is
a smaller dense model, and faster. `prune(model, Unstructured(ratio=0.8))` zeroes the smallest weights for
good (no masks left); dense kernels are not faster for it, but `keiryo.save` stores zero-heavy tensors
compactly, so the file shrinks with the sparsity.

Both can run one-shot or iteratively (`steps`: prune a little, fine-tune with `keiryo.loop.fit` under the
`finetune` TrainConfig, repeat), optionally distilling from the unpruned model while fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from keiryo import inputs as model_io
from keiryo.compress.distill import soft_target_loss
from keiryo.compress.prune_checks import PRUNABLE, check_model, example_for, protected_layers
from keiryo.compress.prune_config import PruneConfig, Structured, check_options, record
from keiryo.compress.prune_graph import PruneJob, prune_structured
from keiryo.compress.prune_target import channel_ratio_for, max_channel_ratio
from keiryo.data import DataSplits
from keiryo.errors import ConfigError, ModelError
from keiryo.holdout import split_for_training
from keiryo.loop import TrainConfig, classification_loss, fit
from keiryo.metrics import count_parameters
from keiryo.progress import TrainingProgress

ACTIVATION_SAMPLES = 256  # inputs whose activations score channels for "activation"


def prune(
    model: nn.Module,
    method: float | PruneConfig = 0.5,
    example_inputs: model_io.Example | None = None,
    data: object = None,
    finetune: TrainConfig | None = None,
    teacher: nn.Module | None = None,
) -> nn.Module:
    """A pruned copy of `model` (the input is left unchanged), in eval mode.

    `method`: a `Structured` or `Unstructured` config, or a float (= `Structured(ratio=that)`). The
    classifier (the last Linear/Conv to run) and the config's `protect` layers keep their outputs.
    `example_inputs` (a Tensor, a tuple of positional arguments or a dict of keyword arguments) trace the
    model; without them the first samples of `data` do. `data` also feeds Taylor/activation importance and
    fine-tuning: with `finetune`, each of the config's `steps` is followed by `finetune.epochs` epochs of the
    training loop on `data`, distilling from `teacher` when given.
    """
    check_model(model)
    config = check_options(method, finetune, has_data=data is not None, has_teacher=teacher is not None)
    splits = None if data is None else _splits(data, finetune)
    pruned = copy.deepcopy(model).cpu().eval()
    example = example_for(pruned, example_inputs, splits)
    importance = getattr(config, "importance", "l2")
    job = PruneJob(
        example=example,
        protected=protected_layers(model, pruned, example, config.protect),
        importance=importance,
        global_pruning=config.global_pruning,
        splits=splits,
        steps=config.steps,
        finetune=finetune,
        teacher=teacher,
        activation_inputs=(
            example_for(pruned, example_inputs, splits, ACTIVATION_SAMPLES, random_ok=False)
            if importance == "activation"
            else None
        ),
    )
    if isinstance(config, Structured):
        _prune_structured(pruned, config, job)
    else:
        _prune_unstructured(pruned, config.ratio, job)
    finetuned = dataclasses.asdict(finetune) if finetune is not None else None
    pruning = {**record(config, job.protected), "finetune": finetuned, "distilled": teacher is not None}
    pruned._keiryo_metadata = {**getattr(model, "_keiryo_metadata", {}), "pruning": pruning}
    return pruned.eval()


def max_ratio(
    model: nn.Module, example_inputs: model_io.Example, protect: Sequence[str | nn.Module] = ()
) -> float:
    """The largest channel ratio structured `prune` accepts for `model`: every layer keeps a channel (head).

    Cheap (one forward), so a caller trying several ratios can refuse an impossible one before any work.
    """
    copy_ = copy.deepcopy(model).cpu().eval()
    example = example_for(copy_, example_inputs, None)
    return max_channel_ratio(copy_, protected_layers(model, copy_, example, protect))


def _prune_structured(model: nn.Module, config: Structured, job: PruneJob) -> None:
    """Refuse a ratio that would empty a layer, find the channel ratio for the target, then prune."""
    limit = max_channel_ratio(model, job.protected)
    if config.target == "channels" and config.ratio > limit:
        raise ConfigError(
            f"ratio {config.ratio} would remove every channel or head of the narrowest layer, which "
            f"torch-pruning then leaves whole; use a ratio ≤ {limit:.3f}"
        )
    channel_ratio = (
        config.ratio
        if config.target == "channels"
        else channel_ratio_for(model, config.ratio, config.target, job, limit)
    )
    after_step = (lambda m: _finetune(m, job)) if job.finetune is not None else None
    prune_structured(model, channel_ratio, job, after_step)


# --- unstructured -------------------------------------------------------------------------------------------


def _prune_unstructured(model: nn.Module, ratio: float, job: PruneJob) -> None:
    """Zero the smallest-magnitude weights in `job.steps` linear increments of sparsity; zeros stay zeros."""
    weights = [
        m.weight for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n not in job.protected
    ]
    if not weights:
        raise ModelError(
            "nothing to prune: the model has no Linear/Conv weights outside the protected layers "
            f"({', '.join(job.protected)})"
        )
    for step in range(1, job.steps + 1):
        masks = magnitude_masks(weights, ratio * step / job.steps, job.global_pruning)
        _apply_masks(weights, masks)
        if job.finetune is not None:
            # Gradients of pruned weights are zeroed, so AdamW (fresh state each call) never revives them.
            hooks = [w.register_hook(lambda g, m=m: g * m) for w, m in zip(weights, masks, strict=True)]
            try:
                _finetune(model, job)
            finally:
                for hook in hooks:
                    hook.remove()
            _apply_masks(weights, masks)


@torch.no_grad()
def _apply_masks(weights: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    for weight, mask in zip(weights, masks, strict=True):
        weight.mul_(mask)


def magnitude_masks(weights: Sequence[Tensor], sparsity: float, global_pruning: bool = False) -> list[Tensor]:
    """0/1 masks dropping exactly round(sparsity × n) smallest |w|, per tensor or over all of them at once."""
    if not global_pruning:
        return [_smallest_mask(w.detach().abs().flatten(), sparsity).view_as(w) for w in weights]
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    masks = _smallest_mask(flat, sparsity).split([w.numel() for w in weights])
    return [m.view_as(w) for m, w in zip(masks, weights, strict=True)]


def _smallest_mask(scores: Tensor, sparsity: float) -> Tensor:
    mask = torch.ones_like(scores)
    k = round(sparsity * scores.numel())
    if k:
        mask[torch.topk(scores, k, largest=False).indices] = 0
    return mask


# --- shared helpers -----------------------------------------------------------------------------------------


def _finetune(model: nn.Module, job: PruneJob) -> None:
    """Fine-tune in place with the one training loop (`job.finetune`), distilling from `job.teacher`."""
    loss_fn = soft_target_loss(job.teacher.eval()) if job.teacher is not None else classification_loss
    fit(model, job.splits, copy.copy(job.finetune), loss_fn=loss_fn)
    model.zero_grad(set_to_none=True)
    model.cpu().eval()


def _splits(data: object, finetune: TrainConfig | None) -> DataSplits:
    """`data` split as the training loop splits it: a validation share for fine-tuning, none otherwise."""
    if finetune is None:
        return split_for_training(data, 0.0, 0)[0]
    splits, note = split_for_training(data, finetune.validation, finetune.seed)
    if note:  # said here, as the loop would: it receives the splits made here
        TrainingProgress(finetune.progress, 0, 0).line(note)
    return splits


def sparsity(model: nn.Module) -> float:
    """Fraction of the model's parameters that are exactly zero."""
    total, nonzero = count_parameters(model)
    return 1 - nonzero / total if total else 0.0


__all__ = ["magnitude_masks", "max_ratio", "prune", "sparsity"]
