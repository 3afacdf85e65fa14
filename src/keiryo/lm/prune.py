"""Structured pruning of a causal LM: whole key/value groups of heads, feed-forward width and whole blocks.

Unlike 50% or 2:4 sparsity (`sparsity.py`), what goes is really gone: the matrices get smaller, the config
says the new shape (so the model saves, reloads and generates as a smaller model of its family) and every
decode step does less work. As in Minitron (Muralidharan et al. 2024):

- width (`heads`, `ffn`): heads are ranked by the size of their attention output on calibration text
  (Σ over tokens of ‖head output‖², the input of the output projection), feed-forward neurons by the size
  of their activation (Σ a², the input of the down projection); key/value groups go whole, with the query
  heads that read them (scores summed over the group). Blocks are pruned one after the other, each
  measured on the outputs of the already-pruned blocks before it (`calibrate.run_layerwise`).
  `importance="l1"|"l2"` ranks by weight norms instead, for comparison (Torch-Pruning's default).
  With `refit`, the layers that read the pruned heads and neurons (the attention's output projection, the
  down projection) are re-solved by least squares on calibration text, so that each block's output stays
  as close as it can to what it was (the compensation of FLAP and SlimGPT, in closed form from XᵀX); heads
  and neurons are then ranked by the energy they put into that output, ‖x_j‖²·‖w_j‖²;
- depth (`layers`): the blocks that change their input least go, by ShortGPT's block importance
  1 − mean cos(block input, block output) over calibration tokens (the first `IMPORTANCE_TOKENS` of them:
  the ranking settles on far fewer), measured once on the unpruned model.

With `reconstruct`, the unpruned model's hidden states are kept first; after pruning, the blocks around each
gap (and with width pruning, every block) are retrained to give them back (`reconstruct.py`, on all the
text; width is ranked and refit on its first `WIDTH_TOKENS`).

Depth goes first (it is measured on the whole model), then width. Pruned models lose quality in a way
weight quantization does not: `keiryo.lm.distill` heals them from the unpruned model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keiryo.compress.prune_transformers import (
    attention_blocks,
    feed_forwards,
    keep_neurons,
    kept_count,
    prune_heads,
    prune_neurons,
    remove_layers,
    update_config,
    weight_head_scores,
    weight_neuron_scores,
)
from keiryo.errors import ConfigError, check_choice, check_whole
from keiryo.lm.calibrate import (
    Gather,
    Progress,
    block_linears,
    block_output,
    capture_block_inputs,
    check_batch_size,
    mean_loss,
    run_layerwise,
)
from keiryo.lm.load import decoder_layers
from keiryo.lm.reconstruct import Reconstruct, Targets, record_targets, retrain
from keiryo.lm.refit import column_scores, refit_columns
from keiryo.lm.widths import candidate_widths, measured_widths
from keiryo.progress import counting, say

IMPORTANCES = ("activation", "l2", "l1")
FFN_WIDTHS = ("uniform", "measured")
IMPORTANCE_TOKENS = 16384  # calibration tokens block importance is measured on (the first windows)
CHECK_WINDOWS = 8  # the last calibration windows: retraining is kept only if the loss on them fell
WIDTH_TOKENS = 32768  # calibration tokens heads and neurons are ranked (and refit) on: XᵀX of a 1536-wide
# layer settles on far fewer; the rest of a larger set is for reconstruction


@dataclass
class Structured:
    """Structured pruning: `heads` and `ffn` are the shares of each block's key/value groups (with their
    query heads) and feed-forward neurons removed; `layers` the whole blocks removed: a count (8), or a
    share of the model's blocks in (0, 1) (0.25: a quarter, rounded, at least one).

    `ffn_multiple` moves each block's kept neuron count to the nearest multiple of it (64: whole int4 groups
    and GGUF blocks, so `width+int4` and `width+int8` to GGUF work, and widths vector units like).
    `ffn_widths`: "uniform" (every block keeps the same count) or "measured" (with `refit`: the same total,
    shared out by what each block's narrowing costs the model's loss, `widths.py`; blocks then differ, so
    the model saves as a keiryo LM file or GGUF, not a Hugging Face folder).
    `importance` ranks heads and neurons: "activation" (on calibration text) or "l2"/"l1" (weight norms).
    `refit` (width, "activation"): re-solve the output and down projections by least squares on calibration
    text after their inputs go, keeping each block's output close to the unpruned block's.
    `reconstruct`: retrain, on the unpruned model's hidden states over the calibration text, the blocks
    around removed ones, and with `heads`/`ffn` every block (in runs of `reconstruct.around`).
    """

    heads: float = 0.0
    ffn: float = 0.0
    layers: int | float = 0
    importance: str = "activation"
    batch_size: int = 4
    reconstruct: Reconstruct | None = None
    refit: bool = False
    ffn_multiple: int = 1
    ffn_widths: str = "uniform"

    def __post_init__(self) -> None:
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"{name} is the share removed, in [0, 1), got {value!r}")
        layers = self.layers
        if isinstance(layers, bool) or not (
            (isinstance(layers, int) and layers >= 0) or (isinstance(layers, float) and 0 < layers < 1)
        ):
            raise ConfigError(
                f"layers is the blocks removed: a whole number ≥ 0, or a share in (0, 1), got {layers!r}"
            )
        check_choice(self.importance, IMPORTANCES, "structured pruning importance")
        check_whole("ffn_multiple", self.ffn_multiple, 1)
        check_choice(self.ffn_widths, FFN_WIDTHS, "ffn_widths")
        if self.ffn_widths == "measured" and not (self.ffn and self.refit):
            raise ConfigError(
                "measured widths narrow each block and refit it to see what that costs: set ffn > 0 and "
                "refit=True"
            )
        if not isinstance(self.refit, bool):
            raise ConfigError(f"refit is True or False, got {self.refit!r}")
        if self.refit and not (self.heads or self.ffn):
            raise ConfigError(
                "refit re-solves the layers reading pruned heads or neurons: set heads or ffn > 0"
            )
        if self.refit and self.importance != "activation":
            raise ConfigError(
                f"refit learns from calibration text: importance must be 'activation', not "
                f"'{self.importance}'"
            )
        check_batch_size(self.batch_size)
        if self.reconstruct is not None:
            if not isinstance(self.reconstruct, Reconstruct):
                raise ConfigError(f"reconstruct is a Reconstruct(...) or None, got {self.reconstruct!r}")
            if not (self.layers or self.heads or self.ffn):
                raise ConfigError(
                    "reconstruct retrains the blocks that pruning changed: set layers, heads or ffn > 0"
                )

    @property
    def statistic(self) -> str | None:
        """What it learns from calibration text: activation norms (width), block cosines (depth), or None."""
        if self.importance == "activation" and (self.heads or self.ffn):
            return "hessian" if self.refit else "norm"
        return "block-cosine" if self.layers else None


def structured_prune(
    model: nn.Module, config: Structured, calibration: Tensor | None, progress: Progress
) -> None:
    """`compress`'s handler: remove `config.layers` blocks, then `heads` and `ffn` of every block's width, in
    place; the model config follows. `progress(1)` after each remaining block's width is pruned."""
    if config.heads and any(block.fused for block in attention_blocks(model)):
        raise ConfigError(
            "GPT-2's config ties its head count to its width (n_embd = heads × head_dim), so fewer heads "
            "could not be saved: prune ffn or layers"
        )
    removed: list[int] = []
    if config.layers:
        count = len(decoder_layers(model))
        layers = blocks_removed(config.layers, count)
        if layers >= count:
            raise ConfigError(f"cannot remove {layers} of the model's {count} blocks (at most {count - 1})")
        scores = block_importance(model, first_tokens(calibration, IMPORTANCE_TOKENS), config.batch_size)
        removed = least_important(scores, layers)
    width = bool(config.heads or config.ffn)
    targets = None
    if config.reconstruct is not None:  # what the unpruned model did, before anything goes
        targets = record_targets(model, removed, calibration, config.reconstruct, every=width)
    if removed:
        remove_layers(model, removed)
    if width:
        # a reconstructing run shows its own bars (its caller cannot hold one open around them)
        own = progress is None and targets is not None and config.reconstruct.progress
        counts = None
        if config.ffn_widths == "measured":
            windows = first_tokens(calibration, WIDTH_TOKENS)
            counts = measured_widths(
                model, windows, 1 - config.ffn, config.ffn_multiple, config.batch_size, own
            )
            if own:
                say(f"feed-forward neurons kept, block by block: {' '.join(map(str, counts))}")
        with counting("pruning the width of each block", len(decoder_layers(model)), own) as advance:
            _prune_width(model, config, calibration, progress or advance, counts)
    update_config(model)
    if targets is not None:
        _retrain_if_better(model, targets, config.reconstruct, calibration[-CHECK_WINDOWS:])


