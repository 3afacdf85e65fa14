"""Structured pruning through torch-pruning's dependency graph: everything tied to a removed channel goes too.

One `BasePruner` per call, stepped `job.steps` times. Channels are scored by weight magnitude, batch-norm
scale, Taylor (loss gradients on a few batches) or activations (our hooks, on the example inputs or data).
Attention modules laid out like timm's (a `qkv` Linear and an int `num_heads`) lose whole heads.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import torch
from torch import nn

from keiryo import inputs as model_io
from keiryo.compress.distill import task_loss
from keiryo.compress.prune_checks import PRUNABLE, check_forward, failing_layer
from keiryo.compress.prune_transformers import is_transformer, prune_transformer
from keiryo.data import DataSplits, make_loader
from keiryo.errors import ConfigError, ModelError, one_line
from keiryo.loop import TrainConfig

TAYLOR_BATCHES = 4  # batches whose loss gradients score channels for "taylor"
GRAPH_SECONDS = 60.0  # torch-pruning's graph and grouping of one model: a 10M-parameter model takes seconds


@dataclass
class PruneJob:
    """What every pruning step needs besides the model and the ratio (built once by `prune`)."""

    example: model_io.Example
    protected: list[str]  # module names, so that they resolve in copies of the model too
    importance: str = "l2"
    global_pruning: bool = False
    splits: DataSplits | None = None
    steps: int = 1
    finetune: TrainConfig | None = None
    teacher: nn.Module | None = None
    activation_inputs: model_io.Example | None = None


def prune_structured(
    model: nn.Module,
    channel_ratio: float,
    job: PruneJob,
    after_step: Callable[[nn.Module], None] | None = None,
) -> None:
    """Build one torch-pruning pruner and step it `job.steps` times, calling `after_step` (fine-tuning).

    Hugging Face transformers are pruned from their own layout instead (`prune_transformers`): heads with
    their key/value groups and feed-forward width, in milliseconds, where a traced graph can take minutes.
    """
    if is_transformer(model):
        if job.global_pruning:
            raise ConfigError(
                "global_pruning is not available for Hugging Face transformer blocks: their config holds one "
                "head count and one feed-forward width for every block"
            )
        for step in range(1, job.steps + 1):
            before, after = 1 - channel_ratio * (step - 1) / job.steps, 1 - channel_ratio * step / job.steps
            prune_transformer(model, after / before, job.importance, job.protected)
            check_forward(model, job.example, "after pruning")
            if after_step is not None:
                after_step(model)
        return
    with time_bound(model, GRAPH_SECONDS):
        pruner = _pruner(model, channel_ratio, job)
    for _ in range(job.steps):
        if job.importance == "taylor":
            _accumulate_gradients(model, job.splits)
        if job.importance == "activation":
            _record_activations(model, job.activation_inputs)
        with time_bound(model, GRAPH_SECONDS):
            pruner.step()
        for module in model.modules():  # the scores' sizes are those before this step: never keep them
            if hasattr(module, "_importance"):
                del module._importance
        model.zero_grad(set_to_none=True)
        _sync_heads(model, pruner)
        check_forward(model, job.example, "after pruning")
        if after_step is not None:
            after_step(model)


def _pruner(model: nn.Module, channel_ratio: float, job: PruneJob):
    """A torch-pruning BasePruner; attention modules (a `qkv` Linear + int `num_heads`) lose whole heads."""
    import torch_pruning as tp

    heads = {m.qkv: m.num_heads for m in attention_modules(model)}
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
                forward_fn=model_io.call,
                output_transform=model_io.tensors,
            )
        except ModelError:
            raise
        except Exception as exc:
            layer = failing_layer(model, job.example)
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


class _Expired(BaseException):  # not Exception: no `except Exception` on the way may swallow it
    """Raised in the bounded thread by the watchdog (CPython sets an asynchronous exception by its class)."""


@contextmanager
def time_bound(model: nn.Module, seconds: float) -> Iterator[None]:
    """Stop torch-pruning after `seconds` with a one-line ModelError naming the layer it was grouping.

    Its dependency graph can take minutes, or loop, on some models (decoders with rotary embeddings and tied
    heads did); a hang is the worst answer. A watchdog thread raises in this thread at its next Python step
    (PyThreadState_SetAsyncExc), not a SIGALRM: a signal is delivered on whatever alternate signal stack a
    native library left registered, and after OpenVINO's NNCF and ExecuTorch had run in the same process that
    delivery crashed the interpreter (SIGSEGV in the demo's process).
    """
    names = {m: n for n, m in model.named_modules()}
    target = threading.get_ident()
    lock = threading.Lock()
    state: dict[str, object] = {"done": False, "where": None}

    def expire() -> None:
        with lock:
            if state["done"]:
                return
            state["where"] = _grouping(sys._current_frames().get(target), names)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(_Expired))

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except _Expired:
        raise ModelError(
            f"torch-pruning's dependency graph did not finish in {seconds:g} s{state['where'] or ''}; "
            "protect that layer (protect=[...]) or prune a smaller model"
        ) from None
    finally:
        with lock:
            state["done"] = True
        timer.cancel()
        if state["where"] is not None:  # fired as the work ended: drop an exception not yet raised
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)


def _grouping(frame: FrameType | None, names: dict[nn.Module, str]) -> str:
    """' at layer NAME (Type)': the layer whose group torch-pruning was collecting in `frame`'s stack."""
    while frame is not None:
        module = frame.f_locals.get("module") if frame.f_code.co_name == "get_pruning_group" else None
        if isinstance(module, nn.Module):
            return f" at layer '{names.get(module, '?')}' ({type(module).__name__})"
        frame = frame.f_back
    return ""


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules laid out like timm's Attention: a `qkv` Linear and an int `num_heads` that forward reads."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
    ]


def _sync_heads(model: nn.Module, pruner) -> None:
    """Tell each attention module how many heads torch-pruning left it (forward derives head_dim from it)."""
    for module in attention_modules(model):
        module.num_heads = int(pruner.num_heads.get(module.qkv, module.num_heads))


def _accumulate_gradients(model: nn.Module, splits: DataSplits) -> None:
    """Loss gradients over a few training batches, which Taylor importance multiplies with the weights."""
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()  # gradients without moving batch-norm statistics
    loader = make_loader(splits.train, 64, shuffle=True, seed=0)
    for i, batch in enumerate(loader):
        if i == TAYLOR_BATCHES:
            break
        inputs, targets = model_io.split_batch(batch)
        if targets is None:
            raise ConfigError("importance 'taylor' needs labelled data: the samples carry no targets")
        task_loss(model_io.forward(model, inputs), targets).backward()
    model.train(was_training)


@torch.no_grad()
def _record_activations(model: nn.Module, inputs: model_io.Example) -> None:
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

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, PRUNABLE)]
    was_training = model.training
    model.eval()
    try:
        model_io.call(model, inputs)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
