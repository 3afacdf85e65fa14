"""Local reconstruction after structured pruning: the surviving blocks next to each gap learn to do the
removed blocks' work (and narrowed blocks their unpruned selves' work), from the unpruned model's hidden
states on calibration text.

A removed block takes its update to the residual stream away from every token; the blocks around the gap
are the cheapest place to put it back. For each run of removed blocks, a *segment* is the surviving blocks
within `around` of it (runs whose segments touch share one). Before anything is removed the unpruned model
runs once over the calibration windows and keeps the hidden states entering and leaving every segment; after
pruning, each segment alone is trained (keiryo's loop: AdamW, cosine schedule, progress bar) to take the
entering state to the leaving one, by the squared error relative to the target's size, per token (an
LLM's hidden states carry a few huge dimensions and tokens; the relative error lets every token count).
Only a few blocks run forward and backward — not the whole model and its vocabulary-sized head — so it
sees several times more text per second than logits distillation (`distill`). LLM-Streamline (Chen et al.
2024) trains a light replacement for the removed layers on the same objective; BRECQ (Li et al. 2021)
reconstructs block outputs after quantization. Width pruning (fewer heads or neurons) changes every
block: its segments are then runs of `around` blocks that cover the model.

On SmolLM2-135M minus 8 of 30 blocks (benchmarks/llm_structured.py on 2 cores) it brings held-out perplexity
from +163% to +31.0% of the unpruned model's in 8.2 minutes; 150 steps of logits distillation, on the same
machine, bring it to +39.9% in 15.4.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from keiryo import devices
from keiryo.data import DataSplits
from keiryo.errors import ConfigError, check_whole, is_finite
from keiryo.lm.calibrate import block_output, capture_block_inputs
from keiryo.lm.distill import fit_config
from keiryo.lm.load import decoder_layers
from keiryo.loop import fit
from keiryo.progress import counting, say


@dataclass
class Reconstruct:
    """How the blocks around removed ones are retrained: the surviving blocks within `around` of each removed
    run, `epochs` passes over the calibration windows, `batch_size` windows per AdamW step at learning rate
    `lr`, matrix products in `precision` ("bf16": faster on CPUs with bf16 units; the kept hidden states are
    then bf16 too, half the memory)."""

    epochs: int = 1
    around: int = 3
    lr: float = 3e-4
    batch_size: int = 4
    precision: str = "fp32"
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_whole("reconstruction epochs", self.epochs, 1)
        check_whole("blocks around each removed run (around)", self.around, 1)
        check_whole("reconstruction batch size", self.batch_size, 1)
        devices.check_precision(self.precision)
        if not is_finite(self.lr) or self.lr <= 0:
            raise ConfigError(f"reconstruction learning rate must be a finite number > 0, got {self.lr}")


def segments(count: int, removed: list[int], around: int, every: bool = False) -> list[tuple[int, int]]:
    """The (first, last) block indices, inclusive, of each segment: every removed run widened by `around`
    blocks on each side (within the model's `count`), overlapping or touching ones merged. With `every`
    (width pruning changed every block): consecutive runs of `around` surviving blocks that cover the model,
    each removed block inside the run it falls in."""
    gone = set(removed)
    spans: list[tuple[int, int]] = []
    if every:
        lo, kept = 0, 0
        for index in range(count):
            kept += index not in gone
            if kept == around:
                spans.append((lo, index))
                lo, kept = index + 1, 0
        if lo < count:  # the last, shorter run; removed blocks alone at the end join the run before
            spans.append((lo, count - 1) if kept or not spans else (spans.pop()[0], count - 1))
        return spans
    for index in sorted(gone):
        lo, hi = max(0, index - around), min(count - 1, index + around)
        if spans and lo <= spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    return spans


class Segment(nn.Module):
    """Some of a model's decoder blocks (the same modules, not copies) run one after the other on a hidden
    state, with the keyword arguments (position embeddings, mask) the model gives every block; the residual
    stream in `dtype` between blocks, as the model keeps it."""

    def __init__(
        self, blocks: list[nn.Module], kwargs: dict[str, Any], batch: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.kwargs, self.batch, self.dtype = kwargs, batch, dtype

    def forward(self, hidden: Tensor) -> Tensor:
        return run_blocks(self.blocks, hidden.to(self.dtype), _rows(self.kwargs, self.batch, len(hidden)))


def run_blocks(blocks: list[nn.Module] | nn.ModuleList, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """`hidden` through `blocks` in order, each output cast back to the input's dtype (under autocast a block
    may return bf16; the model's residual stream stays in its own dtype)."""
    dtype = hidden.dtype
    for block in blocks:
        hidden = block_output(block(hidden, **kwargs)).to(dtype)
    return hidden


def relative_error(model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The loop's loss: mean over tokens of ‖output − target‖² / ‖target‖²."""
    out = model(inputs).float()
    target = targets.float()
    error = (out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)
    return error.mean(), out.detach()


@dataclass
class Targets:
    """What the unpruned model did, kept before anything is pruned: its hidden states entering and leaving
    each segment (`states[lo]`, `states[hi + 1]`), the blocks' keyword arguments, and the blocks themselves
    (the same modules, which pruning narrows in place)."""

    spans: list[tuple[int, int]]
    removed: set[int]
    blocks: list[nn.Module]
    states: dict[int, Tensor]
    kwargs: dict[str, Any]
    batch: int
    dtype: torch.dtype


def record_targets(
    model: nn.Module, removed: list[int], windows: Tensor, config: Reconstruct, every: bool = False
) -> Targets:
    """Run the unpruned `model` once over `windows` (token ids, (count, length)) and keep what
    `retrain` needs: the segments around blocks `removed` (`every`: runs covering all blocks, for width
    pruning) and the hidden states at their boundaries."""
    if windows is None or windows.dim() != 2 or len(windows) == 0:
        raise ConfigError("reconstruction needs calibration text: token ids, (count, length)")
    blocks = list(decoder_layers(model))
    spans = segments(len(blocks), removed, config.around, every)
    for lo, hi in spans:
        if all(i in removed for i in range(lo, hi + 1)):
            raise ConfigError(f"no block left between {lo} and {hi} to reconstruct with: raise `around`")
    states, kwargs, batch, dtype = _boundary_states(model, windows, spans, config)
    return Targets(spans, set(removed), blocks, states, kwargs, batch, dtype)


def retrain(targets: Targets, config: Reconstruct) -> list[float]:
    """Train the surviving blocks of each segment in place (after pruning) to map the unpruned model's
    hidden state entering the segment to the one it had leaving it. Returns each segment's final epoch's
    mean loss."""
    states, gone = targets.states, targets.removed
    # train where the model is (its blocks' arguments and the states are there), not on the loop's choice
    train = replace(fit_config(config, config.epochs), device=str(states[targets.spans[0][0]].device))
    losses = []
    for lo, hi in targets.spans:
        kept = [targets.blocks[i] for i in range(lo, hi + 1) if i not in gone]
        modes = [block.training for block in kept]
        if config.progress:
            without = ", ".join(str(i) for i in range(lo, hi + 1) if i in gone)
            say(
                f"retraining blocks {lo}-{hi}" + (f" without {without}" if without else "")
                + f": {len(kept)} blocks, {len(states[lo])} windows"
            )  # fmt: skip
        segment = Segment(kept, targets.kwargs, targets.batch, targets.dtype)
        data = TensorDataset(states[lo], states[hi + 1])
        empty = TensorDataset(states[lo][:0], states[hi + 1][:0])
        splits = DataSplits(data, empty, empty, None, tuple(states[lo].shape[1:]), f"blocks {lo}-{hi}")
        with torch.inference_mode(False), torch.enable_grad():
            result = fit(segment, splits, train, loss_fn=relative_error)
        losses.append(result.history[-1].train_loss)
        for block, mode in zip(kept, modes, strict=True):
            block.train(mode)
            for parameter in block.parameters():
                parameter.grad = None  # the last step's gradients: a float copy of every trained weight
        states.pop(lo, None)  # done with; the leaving state may be the next segment's entering one
        if hi + 1 not in {first for first, _ in targets.spans}:
            states.pop(hi + 1, None)
    return losses


@torch.inference_mode()
def _boundary_states(
    model: nn.Module, windows: Tensor, spans: list[tuple[int, int]], config: Reconstruct
) -> tuple[dict[int, Tensor], dict[str, Any], int]:
    """The unpruned model's hidden states entering each segment and leaving it (index hi + 1), for every
    window; the blocks' keyword arguments (as ordinary tensors, which autograd can save), their batch and
    the residual stream's dtype."""
    blocks = decoder_layers(model)
    wanted = {lo for lo, _ in spans} | {hi + 1 for _, hi in spans}
    last = max(wanted)
    was_training = model.training
    model.eval()
    inputs, kwargs = capture_block_inputs(model, windows, config.batch_size)
    dtype, device, batch = inputs[0].dtype, inputs[0].device, len(inputs[0])
    keep = torch.bfloat16 if config.precision == "bf16" else dtype
    parts: dict[int, list[Tensor]] = {i: [] for i in wanted}
    with counting("the unpruned model's hidden states (windows)", len(windows), config.progress) as advance:
        for hidden in inputs:
            rows = _rows(kwargs, batch, len(hidden))
            for index in range(last + 1):
                if index in parts:
                    parts[index].append(hidden.to(keep))
                if index < last:
                    with devices.autocast(device, config.precision):
                        hidden = run_blocks([blocks[index]], hidden, rows)
            advance(len(hidden))
    model.train(was_training)
    states = {i: torch.cat(p) for i, p in parts.items()}
    return states, _ordinary(kwargs), batch, dtype


def _ordinary(value: Any) -> Any:
    """A copy of `value`'s tensors made outside inference mode (inference tensors cannot join autograd)."""
    with torch.inference_mode(False):
        if isinstance(value, Tensor):
            return value.clone()
        if isinstance(value, dict):
            return {k: _ordinary(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(_ordinary(v) for v in value)
        return value


def _rows(value: Any, batch: int, rows: int) -> Any:
    """`value`'s per-window tensors (masks: 2 or more dimensions, the first `batch`, as captured) cut to a
    smaller last batch; shared ones (position embeddings, first dimension 1; positions, 1-D) stay whole."""
    if rows == batch:
        return value
    if isinstance(value, Tensor):
        return value[:rows] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _rows(v, batch, rows) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, batch, rows) for v in value)
    return value
