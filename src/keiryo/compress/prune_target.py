"""Targets other than channels: the channel ratio that removes a fraction of params, FLOPs or latency.

Found by bisection on pruned copies (one-shot, no fine-tuning); latency is timed interleaved in this process.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from torch import nn

from keiryo import inputs as model_io
from keiryo.compress.prune_checks import PRUNABLE
from keiryo.compress.prune_graph import PruneJob, attention_modules, prune_structured
from keiryo.errors import ConfigError, ModelError
from keiryo.metrics import batch_of, count_flops, count_parameters, time_models

LATENCY_BATCH = 64


def max_channel_ratio(model: nn.Module, protected: list[str]) -> float:
    """The largest channel ratio that leaves every prunable layer (and attention module) a channel (head)."""
    widths = [m.num_heads for m in attention_modules(model)]
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE) and name not in protected:
            widths.append(module.out_features if isinstance(module, nn.Linear) else module.out_channels)
    narrowest = min((w for w in widths if w > 1), default=None)  # 1-wide layers are never pruned
    return 1 - 1 / narrowest - 1e-6 if narrowest else 1 - 1e-6


def channel_ratio_for(model: nn.Module, ratio: float, target: str, job: PruneJob, limit: float) -> float:
    """The channel ratio removing `ratio` of the params, FLOPs or measured latency (bisection on copies)."""
    if target == "params":
        base = count_parameters(model)[0]
        metric = lambda m: count_parameters(m)[0] / base  # noqa: E731
    elif target == "flops":
        base = count_flops(model, job.example)
        if not base:
            raise ModelError("cannot count the model's FLOPs, so target 'flops' is not available")
        metric = lambda m: count_flops(m, job.example) / base  # noqa: E731
    else:
        batch = batch_of(job.example, LATENCY_BATCH)
        metric = lambda m: _latency_ratio(m, model, batch)  # noqa: E731
    one_shot = replace(job, steps=1)

    def remaining(channel_ratio: float) -> float:
        trial = copy.deepcopy(model)
        prune_structured(trial, channel_ratio, one_shot)
        return metric(trial)

    goal, low, high = 1 - ratio, 0.0, limit
    if remaining(high) > goal:
        raise ConfigError(
            f"cannot remove {ratio:.0%} of the {target}: at most {1 - remaining(high):.0%} with the "
            "protected layers kept (lower the ratio or protect less)"
        )
    for _ in range(7 if target == "latency" else 10):
        mid = (low + high) / 2
        low, high = (low, mid) if remaining(mid) <= goal else (mid, high)
    return high


def _latency_ratio(candidate: nn.Module, reference: nn.Module, batch: model_io.Example) -> float:
    """Candidate p50 / reference p50, timed interleaved in this process."""
    times = time_models({"reference": reference, "candidate": candidate}, batch, runs=20, warmup=5)
    return times["candidate"].p50_ms / times["reference"].p50_ms
