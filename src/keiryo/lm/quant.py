"""Weight-only quantization of a causal LM: int8 or int4, by round-to-nearest or by GPTQ.

- int8: symmetric, one scale per output channel, round-to-nearest (int8 RTN is near-lossless already).
- int4: asymmetric, one scale and zero per group of `group_size` inputs (64 divides SmolLM2's 576 and 1536),
  by round-to-nearest (`rtn`) or by GPTQ (`gptq`, Frantar et al. 2022), which quantizes one input column at a
  time and spreads each column's rounding error over the columns not yet quantized, weighted by the inverse
  Hessian of the layer's squared output error on calibration text.

Every Linear of the decoder blocks is replaced by an `Int8Linear` / `Int4Linear` (see `kernels.py` for which
CPU kernel runs and why). The output head (`lm_head`) and a tied input embedding become int8 in both cases,
as llama.cpp keeps the output tensor at higher precision than 4 bits: the head is the largest single matrix
in a small model (28% of SmolLM2-135M) and the most sensitive one.

torchao 0.18 has a GPTQ (`torchao.prototype.gptq`), but it asserts a CUDA device and needs the `mslk` package
for int4, so it cannot run on this CPU; `gptq_quantize` below is the paper's algorithm written out instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from keiryo.errors import ConfigError, check_choice
from keiryo.lm.calibrate import Progress, Windows, block_linears, check_batch_size, each_block
from keiryo.lm.kernels import Int4Linear, Int8Embedding, Int8Linear, round_params
from keiryo.lm.load import decoder_layers

METHODS = ("int8", "int4")
ALGORITHMS = ("rtn", "gptq")


# --- quantizers -----------------------------------------------------------------------------------------


def int8_rtn(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 weight, per-row scale): symmetric round-to-nearest, scale = max|w| / 127 per output channel."""
    (scale,) = round_params((weight.abs().amax(dim=1) / 127).clamp(min=1e-8))
    q = torch.round(weight / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_params(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, zero) per row of `weight` (one group): [min, max] in 15 steps; W ≈ (q - 8)·scale + zero.

    The range always includes 0, as in GPTQ's reference quantizer."""
    low, high = weight.amin(dim=1).clamp(max=0), weight.amax(dim=1).clamp(min=0)
    scale = ((high - low) / 15).clamp(min=1e-8)
    return round_params(scale, low + 8 * scale)


def int4_round(weight: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Integers q in [0, 15] nearest to `weight` (rows) on the grid (q - 8)·scale + zero."""
    return torch.round((weight - zero.unsqueeze(1)) / scale.unsqueeze(1) + 8).clamp(0, 15)


def int4_rtn(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q, scale, zero) by round-to-nearest, groups of `group_size` consecutive inputs."""
    out, inp = weight.shape
    groups = weight.reshape(out * inp // group_size, group_size)
    scale, zero = int4_params(groups)
    q = int4_round(groups, scale, zero).reshape(out, inp)
    return q.to(torch.uint8), scale.reshape(out, -1), zero.reshape(out, -1)


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    group_size: int,
    *,
    damping: float = 0.01,
    block: int = 128,
    act_order: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ (Frantar et al. 2022, Algorithm 1) for one layer: (q, scale, zero) minimising ‖XWᵀ - XŴᵀ‖².

    `hessian` is H = 2XXᵀ/n of the layer's inputs. Columns are quantized one at a time; after each one the
    rounding error e (divided by the Cholesky factor's diagonal) is subtracted from the columns not yet
    quantized in proportion to the upper Cholesky factor of H⁻¹ — the optimal update of the remaining weights.
    Updates are applied lazily, `block` columns at a time. With `act_order` the columns go in order of
    decreasing H_jj (the inputs with the most energy first, while the most columns remain to absorb their
    error), and each group's scale and zero are fixed beforehand from the original weights ("static
    groups"), so groups stay contiguous for the kernel; without it, columns go left to right and a group's
    scale and zero are chosen when its first column is reached, from the weights as updated so far.
    """
    w = weight.detach().float().clone()
    out, columns = w.shape
    if columns % group_size or block % group_size:
        raise ConfigError(f"group size {group_size} must divide the layer's {columns} inputs and {block}")
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    scales = torch.zeros(out, columns // group_size)
    zeros = torch.zeros(out, columns // group_size)
    order = torch.arange(columns)
    if act_order:
        for g in range(columns // group_size):
            scales[:, g], zeros[:, g] = int4_params(w[:, g * group_size : (g + 1) * group_size])
        order = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, order], h[order][:, order]
    h += damping * torch.mean(torch.diag(h)) * torch.eye(columns)  # 1% dampening, as in the paper
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros_like(w)
    with _one_thread():  # thousands of tiny ops: OpenMP's hand-offs cost more than they save (10× here)
        for start in range(0, columns, block):
            end = min(start + block, columns)
            w_block = w[:, start:end].clone()
            errors = torch.zeros_like(w_block)
            h_block = h_inv[start:end, start:end]
            for i in range(end - start):
                group = int(order[start + i]) // group_size
                if not act_order and (start + i) % group_size == 0:
                    scales[:, group], zeros[:, group] = int4_params(w_block[:, i : i + group_size])
                s, z = scales[:, group], zeros[:, group]
                qi = int4_round(w_block[:, i : i + 1], s, z)[:, 0]
                q[:, start + i] = qi
                error = (w_block[:, i] - ((qi - 8) * s + z)) / h_block[i, i]
                w_block[:, i:] -= error.unsqueeze(1) @ h_block[i, i:].unsqueeze(0)
                errors[:, i] = error
            w[:, end:] -= errors @ h_inv[start:end, end:]  # the block's errors, on every later column at once
    q = q[:, torch.argsort(order)]  # back to the layer's own column order
    return q.to(torch.uint8), scales, zeros


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- the model ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightQuant:
    """How to quantize a causal LM's weights: `method` int8 | int4, `algorithm` rtn | gptq (int4; needs
    calibration text), `group_size` of int4 (32, 64 or 128: the CPU kernel's), `batch_size` of calibration."""

    method: str = "int8"
    algorithm: str = "rtn"
    group_size: int = 64
    batch_size: int = 8

    def __post_init__(self) -> None:
        check_batch_size(self.batch_size)
        check_choice(self.method, METHODS, "weight quantization")
        check_choice(self.algorithm, ALGORITHMS, "quantization algorithm")
        if self.algorithm == "gptq" and self.method != "int4":
            raise ConfigError("GPTQ is implemented for int4 (int8 round-to-nearest is already near-lossless)")
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or size not in (32, 64, 128):
            raise ConfigError(f"int4 group size must be 32, 64 or 128 (the CPU kernel's), got {size!r}")

    @property
    def statistic(self) -> str | None:
        """What calibration measures for this method (GPTQ's Hessians), None when it needs no data."""
        return "hessian" if self.algorithm == "gptq" else None


def quantize_weights(model: nn.Module, config: WeightQuant, calibration: Windows, progress: Progress) -> None:
    """`keiryo.lm.compress`'s handler for `WeightQuant`: decoder Linears → int8/int4 layers, head → int8."""
    method, group_size = config.method, config.group_size
    if method == "int4":
        for block in decoder_layers(model):
            for name, linear in block_linears(block).items():
                if linear.in_features % group_size:
                    raise ConfigError(
                        f"group size {group_size} does not divide {name}'s {linear.in_features} inputs"
                    )

    def replace(block: nn.Module, hessians: dict[str, Tensor] | None) -> None:
        for name, linear in block_linears(block).items():
            weight, bias = linear.weight.float(), linear.bias
            if method == "int8":
                new: nn.Module = Int8Linear(*int8_rtn(weight), bias)
            elif hessians is None:
                new = Int4Linear(*int4_rtn(weight, group_size), group_size, bias)
            else:
                new = Int4Linear(*gptq_quantize(weight, hessians[name], group_size), group_size, bias)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, new)

    each_block(model, calibration, lambda index, block, stats: replace(block, stats), config, progress)
    quantize_head(model)


@torch.no_grad()
def quantize_head(model: nn.Module) -> None:
    """The output head to int8 per channel; a tied input embedding shares its int8 table."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return
    embedding = model.get_input_embeddings()
    tied = isinstance(embedding, nn.Embedding) and embedding.weight is head.weight
    q, scale = int8_rtn(head.weight.float())
    new_head = Int8Linear(q, scale, head.bias)
    model.set_output_embeddings(new_head)
    if tied:
        model.set_input_embeddings(Int8Embedding(new_head.weight_int8, new_head.scale, embedding.padding_idx))
