"""What `keiryo.prune` is asked to do: one small dataclass per method, checked when it is made.

`Structured` removes whole channels, neurons and attention heads (a smaller dense model); `Unstructured`
zeroes single weights. A float given to `prune` means `Structured(ratio=that)`. A saved model's provenance
and a recipe step are `record(config)`: the config's `asdict` plus its kind; `method_from` reads one back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from keiryo.errors import ConfigError
from keiryo.loop import TrainConfig

IMPORTANCES = ("l1", "l2", "bn", "taylor", "activation")
TARGETS = ("channels", "params", "flops", "latency")


@dataclass
class Structured:
    """Remove `ratio` of each layer's channels/neurons/heads (or of `target`: params, FLOPs, latency).

    `importance`: "l1"/"l2" weight magnitude, "bn" batch-norm scale, "taylor" (first-order, needs data),
    "activation" (summed |activation| of each channel on the example inputs or data). `global_pruning` ranks
    channels across layers instead of per layer. `protect`: layer names (or modules) that keep their outputs,
    besides the classifier. `steps`: prune in that many increments, fine-tuning after each when asked.
    """

    kind: ClassVar[str] = "structured"
    ratio: float = 0.5
    importance: str = "l2"
    target: str = "channels"
    global_pruning: bool = False
    protect: Sequence[str | nn.Module] = ()
    steps: int = 1

    def __post_init__(self) -> None:
        _check_common(self)
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"unknown importance '{self.importance}' (choose {', '.join(IMPORTANCES)})")
        if self.target not in TARGETS:
            raise ConfigError(f"unknown pruning target '{self.target}' (choose {', '.join(TARGETS)})")


@dataclass
class Unstructured:
    """Zero `ratio` of the Linear/Conv weights, smallest magnitude first, per layer or over all of them
    (`global_pruning`); the zeros are permanent (no masks) and `keiryo.save` stores them compactly."""

    kind: ClassVar[str] = "unstructured"
    ratio: float = 0.5
    global_pruning: bool = False
    protect: Sequence[str | nn.Module] = ()
    steps: int = 1

    def __post_init__(self) -> None:
        _check_common(self)


PruneConfig = Structured | Unstructured
KINDS: dict[str, type[Structured] | type[Unstructured]] = {
    "structured": Structured,
    "unstructured": Unstructured,
}


def _check_common(config: PruneConfig) -> None:
    ratio = config.ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ConfigError(f"pruning ratio must be between 0 and 1 (exclusive), got {ratio!r}")
    steps = config.steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps (iterative pruning steps) must be a whole number ≥ 1, got {steps!r}")
    if isinstance(config.protect, (str, nn.Module)):
        config.protect = (config.protect,)


def method_of(method: float | PruneConfig) -> PruneConfig:
    """The config `prune` runs: a config as given, a float as `Structured(ratio=method)`."""
    if isinstance(method, (Structured, Unstructured)):
        return method
    if isinstance(method, bool) or not isinstance(method, (int, float)):
        raise ConfigError(
            f"prune method must be a ratio or a Structured/Unstructured config, got {type(method).__name__}"
        )
    return Structured(ratio=method)


def method_from(options: Mapping[str, object]) -> PruneConfig:
    """The config a recipe step, CLI options or a saved record name: {"kind": "structured"|"unstructured",
    field: value, ...}. Unstructured pruning is by magnitude: importance l1/l2 and target channels/params
    mean the same for it and are accepted; anything else is refused in one line."""
    fields = dict(options)
    kind = fields.pop("kind", "structured")
    if kind not in KINDS:
        raise ConfigError(f"unknown pruning kind '{kind}' (choose {', '.join(KINDS)})")
    if kind == "unstructured":
        importance, target = fields.pop("importance", "l2"), fields.pop("target", "channels")
        if target not in ("channels", "params") or importance not in ("l1", "l2"):
            raise ConfigError(
                f"unstructured pruning zeroes the smallest weights; target '{target}' and importance "
                f"'{importance}' need structured pruning"
            )
    known = {f.name for f in dataclasses.fields(KINDS[kind])}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(
            f"unknown {kind} pruning option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    return KINDS[kind](**fields)


def record(config: PruneConfig, protected: Sequence[str]) -> dict:
    """The config as provenance: its kind and fields, `protect` as the layer names it resolved to."""
    return {"kind": config.kind, **dataclasses.asdict(dataclasses.replace(config, protect=list(protected)))}


def check_options(
    method: float | PruneConfig,
    finetune: TrainConfig | None = None,
    *,
    has_data: bool = True,
    has_teacher: bool = False,
) -> PruneConfig:
    """The config to run, after refusing in one line, before any work, what `prune` cannot run."""
    config = method_of(method)
    if finetune is not None and not isinstance(finetune, TrainConfig):
        raise ConfigError(f"finetune must be a keiryo.loop.TrainConfig, got {type(finetune).__name__}")
    if not has_data:
        if getattr(config, "importance", None) == "taylor":
            raise ConfigError("importance 'taylor' needs data (a few batches of gradients); pass data=")
        if finetune is not None:
            raise ConfigError("fine-tuning needs data; pass data= (e.g. 'digits')")
    if has_teacher and finetune is None:
        raise ConfigError("a teacher is used while fine-tuning; pass finetune=TrainConfig(epochs=...)")
    return config
