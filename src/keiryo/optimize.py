"""The accuracy-budget search: try pruning ratios × fine-tuning (plain or distilled) × quantization methods,
measure every candidate side by side, and return the cheapest one whose accuracy stays within the budget.

A candidate must keep its accuracy within `max_drop` points of the original on the validation split (which
chooses) *and* on the held-out test split (which confirms), so the returned model is never outside the budget
on test data. Among those, the one with the lowest latency (or file size) wins: by construction it lies on the
Pareto front of cost against accuracy drop (the worse of val and test) of everything tried.
No new candidate starts after the time limit.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from keiryo.data import DataSplits, example_inputs, load_data
from keiryo.errors import ConfigError
from keiryo.metrics import Report, accuracy, compare

OBJECTIVES = ("latency", "size")


@dataclass
class Candidate:
    """One tried combination and its measured figures."""

    name: str
    model: nn.Module
    ratio: float
    distilled: bool
    method: str | None
    val_accuracy: float
    test_accuracy: float
    cost: float = float("nan")  # p50 ms at batch 64, or bytes
    drop: float = float("nan")  # worst accuracy change of val and test against the original (≤ 0 is a loss)
    within_budget: bool = False


@dataclass
class OptimizeResult:
    """The chosen model, every candidate, and the side-by-side report (original first)."""

    best: Candidate
    candidates: list[Candidate]
    report: Report
    baseline_val: float
    baseline_test: float
    stopped_early: bool = False
    notes: list[str] = field(default_factory=list)


def optimize(
    model: nn.Module,
    data: object,
    *,
    max_drop: float = 1.0,
    objective: str = "latency",
    time_limit: float | None = 600.0,
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75),
    distill_options: tuple[bool, ...] = (False, True),
    methods: tuple[str | None, ...] = (None, "int8-dynamic"),
    finetune_epochs: int = 4,
    seed: int = 0,
    on_candidate: Callable[[Candidate], None] | None = None,
) -> OptimizeResult:
    """Search pruning × distillation × quantization for the cheapest model within `max_drop` points."""
    from keiryo.compress.prune import max_ratio, prune
    from keiryo.loop import TrainConfig

    check_options(max_drop, objective, time_limit, ratios, methods, finetune_epochs)
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise ConfigError(f"seed must be a whole number that fits in 64 bits, got {seed!r}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"optimize needs a torch.nn.Module, got a {type(model).__name__}")
    splits = data if isinstance(data, DataSplits) else load_data(data, seed=seed)
    if splits.num_classes is None:
        raise ConfigError("optimize needs a classification data set (its budget is in accuracy points)")
    model = model.eval()
    example = example_inputs(splits, 64)
    if ratios:  # a ratio that would empty a layer is refused now, not after the candidates before it
        limit = max_ratio(model, example)
        if max(ratios) > limit:
            raise ConfigError(
                f"pruning ratio {max(ratios)} would remove every channel of the model's narrowest layer; "
                f"use ratios ≤ {limit:.3f}"
            )
    base_val, base_test = accuracy(model, splits.val), accuracy(model, splits.test)
    start = time.perf_counter()
    candidates: list[Candidate] = []
    stopped = False

    def out_of_time() -> bool:
        return time_limit is not None and time.perf_counter() - start > time_limit

    def add(name: str, m: nn.Module, ratio: float, distilled: bool, method: str | None) -> None:
        c = Candidate(name, m, ratio, distilled, method, accuracy(m, splits.val), accuracy(m, splits.test))
        candidates.append(c)
        if on_candidate is not None:
            on_candidate(c)

    for method in methods:
        if method is not None:
            if out_of_time():
                stopped = True
                break
            add(f"q:{method}", _quantize(model, method, splits, example), 0.0, False, method)
    for ratio in ratios:
        for distilled in distill_options:
            if out_of_time():
                stopped = True
                break
            torch.manual_seed(seed)
            pruned = prune(
                copy.deepcopy(model),
                ratio,
                example_inputs=example,
                data=splits,
                finetune_epochs=finetune_epochs,
                finetune=TrainConfig(lr=1e-3, seed=seed, device="cpu", progress=False),
                teacher=model if distilled else None,
            )
            base_name = f"p{ratio:g}" + ("+kd" if distilled else "")
            add(base_name, pruned, ratio, distilled, None)
            for method in methods:
                if method is None:
                    continue
                if out_of_time():
                    stopped = True
                    break
                quantized = _quantize(pruned, method, splits, example)
                add(f"{base_name}+q:{method}", quantized, ratio, distilled, method)

    report = compare({"original": model, **{c.name: c.model for c in candidates}}, example, splits)
    rows = {r.name: r for r in report.rows}
    for c in candidates:
        row = rows[c.name]
        c.cost = row.latency[64].p50_ms if objective == "latency" else float(row.bytes or 0)
        c.drop = min(c.val_accuracy - base_val, c.test_accuracy - base_test)
        c.within_budget = c.drop >= -max_drop / 100
    base_row = rows["original"]
    base_cost = base_row.latency[64].p50_ms if objective == "latency" else float(base_row.bytes or 0)
    original = Candidate("original", model, 0.0, False, None, base_val, base_test, base_cost, 0.0, True)
    # cheapest within budget; among equal costs the smallest drop: so no tried model beats it on both
    best = min([original, *[c for c in candidates if c.within_budget]], key=lambda c: (c.cost, -c.drop))
    notes = [
        f"{len(candidates)} candidates in {time.perf_counter() - start:.0f} s"
        + (" (time limit hit)" if stopped else "")
    ]
    if best is original:
        notes.append("no candidate was cheaper within the budget: the original is returned")
    return OptimizeResult(best, candidates, report, base_val, base_test, stopped, notes)


def _quantize(model: nn.Module, method: str, splits: DataSplits, example: torch.Tensor) -> nn.Module:
    from keiryo.compress.quantize import quantize

    return quantize(copy.deepcopy(model), method, calibration=splits, example_inputs=example)


def check_options(
    max_drop: float = 1.0,
    objective: str = "latency",
    time_limit: float | None = 600.0,
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75),
    methods: tuple[str | None, ...] = (None, "int8-dynamic"),
    finetune_epochs: int = 4,
) -> None:
    """Reject, in one line and before any work, search options `optimize` cannot run with."""
    from keiryo.compress.quantize import METHODS

    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{objective}' (choose from {', '.join(OBJECTIVES)})")
    if not _number(max_drop) or not 0 <= max_drop < 100:
        raise ConfigError(f"max_drop is in accuracy points, 0 ≤ max_drop < 100; got {max_drop}")
    if time_limit is not None and (not _number(time_limit) or not time_limit >= 0):
        raise ConfigError(f"time limit must be a number of seconds ≥ 0 (or None), got {time_limit}")
    for ratio in ratios:
        if not _number(ratio) or not 0 < ratio < 1:
            raise ConfigError(f"pruning ratios must be between 0 and 1 (exclusive), got {ratio}")
    for method in methods:
        if method is not None and method not in METHODS:
            raise ConfigError(f"unknown quantization method '{method}' (known: none, {', '.join(METHODS)})")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ConfigError(f"finetune_epochs must be a whole number ≥ 0, got {finetune_epochs!r}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def parse_duration(text: str) -> float:
    """'90s', '10m', '1h', '45' (seconds) -> seconds; negative or not-a-number durations are refused."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise ConfigError(f"time limit '{text}' is not a duration like 90s, 10m or 1h") from None
    if math.isnan(seconds) or seconds < 0:
        raise ConfigError(f"time limit '{text}' must be a duration ≥ 0, like 90s, 10m or 1h")
    return seconds
