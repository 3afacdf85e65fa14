"""The accuracy-budget search: try pruning ratios × fine-tuning (plain or distilled) × quantization methods,
measure every candidate side by side, and return the cheapest one whose accuracy stays within the budget.

A candidate must keep its accuracy within `max_drop` points of the original on the validation split (which
chooses) *and* on the held-out test split (which confirms), so the returned model is never outside the budget
on test data. Among those, the one with the lowest latency (or file size) wins: by construction it lies on the
Pareto front of cost against accuracy drop (the worse of val and test) of everything tried.
No new candidate starts after the time limit.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from keiryo.compress.prune import max_ratio, prune
from keiryo.compress.qconfig import METHODS
from keiryo.compress.quantize import quantize
from keiryo.data import DataSplits, example_inputs, load_data
from keiryo.errors import ConfigError
from keiryo.loop import TrainConfig
from keiryo.measuring import Metrics, Report, compare
from keiryo.metrics import accuracy

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


@dataclass
class Search:
    """What `optimize` tries and its budget, checked when made (before any candidate is built).

    `max_drop`: accuracy points a candidate may lose, on val and on test. `objective`: "latency" (p50 at batch
    64) or "size" (file bytes). No new candidate starts after `time_limit` seconds (None: no limit).
    `ratios` are the structured pruning ratios to try, each fine-tuned with `finetune` (None: not at all),
    plainly and, for each True in `distill`, against the original's soft targets; `methods` are the
    quantization methods tried on the original and on every pruned model (None: stay in float).
    """

    max_drop: float = 1.0
    objective: str = "latency"
    time_limit: float | None = 600.0
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    distill: tuple[bool, ...] = (False, True)
    methods: tuple[str | None, ...] = (None, "int8-dynamic")
    finetune: TrainConfig | None = field(
        default_factory=lambda: TrainConfig(epochs=4, lr=1e-3, device="cpu", progress=False)
    )
    seed: int = 0

    def __post_init__(self) -> None:
        self.ratios, self.distill, self.methods = tuple(self.ratios), tuple(self.distill), tuple(self.methods)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective '{self.objective}' (choose from {', '.join(OBJECTIVES)})")
        if not _number(self.max_drop) or not 0 <= self.max_drop < 100:
            raise ConfigError(f"max_drop is in accuracy points, 0 ≤ max_drop < 100; got {self.max_drop}")
        limit = self.time_limit
        if limit is not None and (not _number(limit) or not limit >= 0):
            raise ConfigError(f"time limit must be a number of seconds ≥ 0 (or None), got {limit}")
        for ratio in self.ratios:
            if not _number(ratio) or not 0 < ratio < 1:
                raise ConfigError(f"pruning ratios must be between 0 and 1 (exclusive), got {ratio}")
        for method in self.methods:
            if method is not None and method not in METHODS:
                raise ConfigError(
                    f"unknown quantization method '{method}' (known: none, {', '.join(METHODS)})"
                )
        if self.finetune is not None and not isinstance(self.finetune, TrainConfig):
            raise ConfigError(f"finetune must be a TrainConfig or None, got {type(self.finetune).__name__}")
        if self.finetune is None and True in self.distill:
            raise ConfigError(
                "distilled candidates are fine-tuned on the original: give finetune a TrainConfig"
            )
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
            raise ConfigError(f"seed must be a whole number that fits in 64 bits, got {seed!r}")


def optimize(
    model: nn.Module,
    data: object,
    search: Search | None = None,
    on_candidate: Callable[[Candidate], None] | None = None,
) -> OptimizeResult:
    """Search pruning × distillation × quantization for the cheapest model within `search.max_drop` points;
    `on_candidate` is called with each candidate as it is measured."""
    search = search or Search()
    if not isinstance(search, Search):
        raise ConfigError(f"search must be a keiryo.optimize.Search, got {type(search).__name__}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"optimize needs a torch.nn.Module, got a {type(model).__name__}")
    splits = data if isinstance(data, DataSplits) else load_data(data, seed=search.seed)
    if splits.num_classes is None:
        raise ConfigError("optimize needs a classification data set (its budget is in accuracy points)")
    model = model.eval()
    example = example_inputs(splits, 64)
    if search.ratios:  # a ratio that would empty a layer is refused now, not after the candidates before it
        limit = max_ratio(model, example)
        if max(search.ratios) > limit:
            raise ConfigError(
                f"pruning ratio {max(search.ratios)} would remove every channel of the model's narrowest "
                f"layer; use ratios ≤ {limit:.3f}"
            )
    base_val, base_test = accuracy(model, splits.val), accuracy(model, splits.test)
    start = time.perf_counter()
    deadline = None if search.time_limit is None else start + search.time_limit
    candidates: list[Candidate] = []
    stopped = False
    for name, build, (ratio, distilled, method) in _plan(model, splits, example, search):
        if deadline is not None and time.perf_counter() > deadline:
            stopped = True
            break
        m = build()
        c = Candidate(name, m, ratio, distilled, method, accuracy(m, splits.val), accuracy(m, splits.test))
        candidates.append(c)
        if on_candidate is not None:
            on_candidate(c)
    report = compare({"original": model, **{c.name: c.model for c in candidates}}, example, splits)
    rows = {r.name: r for r in report.rows}
    for c in candidates:
        c.cost = _cost(rows[c.name], search.objective)
        c.drop = min(c.val_accuracy - base_val, c.test_accuracy - base_test)
        c.within_budget = c.drop >= -search.max_drop / 100
    base_cost = _cost(rows["original"], search.objective)
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


def _plan(
    model: nn.Module, splits: DataSplits, example: Tensor, search: Search
) -> Iterator[tuple[str, Callable[[], nn.Module], tuple[float, bool, str | None]]]:
    """The candidates in the order they are tried: (name, how to build it, (ratio, distilled, method)).

    Quantized originals first, then each pruning ratio (plain, then distilled), each followed by its
    quantized versions; a pruned model is built once and reused by the candidates made from it.
    """
    pruned: dict[tuple[float, bool], nn.Module] = {}

    def pruned_model(ratio: float, distilled: bool) -> nn.Module:
        if (ratio, distilled) not in pruned:
            torch.manual_seed(search.seed)
            teacher = model if distilled else None
            pruned[ratio, distilled] = prune(model, ratio, example, splits, search.finetune, teacher)
        return pruned[ratio, distilled]

    def quantized(ratio: float, distilled: bool, method: str) -> nn.Module:
        return _quantize(pruned_model(ratio, distilled), method, splits, example)

    methods = [m for m in search.methods if m is not None]
    for method in methods:
        yield (
            f"q:{method}",
            functools.partial(_quantize, model, method, splits, example),
            (0.0, False, method),
        )
    for ratio in search.ratios:
        for distilled in search.distill:
            base = f"p{ratio:g}" + ("+kd" if distilled else "")
            yield base, functools.partial(pruned_model, ratio, distilled), (ratio, distilled, None)
            for method in methods:
                build = functools.partial(quantized, ratio, distilled, method)
                yield f"{base}+q:{method}", build, (ratio, distilled, method)


def _cost(row: Metrics, objective: str) -> float:
    return row.latency[64].p50_ms if objective == "latency" else float(row.bytes or 0)


def _quantize(model: nn.Module, method: str, splits: DataSplits, example: Tensor) -> nn.Module:
    return quantize(model, method, splits, example)


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
