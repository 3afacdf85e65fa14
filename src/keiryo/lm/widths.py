"""Feed-forward widths chosen block by block, by measuring what each block's narrowing costs the model.

Cutting every block's feed-forward layer to the same width treats all blocks alike, and they are not: on
SmolLM2-135M, the calibration loss rises 0.20 nats when block 0 alone is cut to a third of its width and
refit, 0.001-0.01 for most middle blocks, 0.06 for the last. So before pruning, each block is narrowed
alone (to `probe` neurons, ranked and refit as `prune.py` does, on the first `CURVE_TOKENS` calibration
tokens) and the whole model's loss measured on the next `PROBE_TOKENS` (on the refit's own tokens its error
looks smaller than it is, and the allocation came out worse). The cost at other widths follows the block's
own refit error curve (`refit.refit_errors`: the share of its output the refit cannot keep), scaled to the
measured cost. The neurons are then shared out greedily — each step of `multiple` neurons goes to the
block whose cost it lowers most per neuron — under the total the uniform width would keep, no block below
half of it. Proxies from the hidden states alone (the block's share of the residual stream, with or
without the next norm's gains) gave worse allocations than the uniform one; the measured loss gave better
(BENCHMARKS.md). OWL (Yin et al. 2024) and FLAP (An et al. 2024) also give layers different sparsities.

Blocks keep different widths, which a Hugging Face config cannot say: such a model saves as a keiryo LM file
or GGUF (whose feed_forward_length is then one per block, which llama.cpp reads), not as a folder.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from keiryo.compress.prune_transformers import feed_forwards, keep_neurons, kept_count
from keiryo.errors import ConfigError
from keiryo.lm.calibrate import block_output, capture_block_inputs, gather_stats, mean_loss
from keiryo.lm.load import decoder_layers
from keiryo.lm.refit import column_scores, refit_columns, refit_errors
from keiryo.progress import counting

CURVE_TOKENS = 8192  # the first calibration tokens: their XᵀX gives each block's refit error curve
PROBE_TOKENS = 2048  # the next ones: the model's loss, each block narrowed alone, is measured on them (on the
# tokens the refit was solved on, its error would look smaller than it is)
STEPS = 24  # candidate widths per block, at most


def candidate_widths(width: int, keep: float, multiple: int) -> list[int]:
    """The widths a block of `width` neurons may keep when `keep` of them stay on average (the uniform
    count, `kept_count`): from half that count up to `width`, in at most `STEPS` equal steps of a multiple
    of `multiple`."""
    uniform = kept_count(width, keep, multiple)
    floor = min(uniform, max(multiple, multiple * round(uniform / 2 / multiple)))
    step = multiple * max(1, math.ceil((width - floor) / STEPS / multiple))
    return list(range(floor, width + 1, step))


def allocate(costs: list[list[float]], widths: list[int], budget: int) -> list[int]:
    """Each block's width from `widths` (ascending; `costs[i][j]`: block i's cost at `widths[j]`, falling
    with j), all starting at the narrowest, adding one step at a time to the block whose cost falls most per
    neuron added, while the total stays within `budget` neurons."""
    chosen = [0] * len(costs)
    left = budget - widths[0] * len(costs)
    if left < 0:
        raise ConfigError(f"{len(costs)} blocks of at least {widths[0]} neurons exceed {budget}")
    while True:
        best, gain = None, -math.inf
        for i, j in enumerate(chosen):
            if j + 1 < len(widths) and widths[j + 1] - widths[j] <= left:
                per_neuron = (costs[i][j] - costs[i][j + 1]) / (widths[j + 1] - widths[j])
                if per_neuron > gain:
                    best, gain = i, per_neuron
        if best is None:
            return [widths[j] for j in chosen]
        left -= widths[chosen[best] + 1] - widths[chosen[best]]
        chosen[best] += 1


@torch.inference_mode()
def measured_widths(
    model: nn.Module, windows: Tensor, keep: float, multiple: int, batch_size: int, progress: bool
) -> list[int]:
    """The feed-forward width each decoder block of `model` keeps so that, together, they keep what `keep`
    of every block (moved to `multiple`) would, placed where the model's loss on calibration `windows`
    ((count, length) ids) says the neurons matter most (see the module's docstring)."""
    blocks = decoder_layers(model)
    ffns = [feed_forwards(block) for block in blocks]
    if any(len(found) != 1 for found in ffns):
        raise ConfigError("measured widths need exactly one feed-forward layer in every decoder block")
    sizes = {ffn[0].down.in_features for ffn in ffns}
    if len(sizes) != 1:
        raise ConfigError(f"measured widths start from blocks of one width, not {sorted(sizes)}")
    width = sizes.pop()
    widths = candidate_widths(width, keep, multiple)
    probe = min(widths, key=lambda w: abs(w - 2 * kept_count(width, keep, multiple) / 3))
    length = windows.shape[1]
    count, probed = max(1, CURVE_TOKENS // length), max(1, PROBE_TOKENS // length)
    curve = windows[:count]
    held = windows[count : count + probed]
    if len(held) == 0:  # too little calibration text to keep the two apart
        held = curve[-probed:]
    was_training = model.training
    model.eval()
    inputs, kwargs = capture_block_inputs(model, curve, batch_size)
    states, held_kwargs = capture_block_inputs(model, held, batch_size)
    batches = [held[i : i + batch_size] for i in range(0, len(held), batch_size)]
    base = mean_loss(model, held, batch_size)
    costs = []
    with counting("measuring each block's cost of narrowing", len(blocks), progress) as advance:
        for index, block in enumerate(blocks):
            down = ffns[index][0].down
            outputs: list[Any] = []  # the block's outputs, kept as XᵀX is gathered (one pass, not two)
            handle = block.register_forward_hook(lambda module, args, out, kept=outputs: kept.append(out))
            try:
                hessian = next(iter(gather_stats(block, inputs, kwargs, "hessian", [down]).values()))
            finally:
                handle.remove()
            tuples = isinstance(outputs[0], (tuple, list))
            inputs = [block_output(out) for out in outputs]
            errors = refit_errors(down, hessian, widths)
            narrow = copy.deepcopy(block)
            (ffn,) = feed_forwards(narrow)
            weight = ffn.down.weight.detach()
            kept = keep_neurons(ffn, probe, column_scores(ffn.down, hessian, True))
            refit_columns(ffn.down, weight, hessian, kept)
            cost = _loss_from(model, index, narrow, states, batches, tuples) - base
            scale = max(cost, 1e-6) / max(errors[widths.index(probe)], 1e-12)
            costs.append([scale * e for e in errors])
            states = [block_output(block(x, **held_kwargs)) for x in states]
            advance(1)
    model.train(was_training)
    return allocate(costs, widths, kept_count(width, keep, multiple) * len(blocks))


def _loss_from(
    model: nn.Module, index: int, block: nn.Module, states: list[Tensor], batches: list[Tensor], tuples: bool
) -> float:
    """The model's loss with decoder block `index` replaced by `block`, run from the unpruned model's
    hidden `states` entering it (one per batch): the blocks before it are skipped (returning a tuple where
    the family's blocks do, `tuples`), not run again."""
    layers = decoder_layers(model)
    saved = list(layers)
    current: list[Tensor] = []

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (current[0], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": current[0]}

    handle = block.register_forward_pre_hook(enter, with_kwargs=True)
    try:
        for i in range(index):
            layers[i] = _Skip(tuples)
        layers[index] = block
        total = 0.0
        for state, ids in zip(states, batches, strict=True):
            current[:] = [state]
            total += float(model(ids, labels=ids, use_cache=False).loss) * len(ids)
        return total / sum(len(ids) for ids in batches)
    finally:
        handle.remove()
        for i, original in enumerate(saved[: index + 1]):
            layers[i] = original


class _Skip(nn.Module):
    """A decoder block that is not run: it hands its input on (replaced at the next block), alone or first
    in a tuple as the family's blocks return theirs."""

    def __init__(self, tuples: bool) -> None:
        super().__init__()
        self.tuples = tuples

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if self.tuples else hidden_states
