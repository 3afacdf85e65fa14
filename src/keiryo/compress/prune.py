"""Pruning that removes what it prunes: structured (neurons, channels, heads) and unstructured (weights).

Structured pruning cuts whole channels of Conv layers, neurons of Linear layers, and attention heads and
feed-forward width of transformer blocks, with every layer tied to them (batch-norm, residual additions,
concatenations) found by torch-pruning's dependency graph: the result is a smaller dense model, and faster.
Unstructured pruning zeroes the smallest weights for good (no masks left); dense kernels are not faster for
it, but `keiryo.save` stores zero-heavy tensors compactly, so the file shrinks with the sparsity.

Both can run one-shot or iteratively (prune a little, fine-tune with `keiryo.loop.fit`, repeat), optionally
distilling from the unpruned model while fine-tuning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from keiryo.data import DataSplits, load_data, make_loader
from keiryo.errors import ConfigError, ModelError, one_line
from keiryo.loop import LossFn, TrainConfig, classification_loss, fit
from keiryo.metrics import batch_of, count_flops, count_parameters, time_models

IMPORTANCES = ("l1", "l2", "bn", "taylor", "activation")
TARGETS = ("channels", "params", "flops", "latency")
TAYLOR_BATCHES = 4  # batches whose loss gradients score channels for "taylor"
ACTIVATION_SAMPLES = 256  # inputs whose activations score channels for "activation"
_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass
class _Job:
    """What every pruning step needs besides the model and the ratio (internal; built once by `prune`)."""

    example: Tensor
    protected: list[str]  # module names, so that they resolve in copies of the model too
    importance: str = "l2"
    global_pruning: bool = False
    splits: DataSplits | None = None
    steps: int = 1
    finetune_epochs: int = 0
    finetune: TrainConfig | None = None
    teacher: nn.Module | None = None
    activation_inputs: Tensor | None = None


def prune(
    model: nn.Module,
    ratio: float = 0.5,
    structured: bool = True,
    example_inputs: Tensor | None = None,
    *,
    importance: str = "l2",
    target: str = "channels",
    global_pruning: bool = False,
    protect: Sequence[str | nn.Module] | None = None,
    data: object = None,
    iterative_steps: int = 1,
    finetune_epochs: int = 0,
    finetune: TrainConfig | None = None,
    teacher: nn.Module | None = None,
) -> nn.Module:
    """A pruned copy of `model` (the input is left unchanged), in eval mode.

    `ratio` is the fraction removed of `target`: "channels" (of each layer's channels/neurons/heads, or of
    all of them with `global_pruning`), "params", "flops", or "latency" (0.5 = a measured 2× speed-up at
    batch 64). Unstructured (`structured=False`) zeroes `ratio` of the Linear/Conv weights, per layer or
    globally. The classifier (the last Linear/Conv to run) and the layers in `protect` keep their outputs.
    `importance`: "l1"/"l2" weight magnitude, "bn" batch-norm scale, "taylor" (first-order, needs `data`),
    "activation" (summed |activation| into the layers that read each channel, on `example_inputs` or `data`).
    With `finetune_epochs`, each of the `iterative_steps` is followed by that many epochs on `data` (settings
    from `finetune`, a TrainConfig), distilling from `teacher` when given.
    """
    _check_model(model)
    check_options(
        ratio, structured, importance, target, iterative_steps, finetune_epochs,
        has_data=data is not None, has_teacher=teacher is not None,
    )  # fmt: skip
    splits = _splits(data)
    pruned = copy.deepcopy(model).cpu().eval()
    example = _example_inputs(pruned, example_inputs, splits)
    job = _Job(
        example=example,
        protected=_protected_layers(model, pruned, example, protect),
        importance=importance,
        global_pruning=global_pruning,
        splits=splits,
        steps=iterative_steps,
        finetune_epochs=finetune_epochs,
        finetune=finetune,
        teacher=teacher,
        activation_inputs=(
            _example_inputs(pruned, example_inputs, splits, ACTIVATION_SAMPLES, random_ok=False)
            if importance == "activation"
            else None
        ),
    )
    if structured:
        limit = _max_channel_ratio(pruned, job)
        if target == "channels" and ratio > limit:
            raise ConfigError(
                f"ratio {ratio} would remove every channel or head of the narrowest layer, which "
                f"torch-pruning then leaves whole; use a ratio ≤ {limit:.3f}"
            )
        channel_ratio = (
            ratio if target == "channels" else _channel_ratio_for(pruned, ratio, target, job, limit)
        )
        _prune_structured(pruned, channel_ratio, job)
    else:
        _prune_unstructured(pruned, ratio, job)
    _check_forward(pruned, example, "after pruning")
    record = dict(
        ratio=ratio, structured=structured, target=target, importance=importance, steps=iterative_steps
    )
    record.update(
        global_pruning=global_pruning, finetune_epochs=finetune_epochs, distilled=teacher is not None
    )
    pruned._keiryo_metadata = {**getattr(model, "_keiryo_metadata", {}), "pruning": record}
    return pruned.eval()


def max_ratio(
    model: nn.Module, example_inputs: Tensor, protect: Sequence[str | nn.Module] | None = None
) -> float:
    """The largest channel ratio structured `prune` accepts for `model`: every layer keeps a channel (head).

    Cheap (one forward), so a caller trying several ratios can refuse an impossible one before any work.
    """
    copy_ = copy.deepcopy(model).cpu().eval()
    example = example_inputs[:8].cpu()
    return _max_channel_ratio(copy_, _Job(example, _protected_layers(model, copy_, example, protect)))


# --- structured ---------------------------------------------------------------------------------------------


def _prune_structured(model: nn.Module, channel_ratio: float, job: _Job) -> None:
    """Build one torch-pruning pruner and step it `job.steps` times, fine-tuning after each step."""
    pruner = _pruner(model, channel_ratio, job)
    for _ in range(job.steps):
        if job.importance == "taylor":
            _accumulate_gradients(model, job.splits)
        if job.importance == "activation":
            _record_activations(model, job.activation_inputs)
        pruner.step()
        for module in model.modules():  # the scores' sizes are those before this step: never keep them
            if hasattr(module, "_importance"):
                del module._importance
        model.zero_grad(set_to_none=True)
        _sync_heads(model, pruner)
        _check_forward(model, job.example, "after pruning")
        if job.finetune_epochs:
            _finetune(model, job)


def _pruner(model: nn.Module, channel_ratio: float, job: _Job):
    """A torch-pruning BasePruner; attention modules (a `qkv` Linear + int `num_heads`) lose whole heads."""
    import torch_pruning as tp

    heads = {m.qkv: m.num_heads for m in _attention_modules(model)}
    ignored = [model.get_submodule(name) for name in job.protected]
    if heads:  # keep the transformer's width: every LayerNorm sits on the residual stream
        ignored += [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    if job.importance == "bn" and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        raise ConfigError(
            "importance 'bn' needs batch-norm layers, and the model has none (use l1, l2, taylor)"
        )
    scorer = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "bn": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.TaylorImportance(),
        "activation": lambda: tp.importance.ActivationImportance(),
    }[job.importance]()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        try:
            pruner = tp.pruner.BasePruner(
                model,
                job.example,
                scorer,
                global_pruning=job.global_pruning,
                pruning_ratio=channel_ratio,
                iterative_steps=job.steps,
                ignored_layers=ignored,
                num_heads=dict(heads),
                prune_num_heads=bool(heads),
                prune_head_dims=False,
                head_pruning_ratio=channel_ratio if heads else 0.0,
            )
        except Exception as exc:
            layer = _failing_layer(model, job.example)
            raise ModelError(f"torch-pruning cannot trace the model{layer}: {one_line(exc)}") from exc
    groups = pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    )
    if next(iter(groups), None) is None:
        raise ModelError(
            "nothing to prune: every Linear/Conv output is protected or tied to a protected layer "
            f"(protected: {', '.join(job.protected)})"
        )
    return pruner


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules laid out like timm's Attention: a `qkv` Linear and an int `num_heads` that forward reads."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
    ]


def _sync_heads(model: nn.Module, pruner) -> None:
    """Tell each attention module how many heads torch-pruning left it (forward derives head_dim from it)."""
    for module in _attention_modules(model):
        module.num_heads = int(pruner.num_heads.get(module.qkv, module.num_heads))


def _accumulate_gradients(model: nn.Module, splits: DataSplits) -> None:
    """Loss gradients over a few training batches, which Taylor importance multiplies with the weights."""
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()  # gradients without moving batch-norm statistics
    loader = make_loader(splits.train, 64, shuffle=True, seed=0)
    for i, (inputs, targets) in enumerate(loader):
        if i == TAYLOR_BATCHES:
            break
        loss, _ = classification_loss(model, inputs, targets)
        loss.backward()
    model.train(was_training)


@torch.no_grad()
def _record_activations(model: nn.Module, inputs: Tensor) -> None:
    """One forward on `inputs`, keeping on each Linear/Conv the summed |input| per input channel, which
    torch-pruning's ActivationImportance reads as `_importance` to score the channels those layers consume.

    Our hooks, not the library's: its own only cover Linear and Conv2d, and a Conv1d model would silently
    keep every channel. It needs no labels and no gradient, so it suits models scored against themselves
    (embeddings), where Taylor's gradient is 0.
    """

    def keep(module: nn.Module, args: tuple, output: object) -> None:
        x = args[0].abs()
        if isinstance(module, nn.Linear):
            module._importance = x.reshape(-1, x.shape[-1]).sum(0)
        else:  # (batch, channels, *spatial), averaged over all but the channels as the library does
            module._importance = x.transpose(0, 1).reshape(x.shape[1], -1).mean(1)

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, _PRUNABLE)]
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()


def _max_channel_ratio(model: nn.Module, job: _Job) -> float:
    """The largest channel ratio that leaves every prunable layer (and attention module) a channel (head)."""
    widths = [m.num_heads for m in _attention_modules(model)]
    for name, module in model.named_modules():
        if isinstance(module, _PRUNABLE) and name not in job.protected:
            widths.append(module.out_features if isinstance(module, nn.Linear) else module.out_channels)
    narrowest = min((w for w in widths if w > 1), default=None)  # 1-wide layers are never pruned
    return 1 - 1 / narrowest - 1e-6 if narrowest else 1 - 1e-6


def _channel_ratio_for(model: nn.Module, ratio: float, target: str, job: _Job, limit: float) -> float:
    """The channel ratio removing `ratio` of the params, FLOPs or measured latency (bisection on copies)."""
    if target == "params":
        base = count_parameters(model)[0]
        metric = lambda m: count_parameters(m)[0] / base  # noqa: E731
    elif target == "flops":
        base = count_flops(model, job.example)
        if not base:
            raise ModelError("cannot count the model's FLOPs, so target 'flops' is not available")
        metric = lambda m: count_flops(m, job.example) / base  # noqa: E731
    else:
        batch = batch_of(job.example, 64)
        metric = lambda m: _latency_ratio(m, model, batch)  # noqa: E731
    one_shot = replace(job, steps=1, finetune_epochs=0)

    def remaining(channel_ratio: float) -> float:
        trial = copy.deepcopy(model)
        _prune_structured(trial, channel_ratio, one_shot)
        return metric(trial)

    goal, low, high = 1 - ratio, 0.0, limit
    if remaining(high) > goal:
        raise ConfigError(
            f"cannot remove {ratio:.0%} of the {target}: at most {1 - remaining(high):.0%} with the "
            "protected layers kept (lower the ratio or protect less)"
        )
    for _ in range(7 if target == "latency" else 10):
        mid = (low + high) / 2
        low, high = (low, mid) if remaining(mid) <= goal else (mid, high)
    return high


def _latency_ratio(candidate: nn.Module, reference: nn.Module, batch: Tensor) -> float:
    """Candidate p50 / reference p50, timed interleaved in this process."""
    times = time_models({"reference": reference, "candidate": candidate}, batch, runs=20, warmup=5)
    return times["candidate"].p50_ms / times["reference"].p50_ms


# --- unstructured -------------------------------------------------------------------------------------------


def _prune_unstructured(model: nn.Module, ratio: float, job: _Job) -> None:
    """Zero the smallest-magnitude weights in `job.steps` linear increments of sparsity; zeros stay zeros."""
    weights = [
        m.weight for n, m in model.named_modules() if isinstance(m, _PRUNABLE) and n not in job.protected
    ]
    if not weights:
        raise ModelError(
            "nothing to prune: the model has no Linear/Conv weights outside the protected layers "
            f"({', '.join(job.protected)})"
        )
    for step in range(1, job.steps + 1):
        masks = magnitude_masks(weights, ratio * step / job.steps, job.global_pruning)
        _apply_masks(weights, masks)
        if job.finetune_epochs:
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


def _finetune(model: nn.Module, job: _Job) -> None:
    """Fine-tune in place with the one training loop, distilling from `job.teacher` when given."""
    config = copy.copy(job.finetune) if job.finetune else TrainConfig(lr=1e-3, progress=False, device="cpu")
    config.epochs = job.finetune_epochs
    loss_fn = _distill_loss(job.teacher) if job.teacher is not None else classification_loss
    fit(model, job.splits, config, loss_fn=loss_fn)
    model.zero_grad(set_to_none=True)
    model.cpu().eval()


def _distill_loss(teacher: nn.Module) -> LossFn:
    try:
        from keiryo.compress.distill import soft_target_loss
    except ImportError as exc:
        raise ConfigError(
            "a teacher needs keiryo.compress.distill, missing here; fine-tune without one"
        ) from exc
    return soft_target_loss(teacher.eval())


def check_options(
    ratio: float,
    structured: bool = True,
    importance: str = "l2",
    target: str = "channels",
    iterative_steps: int = 1,
    finetune_epochs: int = 0,
    *,
    has_data: bool = True,
    has_teacher: bool = False,
) -> None:
    """Reject, in one line and before any work, options `prune` cannot run with (the model aside)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ConfigError(f"pruning ratio must be between 0 and 1 (exclusive), got {ratio!r}")
    if importance not in IMPORTANCES:
        raise ConfigError(f"unknown importance '{importance}' (choose {', '.join(IMPORTANCES)})")
    if target not in TARGETS:
        raise ConfigError(f"unknown pruning target '{target}' (choose {', '.join(TARGETS)})")
    if not structured and (target not in ("channels", "params") or importance not in ("l1", "l2")):
        raise ConfigError(
            f"unstructured pruning zeroes the smallest weights; target '{target}' and importance "
            f"'{importance}' need structured pruning"
        )
    for what, value, least in (
        ("iterative_steps", iterative_steps, 1),
        ("finetune_epochs", finetune_epochs, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{what} must be a whole number ≥ {least}, got {value!r}")
    if not has_data:
        if importance == "taylor":
            raise ConfigError("importance 'taylor' needs data (a few batches of gradients); pass data=")
        if finetune_epochs:
            raise ConfigError("fine-tuning needs data; pass data= (e.g. 'digits')")
    if has_teacher and not finetune_epochs:
        raise ConfigError("a teacher is used while fine-tuning; set finetune_epochs ≥ 1")


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prune needs a torch.nn.Module, got a {type(model).__name__}")
    if getattr(model, "_keiryo_transforms", None):
        raise ConfigError(
            "this model was already quantized (or transformed otherwise): prune before quantizing"
        )


def _splits(data: object) -> DataSplits | None:
    return None if data is None else load_data(data)


def _example_inputs(
    model: nn.Module,
    example: Tensor | None,
    splits: DataSplits | None,
    count: int = 8,
    *,
    random_ok: bool = True,
) -> Tensor:
    """Up to `count` inputs: given ones, else from the data, else (`random_ok`, enough to trace with) random
    ones of the recorded input shape."""
    if example is not None:
        return example[:count].cpu()
    if splits is not None:
        from keiryo.data import example_inputs

        return example_inputs(splits, count)
    shape = getattr(model, "_keiryo_metadata", {}).get("input_shape")
    if not shape or not random_ok:
        why = "to score activations" if not random_ok else "to trace the model"
        raise ConfigError(f"pruning needs example inputs (or data) {why}; pass example_inputs=")
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))


