"""Layer-by-layer calibration: what GPTQ and Wanda learn from a few windows of calibration text.

`run_layerwise` feeds calibration windows through the decoder one block at a time, as GPTQ and Wanda do:
hooks on each Linear of block i gather statistics of that Linear's inputs (GPTQ: the Hessian 2XXᵀ/n of the
layer-wise squared error; Wanda: each input feature's norm ‖X_j‖₂), a step changes the block's weights
(quantizes or prunes them), and the block is run again so that block i+1 is calibrated on the outputs of the
*compressed* block i — errors of earlier blocks are seen, and compensated, by later ones. Only one block's
activations are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from keiryo.errors import ConfigError
from keiryo.lm.load import decoder_layers

STATISTICS = ("hessian", "norm", "absmax")
Progress = Callable[[int], None] | None  # called with 1 after each decoder block
Windows = Tensor | None  # calibration token ids, (count, length)
Step = Callable[[int, nn.Module, dict[str, Tensor] | None], None]  # (block index, block, its statistics)
_REDUCE = {
    "hessian": lambda x: x.t() @ x,
    "norm": lambda x: (x * x).sum(0),
    "absmax": lambda x: x.abs().amax(0),
}


class _Captured(Exception):
    """Raised by the hook on the first block once it has seen its inputs: the rest of the model is skipped."""


def linearize(model: nn.Module) -> nn.Module:
    """Replace GPT-2-style `Conv1D` layers (weight stored (in, out)) by the equivalent `nn.Linear`, in place,
    so that every method sees one kind of layer."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            weight = module.weight.detach()
            linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias.detach())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The float `nn.Linear` layers inside one decoder block, by name."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, windows: Tensor, batch_size: int) -> tuple[list[Tensor], dict]:
    """The hidden states entering the first decoder block for each batch of `windows`, and the keyword
    arguments the model passed it (position embeddings, mask), which every block receives alike."""
    first = decoder_layers(model)[0]
    inputs: list[Tensor] = []
    kwargs: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kw: dict) -> None:
        hidden = args[0] if args else kw["hidden_states"]
        inputs.append(hidden.detach())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model(windows[start : start + batch_size], use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    for name in ("cache", "past_key_values", "layer_past"):  # calibration runs without a KV cache
        kwargs.pop(name, None)
    return inputs, kwargs


def check_batch_size(batch_size: object) -> None:
    """A calibration batch is a whole number ≥ 1 (ConfigError otherwise)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"calibration batch size must be a whole number ≥ 1, got {batch_size!r}")


def each_block(
    model: nn.Module, windows: Windows, step: Step, config: Any, progress: Progress = None
) -> None:
    """Walk the decoder blocks for a method `config` (which says its calibration `statistic` and
    `batch_size`): `run_layerwise` when it needs a statistic, else `step(i, block, None)` for each block
    (data-free methods: round-to-nearest, magnitude, unsmoothed W8A8)."""
    statistic = config.statistic
    if statistic is not None:
        if windows is None:
            raise ConfigError(f"this method needs calibration text (its '{statistic}' statistic)")
        run_layerwise(model, windows, step, Gather(statistic, config.batch_size), progress)
        return
    for index, block in enumerate(decoder_layers(model)):
        step(index, block, None)
        if progress is not None:
            progress(1)


@dataclass(frozen=True)
class Gather:
    """What `run_layerwise` gathers of each block: `statistic` of the Linears' inputs, over batches of
    `batch_size` windows, for every Linear of the block or only `layers(block)` (a step that reads a few of
    them spares the rest)."""

    statistic: str
    batch_size: int = 8
    layers: Callable[[nn.Module], list[nn.Module]] | None = None


def run_layerwise(
    model: nn.Module,
    windows: Tensor,
    step: Callable[[int, nn.Module, dict[str, Tensor]], None],
    gather: Gather,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Calibrate block by block: gather a statistic of the Linears' inputs in block i (`gather`) over all
    `windows` (token ids, (count, length)), call `step(i, block, stats)` to change the block's weights, then
    run the changed block to produce block i+1's inputs. `progress(1)` is called after each block."""
    statistic, batch_size, layers = gather.statistic, gather.batch_size, gather.layers
    if statistic not in STATISTICS:
        raise ConfigError(f"unknown calibration statistic '{statistic}' (choose {', '.join(STATISTICS)})")
    if windows.dim() != 2 or len(windows) == 0:
        raise ConfigError(
            f"calibration windows must be a (count, length) tensor of ids, got {tuple(windows.shape)}"
        )
    was_training = model.training
    model.eval()
    inputs, kwargs = capture_block_inputs(model, windows, batch_size)
    for index, block in enumerate(decoder_layers(model)):
        stats = gather_stats(block, inputs, kwargs, statistic, None if layers is None else layers(block))
        step(index, block, stats)
        with torch.inference_mode():
            inputs = [block_output(block(x, **kwargs)) for x in inputs]
        if progress is not None:
            progress(1)
    model.train(was_training)


def gather_stats(
    block: nn.Module, inputs: list[Tensor], kwargs: dict, statistic: str, only: list[nn.Module] | None = None
) -> dict[str, Tensor]:
    """Per Linear of `block`: the Hessian 2·XᵀX/n (hessian), the squared column norms ΣX_j² (norm) or the
    largest |X_j| of each input column (absmax, SmoothQuant's activation range).

    Layers that read the same tensor (q/k/v, gate/up) share one computation per batch. Sums are in float32:
    over a few thousand tokens per batch that is what GPTQ's reference implementation does too.
    """
    linears = block_linears(block)
    if only is not None:
        linears = {name: m for name, m in linears.items() if any(m is wanted for wanted in only)}
    stats: dict[str, Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(linears, 0)
    # this batch's statistic of each distinct input tensor, with the tensor itself: holding it keeps its
    # memory from being reused by a later tensor of the same shape, which would then look the same
    shared: dict[tuple, tuple[Tensor, Tensor]] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].detach().reshape(-1, module.in_features)
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            if key not in shared:
                x32 = x.float()
                shared[key] = (x, _REDUCE[statistic](x32))
            update = shared[key][1]
            if name not in stats:
                stats[name] = update.clone()
            else:
                stats[name] = (
                    torch.maximum(stats[name], update) if statistic == "absmax" else stats[name] + update
                )
            counts[name] += x.shape[0]

        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    try:
        with torch.inference_mode():
            for x in inputs:
                shared.clear()
                block(x, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if statistic == "hessian":
        return {name: 2.0 / max(counts[name], 1) * h for name, h in stats.items()}
    return stats


def block_output(output: Any) -> Tensor:
    """The hidden state a decoder block returned (some families return it alone, others first in a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.inference_mode()
def mean_loss(model: nn.Module, windows: Tensor, batch_size: int) -> float:
    """The model's mean next-token loss (nats) over `windows` ((count, length) ids), `batch_size` a pass."""
    total = 0.0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size]
        total += float(model(ids, labels=ids, use_cache=False).loss) * len(ids)
    return total / len(windows)
