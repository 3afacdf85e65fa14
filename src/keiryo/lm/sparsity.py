"""Pruning a causal LM's weights to 50% unstructured or 2:4 sparsity, by magnitude or by Wanda.

- magnitude: a weight's importance is |W|; 50% unstructured removes the smallest half of each matrix (the
  papers' magnitude baseline compares weights across the whole layer).
- Wanda (Sun et al. 2023): importance |W_ij| · ‖X_j‖₂, the weight times the norm of its input feature over the
  calibration tokens, compared within each output row. A weight on a rarely-large input can be small and
  still matter, and LLMs have a few input features with huge activations: magnitude prunes their weights,
  Wanda keeps them. Its statistics are gathered block by block on the already-pruned model (`calibrate.py`).
- 2:4: in every group of 4 consecutive inputs of a row, the 2 least important weights are zeroed — the
  pattern sparse tensor cores run at 2× (on CUDA; there is no CPU kernel for it, see below).

Only the Linear layers of the decoder blocks are pruned (not the embedding or the output head), as in the
papers. Pruned weights are plain zeros in dense tensors: the model runs with the same dense kernels at the
same speed and memory, and files shrink through keiryo's sparse storage (values plus a bitmask). A CPU kernel
that skips zeros does not win at 50%, and torch's 2:4 kernels (`to_sparse_semi_structured`) are CUDA-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from keiryo.errors import ConfigError, check_choice
from keiryo.lm.calibrate import Progress, Windows, block_linears, check_batch_size, each_block
from keiryo.lm.load import decoder_layers

IMPORTANCES = ("magnitude", "wanda")
PATTERNS = ("unstructured", "2:4")


def keep_mask(score: Tensor, pattern: str, sparsity: float = 0.5, *, per_row: bool = True) -> Tensor:
    """Boolean mask of the weights to keep: the highest scores, `sparsity` of them removed per row (or per
    matrix when `per_row` is False) for "unstructured", 2 of every 4 consecutive inputs for "2:4"."""
    if pattern == "2:4":
        out, inp = score.shape
        if inp % 4:
            raise ConfigError(f"2:4 sparsity needs a multiple of 4 inputs, got {inp}")
        groups = score.reshape(out, inp // 4, 4)
        drop = groups.topk(2, dim=-1, largest=False).indices
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return mask.reshape(out, inp)
    if pattern != "unstructured":
        raise ConfigError(f"unknown sparsity pattern '{pattern}' (choose {', '.join(PATTERNS)})")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    rows = score if per_row else score.reshape(1, -1)
    drop_count = int(rows.shape[1] * sparsity)
    mask = torch.ones_like(rows, dtype=torch.bool)
    if drop_count:
        drop = rows.topk(drop_count, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask.reshape(score.shape)


def wanda_score(weight: Tensor, input_sq_norm: Tensor) -> Tensor:
    """|W_ij| · ‖X_j‖₂ from the per-input sums of squares ΣX_j² over calibration tokens."""
    return weight.abs() * input_sq_norm.sqrt().unsqueeze(0)


@dataclass(frozen=True)
class Sparsify:
    """How to zero a causal LM's weights: `importance` magnitude | wanda (Wanda needs calibration text),
    `pattern` unstructured (`sparsity` of each layer) or 2:4 (two of every four consecutive inputs kept),
    `batch_size` of the calibration windows."""

    importance: str = "wanda"
    pattern: str = "unstructured"
    sparsity: float = 0.5
    batch_size: int = 8

    def __post_init__(self) -> None:
        check_choice(self.importance, IMPORTANCES, "pruning importance")
        check_choice(self.pattern, PATTERNS, "sparsity pattern")
        if isinstance(self.sparsity, bool) or not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        check_batch_size(self.batch_size)

    @property
    def statistic(self) -> str | None:
        """What calibration measures for this method (Wanda's input norms), None when it needs no data."""
        return "norm" if self.importance == "wanda" else None


def prune_weights(model: nn.Module, config: Sparsify, calibration: Windows, progress: Progress) -> None:
    """`keiryo.lm.compress`'s handler for `Sparsify`: zero each decoder Linear's least important weights."""
    pattern, sparsity = config.pattern, config.sparsity

    def prune_block(block: nn.Module, norms: dict[str, Tensor] | None) -> None:
        for name, linear in block_linears(block).items():
            weight = linear.weight
            if norms is None:  # magnitude: compared across the whole matrix, as in the papers
                mask = keep_mask(weight.abs(), pattern, sparsity, per_row=False)
            else:
                mask = keep_mask(wanda_score(weight.float(), norms[name]), pattern, sparsity, per_row=True)
            weight.mul_(mask.to(weight.dtype))

    each_block(model, calibration, lambda index, block, stats: prune_block(block, stats), config, progress)


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zeros among the weights of the decoder blocks' Linear layers."""
    zeros = total = 0
    for block in decoder_layers(model):
        for linear in block_linears(block).values():
            zeros += int((linear.weight == 0).sum())
            total += linear.weight.numel()
    return zeros / max(total, 1)
