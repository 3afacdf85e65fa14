"""Least-squares refit of a layer whose input columns were pruned, from the calibration inputs' XᵀX: the
weights for the kept columns whose outputs stay closest to the unpruned layer's (the compensation of FLAP
and SlimGPT, in closed form), the score that ranks columns by the output energy they carry, and the error
the refit leaves at each kept count (how much a block loses as it narrows, `widths.py`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

REFIT_DAMPING = 1e-5  # of the kept columns' mean XᵀX diagonal, added to it: dead neurons leave it singular


def column_scores(layer: nn.Module, stat: Tensor, refit: bool) -> Tensor:
    """One score per input column of `layer`: Σx² (the "norm" statistic), or with `refit` (the "hessian"
    statistic, XᵀX up to scale) the energy the column puts into the output, x_jᵀx_j·‖w_j‖²."""
    if not refit:
        return stat
    return stat.diagonal().float() * layer.weight.detach().float().pow(2).sum(0)


def _damped(gram: Tensor) -> Tensor:
    damping = REFIT_DAMPING * gram.diagonal().mean().clamp_min(1e-12)
    return gram + damping * torch.eye(len(gram), dtype=gram.dtype)


@torch.no_grad()
def refit_columns(layer: nn.Module, weight: Tensor, hessian: Tensor, kept: Tensor) -> None:
    """Give `layer` (an nn.Linear: `compress` linearizes GPT-2's Conv1D first), which kept only input
    columns `kept` of its unpruned `weight` ((out, in)), the weights whose outputs on the calibration inputs
    (their XᵀX up to scale: `hessian`) are closest to the unpruned ones: W_K = W·H[:, K]·(H[K, K] + λI)⁻¹,
    λ a `REFIT_DAMPING` share of H[K, K]'s mean diagonal. Solved in float64 on the CPU (MPS has no float64;
    the solve is small next to gathering H)."""
    h = hessian.detach().to("cpu", torch.float64)
    k = kept.cpu()
    solved = torch.linalg.solve(_damped(h[k][:, k]), h[k] @ weight.detach().to("cpu", torch.float64).t()).t()
    target = layer.weight
    value = solved.to(target.device, target.dtype).contiguous()
    layer.weight = nn.Parameter(value, requires_grad=target.requires_grad)


@torch.no_grad()
def refit_errors(layer: nn.Module, hessian: Tensor, counts: list[int]) -> list[float]:
    """For each of `counts`: the share of `layer`'s output energy on the calibration inputs that is lost
    when it keeps only that many input columns (the highest `column_scores`) and is refit —
    1 − tr(A_K H_KK⁻¹ A_Kᵀ) / tr(W H Wᵀ), A = W·H. Falls as the count grows; 0 at full width.

    The kept sets are nested (the top k), so one Cholesky factor L of H in score order serves them all:
    H_KK's factor is L's leading block, and with Z = L⁻¹Aᵀ the kept energy is the sum of Z's first k
    squared rows (the damping is H's, not each H_KK's: a curve, not a solve)."""
    h = hessian.detach().to("cpu", torch.float64)
    weight = layer.weight.detach().to("cpu", torch.float64)
    order = torch.argsort(column_scores(layer, hessian, True).cpu(), descending=True)
    h = _damped(h[order][:, order])
    a = (weight @ hessian.detach().to("cpu", torch.float64))[:, order]
    total = float((a[:, order.argsort()] * weight).sum())  # tr(W H Wᵀ)
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info):  # not positive definite even damped: solve each count
        return [_error_by_solve(h, a, total, count) for count in counts]
    z = torch.linalg.solve_triangular(factor, a.t(), upper=False)
    kept = z.pow(2).sum(1).cumsum(0)
    return [max(0.0, 1.0 - float(kept[count - 1]) / total) if total > 0 else 0.0 for count in counts]


def _error_by_solve(h: Tensor, a: Tensor, total: float, count: int) -> float:
    kept = float(torch.trace(a[:, :count] @ torch.linalg.solve(h[:count, :count], a[:, :count].t())))
    return max(0.0, 1.0 - kept / total) if total > 0 else 0.0
