"""How `quantize` chooses among the kernels it built: quality first, then speed, timed interleaved.

Every candidate is compared with the float model on the calibration (else example) inputs; those within the
policy's tolerance are timed beside float at batch 1 and at the example's batch, in interleaved loops whose
number of runs fits the policy's time limit (one run at least). The fastest within tolerance wins; for a
speed method float is kept when no kernel is ≥ `MIN_SPEEDUP` faster. The choice and every alternative go
into a `QuantizeReport`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from keiryo import inputs
from keiryo.compress.qconfig import SPEED_METHODS, Policy
from keiryo.metrics import agreement, time_models

REPORT_ATTR = "quantize_report"
# A kernel must be this much faster (geometric mean over the batch sizes timed) to replace float under auto:
# back-to-back timings on a shared CPU differ by a few percent, and a 1.03× "win" is noise, not a speed-up.
MIN_SPEEDUP = 1.1
MIN_RUNS = 3  # below this many timed runs, the call that judged the time is the only warm-up


@dataclass
class Candidate:
    """One kernel that was built and measured against the float model."""

    backend: str
    granularity: str | None
    p50_ms: dict[int, float] = field(default_factory=dict)
    float_p50_ms: dict[int, float] = field(default_factory=dict)  # the float model, timed alongside
    speedup: dict[int, float] = field(default_factory=dict)  # float p50 / this p50, per batch size
    cosine: float | None = None
    top1: float | None = None
    passed: bool = False  # within the quality tolerance
    note: str = ""

    @property
    def score(self) -> float:
        """Geometric mean of the speed-ups over the batch sizes timed (1.0 when not timed)."""
        ups = list(self.speedup.values())
        return math.exp(sum(math.log(u) for u in ups) / len(ups)) if ups else 1.0


@dataclass
class QuantizeReport:
    """What `quantize` chose and why: the chosen kernel, every alternative measured, and the float timing."""

    method: str
    backend: str  # the chosen backend, or "float" when float was kept
    granularity: str | None
    layers: list[str]
    candidates: list[Candidate]
    kept_float: bool
    message: str
    output: str = "output"  # the output compared: 'output', 'logits', 'last_hidden_state', ...


def measure(
    model: nn.Module,
    built: dict[str, nn.Module],
    candidates: dict[str, Candidate],
    quality: tuple[inputs.Example | None, bool, bool],
    example: inputs.Example | None,
    policy: Policy,
) -> str:
    """Fill each candidate's agreement with float (`quality`: inputs, class scores?, retrained on purpose?),
    then the speed of those within tolerance, interleaved with float, within the policy's time limit.
    Returns the output field compared ('output', 'logits', 'last_hidden_state', ...)."""
    quality_inputs, class_scores, retrained = quality
    min_top1 = policy.min_top1 if class_scores else None
    output = "output"
    for key, qmodel in built.items():
        c = candidates[key]
        if quality_inputs is None:
            c.passed, c.note = True, "quality not measured (no example inputs or calibration data)"
            continue
        agree = agreement(qmodel, model.eval(), quality_inputs)
        c.cosine, c.top1, output = agree.cosine, agree.top1, agree.output
        c.passed = agree.cosine >= policy.min_cosine and (min_top1 is None or (agree.top1 or 0.0) >= min_top1)
        if retrained:  # QAT: agreement with the old float model is for information only
            c.passed, c.note = True, "retrained with fake quantization; agreement is with the float model"
        elif not c.passed:
            top1 = f", top-1 ≥ {min_top1}" if min_top1 is not None else ""
            c.note = f"outside tolerance (cosine ≥ {policy.min_cosine}{top1})"
    timed = {k: m for k, m in built.items() if candidates[k].passed}
    if example is None or not timed:
        return output
    models = {"float": model, **timed}
    sizes = sorted({1, inputs.batch_size(example)})
    for size in sizes:
        batch = inputs.resize_batch(example, size)
        runs = _runs_within(models, batch, policy.time_limit / len(sizes), policy.runs)
        lat = time_models(models, batch, runs=runs, warmup=min(5, max(0, runs - MIN_RUNS)))
        for key in timed:
            candidates[key].float_p50_ms[size] = lat["float"].p50_ms
            candidates[key].p50_ms[size] = lat[key].p50_ms
            candidates[key].speedup[size] = lat["float"].p50_ms / lat[key].p50_ms
    return output


def _runs_within(models: dict[str, nn.Module], batch: inputs.Example, seconds: float, most: int) -> int:
    """Timed runs per model that fit in `seconds` (each run calls every model twice: one warm call, one
    timed), judged from one call of each, which also warms them up; at least 1, at most `most`. Warm-up
    calls are only added when there is time for more than MIN_RUNS runs."""
    started = time.perf_counter()
    with torch.inference_mode():
        for m in models.values():
            inputs.call(m, batch)
    once = time.perf_counter() - started
    return max(1, min(most, int(seconds / max(2 * once, 1e-6))))


def choose(
    model: nn.Module,
    method: str,
    layers: list[str],
    built: dict[str, nn.Module],
    candidates: dict[str, Candidate],
    forced: bool,
) -> nn.Module:
    """The fastest candidate within tolerance, with its report attached (or float, for a speed method).

    `forced`: the caller named the backend, so its kernel is returned whatever it measured.
    """
    may_keep_float = method in SPEED_METHODS and not forced
    passing = [k for k in built if candidates[k].passed]
    best = max(passing, key=lambda k: candidates[k].score) if passing else None
    if best is None and may_keep_float:
        return _kept_float(model, method, layers, candidates, "no kernel stays within tolerance")
    if best is None:
        best = max(built, key=lambda k: candidates[k].cosine or 0.0)
        message = f"{best}: no kernel met the tolerance; this is the closest to float (see candidates)"
    elif candidates[best].speedup and candidates[best].score < MIN_SPEEDUP and may_keep_float:
        why = f"no int8 kernel is ≥ {MIN_SPEEDUP}× faster than float here"
        return _kept_float(model, method, layers, candidates, why)
    else:
        ups = ", ".join(f"{u:.2f}× at batch {b}" for b, u in candidates[best].speedup.items())
        message = f"{best}" + (f": {ups} vs float" if ups else " (speed not measured: no example inputs)")
        if candidates[best].speedup and candidates[best].score <= 1.0:
            message += " (slower than float; kept because this method or backend was asked for)"
    c = candidates[best]
    report = QuantizeReport(
        method, c.backend, c.granularity, layers, list(candidates.values()), False, message
    )
    setattr(built[best], REPORT_ATTR, report)
    return built[best]


def _kept_float(model, method, layers, candidates, why) -> nn.Module:
    kept = copy.deepcopy(model).eval()
    message = f"kept float: {why} on this machine (every alternative measured is listed)"
    report = QuantizeReport(method, "float", None, layers, list(candidates.values()), True, message)
    setattr(kept, REPORT_ATTR, report)
    return kept