def _retrain_if_better(model: nn.Module, targets: Targets, config: Reconstruct, held: Tensor) -> None:
    """Retrain (`reconstruct.retrain`), and keep it only if the model's loss on `held` calibration windows
    fell: each segment learns its own piece of the unpruned model alone, and pieces that each got closer can
    still, together, take the model further away (once, on SmolLM2, from perplexity 66 to 141)."""
    blocks = [block for i, block in enumerate(targets.blocks) if i not in targets.removed]
    before = mean_loss(model, held, 4)
    saved = [p.detach().clone() for block in blocks for p in block.parameters()]
    retrain(targets, config)
    after = mean_loss(model, held, 4)
    if after <= before:
        return
    with torch.no_grad():
        for parameter, value in zip((p for block in blocks for p in block.parameters()), saved, strict=True):
            parameter.copy_(value)
    if config.progress:
        say(
            f"retraining raised the calibration loss ({before:.3f} → {after:.3f} nats): "
            "kept the model before it"
        )


def _prune_width(
    model: nn.Module,
    config: Structured,
    calibration: Tensor | None,
    progress: Progress,
    counts: list[int] | None = None,
) -> None:
    """Rank and prune every block's heads and neurons (and refit), block after block (block i keeping
    `counts[i]` neurons where given, else `config.ffn`'s share)."""
    step = _width_step(config, counts)
    if config.importance == "activation":
        windows = first_tokens(calibration, WIDTH_TOKENS)
        gather = Gather(config.statistic, config.batch_size, lambda block: _narrowed(block, config))
        run_layerwise(model, windows, step, gather, progress)
        return
    for index, block in enumerate(decoder_layers(model)):
        step(index, block, None)
        if progress is not None:
            progress(1)