def _protected_layers(
    original: nn.Module, pruned: nn.Module, example: Tensor, protect: Sequence[str | nn.Module] | None
) -> list[str]:
    """Names of the classifier (the last Linear/Conv to run: its outputs are the classes) and of `protect`."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: order.append(mod))
        for m in pruned.modules()
        if isinstance(m, _PRUNABLE)
    ]
    try:
        _check_forward(pruned, example, "on the example inputs")
    finally:
        for hook in hooks:
            hook.remove()
    names = {m: n for n, m in pruned.named_modules()}
    protected = [names[m] for m in order[-1:]]
    known = {m: n for n, m in original.named_modules()}
    layers = dict(original.named_modules())
    for item in protect or []:
        name = known.get(item) if isinstance(item, nn.Module) else item
        if name is None or name not in layers:
            listed = ", ".join(n for n, m in layers.items() if isinstance(m, _PRUNABLE))
            raise ConfigError(
                f"cannot protect layer {item!r}: the model has no such layer (layers: {listed})"
            )
        protected.append(name)
    return protected


def _check_forward(model: nn.Module, example: Tensor, when: str) -> None:
    """Run one forward; a failure becomes a ModelError that names the layer it happened in."""
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:
        raise ModelError(f"the model fails {when}{_failing_layer(model, example)}: {one_line(exc)}") from exc


def _failing_layer(model: nn.Module, example: Tensor) -> str:
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
            model(example)
    except Exception:
        failed = stack[-1:]
    finally:
        for handle in handles:
            handle.remove()
    if not failed:
        return ""
    name = names.get(failed[0]) or "(the model's own forward)"
    return f" in layer '{name}' ({type(failed[0]).__name__})"


def sparsity(model: nn.Module) -> float:
    """Fraction of the model's parameters that are exactly zero."""
    total, nonzero = count_parameters(model)
    return 1 - nonzero / total if total else 0.0


__all__ = ["IMPORTANCES", "TARGETS", "check_options", "magnitude_masks", "max_ratio", "prune", "sparsity"]
