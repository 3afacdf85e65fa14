"""How `quantize` chooses among the kernels it built: quality first, then speed, timed interleaved.

Every candidate is compared with the float model on the calibration (else example) inputs; those within the
policy's tolerance are timed beside float (BatchNorms folded) at each of the policy's batch sizes, in
interleaved loops whose number of runs fits the policy's time limit (one run at least). Under
backend="auto" the result is never slower than float: the fastest kernel within tolerance wins only if it
is ≥ `MIN_SPEEDUP` faster overall and at least as fast at every batch size; otherwise float is kept and the
report says so (and, when the fastest differs by batch size, which is fastest at each). A backend the user
named is returned whatever it measured, saying so when it misses the tolerance or is slower than float.
The choice and every alternative go into a `QuantizeReport`.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from keiryo import inputs
from keiryo.compress.qconfig import Policy
from keiryo.metrics import agreement, time_models

REPORT_ATTR = "quantize_report"
# A kernel must be this much faster (geometric mean over the batch sizes timed) to replace float under auto:
# back-to-back timings on a shared CPU differ by a few percent, and a 1.03× "win" is noise, not a speed-up.
MIN_SPEEDUP = 1.1
MIN_RUNS = 3  # below this many timed runs, the call that judged the time is the only warm-up
# Slower than float at one batch size by less than this (timing noise on a shared CPU) still counts as
# "as fast": the 1.1× overall gain is the real bar.
NOISE = 0.97


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
    fastest: dict[int, str] = field(
        default_factory=dict
    )  # per batch size timed: the fastest within tolerance


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
    sizes = sorted(set(policy.batch_sizes))
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
    timed), judged from one call of each, which also warms them up (and compiles what compiles, so a
    compiled candidate's first-call cost counts against the budget); at least 1, at most `most`. Warm-up
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
    policy: Policy,
) -> nn.Module:
    """The candidate to return, with its report attached: under auto the fastest within tolerance that is
    not slower than float (`model`, BatchNorms folded) at any batch size timed, else float; a named backend's
    kernel whatever it measured (the message says when it misses the tolerance or is slower)."""
    passing = [k for k in built if candidates[k].passed]
    fastest = _fastest_per_batch(passing, candidates)
    if policy.backend != "auto":
        best = max(passing, key=lambda k: candidates[k].score) if passing else None
        if best is None:
            best = max(built, key=lambda k: candidates[k].cosine or 0.0)
        message = _forced_message(best, candidates)
        if not candidates[best].passed:  # quality is a contract: breaking it on request is said at once
            warnings.warn(f"quantize {method}: {message}", stacklevel=3)
        return _report(built, candidates, (method, layers, fastest), best, message)
    # Returned even if slower (the message says so): QAT retrained the model on purpose; fp32 is float.
    exempt = method in ("qat", "fp32")
    fast = [k for k in passing if exempt or _never_slower(candidates[k])]
    if not passing:
        return _kept_float(model, (method, layers, fastest), candidates, "no kernel stays within tolerance")
    if not fast:
        best = max(passing, key=lambda k: candidates[k].score)
        why = (
            f"no kernel within tolerance is ≥ {MIN_SPEEDUP}× faster than float and as fast at every batch "
            f"size here (best: {best}, {_speeds(candidates[best])})"
        )
        return _kept_float(model, (method, layers, fastest), candidates, why)
    best = max(fast, key=lambda k: candidates[k].score)
    c = candidates[best]
    message = (
        f"{best}: {_speeds(c)} vs float" if c.speedup else f"{best} (speed not measured: no example inputs)"
    )
    if c.speedup and c.score <= 1.0:
        message += f" (slower than float; returned because {method} was asked for)"
    return _report(built, candidates, (method, layers, fastest), best, message + _by_batch(fastest))


def _never_slower(c: Candidate) -> bool:
    """≥ MIN_SPEEDUP faster overall and not slower than float (beyond noise) at any batch size; a candidate
    that could not be timed (no example inputs) passes, and its report says it was not timed."""
    if not c.speedup:
        return True
    return c.score >= MIN_SPEEDUP and min(c.speedup.values()) >= NOISE


def _fastest_per_batch(passing: list[str], candidates: dict[str, Candidate]) -> dict[int, str]:
    """For each batch size timed, the fastest within tolerance, float included."""
    sizes = sorted({b for k in passing for b in candidates[k].speedup})
    out = {}
    for size in sizes:
        ups = {k: candidates[k].speedup[size] for k in passing if size in candidates[k].speedup}
        best = max(ups, key=ups.get) if ups else None
        out[size] = best if best is not None and ups[best] > 1.0 else "float"
    return out


def _by_batch(fastest: dict[int, str]) -> str:
    if len(set(fastest.values())) <= 1:
        return ""
    each = ", ".join(f"batch {b}: {k}" for b, k in fastest.items())
    return f"; the fastest differs by batch size ({each}): pick per batch size, or ship both"


def _speeds(c: Candidate) -> str:
    return ", ".join(f"{u:.2f}× at batch {b}" for b, u in c.speedup.items()) or "not timed"


def _forced_message(best: str, candidates: dict[str, Candidate]) -> str:
    c = candidates[best]
    message = f"{best}" + (f": {_speeds(c)} vs float" if c.speedup else " (speed not measured)")
    if not c.passed:
        message += f" — OUTSIDE the quality tolerance ({c.note or 'see candidates'}; cosine {c.cosine:.4f})"
        message += "; returned because this backend was asked for"
    elif c.speedup and c.score <= 1.0:
        message += " (slower than float; returned because this backend was asked for)"
    return message


def _report(built, candidates, what, best: str, message: str) -> nn.Module:
    method, layers, fastest = what
    c = candidates[best]
    report = QuantizeReport(
        method, c.backend, c.granularity, layers, list(candidates.values()), False, message, fastest=fastest
    )
    setattr(built[best], REPORT_ATTR, report)
    return built[best]


def _kept_float(model, what, candidates, why) -> nn.Module:
    method, layers, fastest = what
    kept = copy.deepcopy(model).eval()
    message = f"kept float: {why} on this machine (every alternative measured is listed)" + _by_batch(fastest)
    report = QuantizeReport(
        method, "float", None, layers, list(candidates.values()), True, message, fastest=fastest
    )
    setattr(kept, REPORT_ATTR, report)
    return kept