def input_widths(model: nn.Module, configs: list[Structured]) -> set[int]:
    """The input widths the decoder blocks' Linears will have once `configs` have pruned `model` (nn.Linear
    layers: `compress` linearizes first), worked out from the shapes alone: what a later quantizer's groups
    or GGUF's blocks must divide, known before any work is spent on pruning."""
    ffns, attentions = feed_forwards(model), attention_blocks(model)
    narrowed = {id(ffn.down) for ffn in ffns} | {id(heads.out) for heads in attentions}
    widths = {
        linear.in_features
        for block in decoder_layers(model)
        for linear in block_linears(block).values()
        if id(linear) not in narrowed
    }
    for ffn in ffns:
        possible = {ffn.down.in_features}
        for config in configs:
            if config.ffn_widths == "measured":  # any of the widths a block may get
                possible = {
                    w for p in possible for w in candidate_widths(p, 1 - config.ffn, config.ffn_multiple)
                }
            elif config.ffn:
                possible = {kept_count(w, 1 - config.ffn, config.ffn_multiple) for w in possible}
        widths |= possible
    for heads in attentions:
        grouped = heads.kv_heads > 1 and not heads.fused  # whole key/value groups go, as in prune_heads
        count = heads.kv_heads if grouped else heads.heads
        for config in configs:
            count = kept_count(count, 1 - config.heads) if config.heads else count
        widths.add(count * (heads.heads // heads.kv_heads if grouped else 1) * heads.head_dim)
    return widths


def blocks_removed(layers: int | float, count: int) -> int:
    """How many of a model's `count` blocks `layers` (a count, or a share in (0, 1), halves rounded up)
    removes."""
    if isinstance(layers, float):
        return max(1, math.floor(round(layers * count, 9) + 0.5))  # 0.7 × 45 is 31.4999…
    return layers


def _width_step(config: Structured, counts: list[int] | None = None):
    """The per-block step: rank this block's heads and neurons (activations or weights), prune them (to
    `counts[index]` neurons where given), and with `refit` re-solve the layers that read them."""
    p = 1 if config.importance == "l1" else 2

    def step(index: int, block: nn.Module, stats: dict[str, Tensor] | None) -> None:
        names = {id(m): name for name, m in block.named_modules()}
        if config.heads:
            for heads in attention_blocks(block):
                stat = None if stats is None else stats[names[id(heads.out)]]
                if stat is None:
                    scores = weight_head_scores(heads, p)
                else:
                    scores = column_scores(heads.out, stat, config.refit).view(heads.heads, -1).sum(1)
                weight = heads.out.weight.detach()
                kept = prune_heads(heads, 1 - config.heads, scores)
                if config.refit:
                    refit_columns(heads.out, weight, stat, kept)
        if config.ffn:
            for ffn in feed_forwards(block):
                stat = None if stats is None else stats[names[id(ffn.down)]]
                if stat is None:
                    scores = weight_neuron_scores(ffn, p)
                else:
                    scores = column_scores(ffn.down, stat, config.refit)
                weight = ffn.down.weight.detach()
                if counts is None:
                    kept = prune_neurons(ffn, 1 - config.ffn, scores, config.ffn_multiple)
                else:
                    kept = keep_neurons(ffn, counts[index], scores)
                if config.refit:
                    refit_columns(ffn.down, weight, stat, kept)

    return step


def _narrowed(block: nn.Module, config: Structured) -> list[nn.Module]:
    """The layers of `block` whose inputs `config` prunes (output projections, down projections): the only
    ones whose calibration statistic the width step reads."""
    outs = [heads.out for heads in attention_blocks(block)] if config.heads else []
    return outs + ([ffn.down for ffn in feed_forwards(block)] if config.ffn else [])


@torch.inference_mode()
def block_importance(model: nn.Module, windows: Tensor, batch_size: int = 4) -> Tensor:
    """ShortGPT's block importance: 1 − the mean cosine between each block's input and output hidden
    state over every token of `windows` ((count, length) ids). Low: the block barely changes its input."""
    if windows is None or windows.dim() != 2 or len(windows) == 0:
        raise ConfigError("removing blocks needs calibration text: token ids, (count, length)")
    blocks = decoder_layers(model)
    inputs, kwargs = capture_block_inputs(model, windows, batch_size)
    total = torch.zeros(len(blocks), dtype=torch.float64)
    tokens = 0
    for hidden in inputs:
        tokens += hidden.shape[0] * hidden.shape[1]
        for index, block in enumerate(blocks):
            out = block_output(block(hidden, **kwargs))
            total[index] += F.cosine_similarity(hidden.float(), out.float(), dim=-1).double().sum()
            hidden = out
    return (1 - total / tokens).float()


def first_tokens(windows: Tensor | None, tokens: int) -> Tensor | None:
    """The first windows of `windows` ((count, length) ids) holding at most `tokens` tokens (at least one)."""
    if windows is None or windows.dim() != 2:
        return windows
    return windows[: max(1, tokens // max(1, windows.shape[1]))]


def least_important(scores: Tensor, count: int) -> list[int]:
    """Indices of the `count` blocks with the lowest importance, in ascending order."""
    return sorted(torch.topk(scores, count, largest=False).indices.tolist())
