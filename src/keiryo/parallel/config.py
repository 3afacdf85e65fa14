"""How a model is trained across workers: one small dataclass per strategy.

`keiryo.train(model, data, DDP(workers=4))` and `keiryo.train(model, data, "ddp", workers=4)` are the same
call; `strategy_of` turns the CLI's and recipes' strings into these objects. Training settings (epochs, lr,
device, precision) are not here: they are the one `TrainConfig`. A recipe step or a saved model records a
strategy as its `kind` plus `dataclasses.asdict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from keiryo.errors import ConfigError, check_whole, is_finite

SCHEDULES = ("gpipe", "1f1b")
GRAD_COMPRESSIONS = ("fp16", "bf16", "powersgd")  # DDP communication hooks; powersgd takes ":RANK"
POWERSGD_RANK = 1  # PyTorch's default matrix_approximation_rank
ASYNC_MODES = ("async", "bounded", "scaled", "dcasgd", "sync")
DEFAULT_TIMEOUT_S = 120.0


@dataclass
class Single:
    """One process, the plain loop."""

    kind: ClassVar[str] = "single"
    workers: ClassVar[int] = 1

    def validate(self) -> None:
        """Nothing to check: a single process has no options."""


@dataclass
class _ProcessGroup:
    """The fields every process-group strategy has; a base for fields only, dispatch is by the concrete type.

    `workers`: local processes (under torchrun: its WORLD_SIZE). `timeout`: seconds before a crashed or hung
    worker stops the whole run. `max_restarts`: local runs restart the workers up to N times after a worker
    dies; they resume from `TrainConfig.checkpoint` (under torchrun, use torchrun's own --max-restarts).
    """

    workers: int = 2
    timeout: float = DEFAULT_TIMEOUT_S
    max_restarts: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values that would fail once workers are started, in one line."""
        _check_workers(self.workers)
        if not is_finite(self.timeout) or self.timeout <= 0:
            raise ConfigError(f"timeout must be a number of seconds > 0, got {self.timeout}")
        check_whole("max_restarts", self.max_restarts, 0)


@dataclass
class DDP(_ProcessGroup):
    """Data parallel: `workers` processes each take a share of every batch; gradients are averaged.

    `grad_compression`: None all-reduces fp32 gradients; "fp16" or "bf16" casts them for the all-reduce
    (half the bytes); "powersgd" or "powersgd:RANK" sends rank-RANK factors of each weight matrix (PyTorch's
    PowerSGD hook with error feedback, after 10 plain steps; rank 1 by default).
    """

    kind: ClassVar[str] = "ddp"
    grad_compression: str | None = None

    def validate(self) -> None:
        """Reject values that would fail once workers are started, in one line."""
        super().validate()
        grad_compression_of(self.grad_compression)


@dataclass
class FSDP(_ProcessGroup):
    """Fully sharded data parallel: like DDP, with parameters, gradients and optimizer state sharded.

    No gradient compression: DDP's communication hooks do not apply to FSDP's reduce-scatter.
    """

    kind: ClassVar[str] = "fsdp"


@dataclass
class Pipeline(_ProcessGroup):
    """Pipeline parallel: the model cut into one stage per worker, batches fed as micro-batches.

    `split_points`: module names a new stage starts at (None: balanced by parameters); `schedule`: gpipe or
    1f1b (None: 1f1b); `microbatches`: micro-batches per batch (None: 4).
    """

    kind: ClassVar[str] = "pipeline"
    split_points: list[str] | None = None
    schedule: str | None = None
    microbatches: int | None = None

    def validate(self) -> None:
        """Reject values that would fail once workers are started, in one line."""
        super().validate()
        if self.split_points is not None and (
            isinstance(self.split_points, str) or not all(isinstance(s, str) for s in self.split_points)
        ):
            raise ConfigError(f"split_points must be a list of module names, got {self.split_points!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown pipeline schedule '{self.schedule}' (choose {' or '.join(SCHEDULES)})"
            )
        if self.microbatches is not None:
            check_whole("microbatches", self.microbatches, 1)


@dataclass
class Async:
    """Asynchronous training on a Ray parameter server with `workers` workers.

    `mode`: async (apply every push), bounded (discard pushes staler than `staleness_bound`), scaled
    (damp stale pushes), dcasgd (delay compensation with `dc_lambda`), sync (a barrier, to compare).
    The server applies the optimizer `TrainConfig` describes (optimizer, lr, weight decay, schedule), and
    one update counts as one step. `max_updates`: None runs `TrainConfig`'s epochs of the training split.
    `slowdown`: one factor ≥ 1 per worker (experiments). `on_failure`: after a worker dies, "restart"
    replaces it and "continue" goes on without it; after the parameter server dies, "restart" restarts it
    from its last checkpoint of this run (needs `TrainConfig.checkpoint`; at most 3 times) and "continue"
    ends the run in one line. `ray_address`: join that cluster (None: start a local Ray of this run's own).
    """

    kind: ClassVar[str] = "async"
    workers: int = 2
    mode: str = "async"
    staleness_bound: int = 4
    dc_lambda: float = 0.04
    max_updates: int | None = None
    time_limit: float | None = None
    target_accuracy: float | None = None
    eval_every: float = 0.5
    slowdown: list[float] | None = None
    on_failure: str = "restart"
    ray_address: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values that would fail once Ray is started, in one line."""
        _check_workers(self.workers)
        if self.mode not in ASYNC_MODES:
            raise ConfigError(f"unknown async mode '{self.mode}' (choose from {', '.join(ASYNC_MODES)})")
        check_whole("staleness_bound", self.staleness_bound, 0)
        if self.max_updates is not None:
            check_whole("max_updates", self.max_updates, 1)
        if not is_finite(self.dc_lambda) or self.dc_lambda < 0:
            raise ConfigError(f"dc_lambda must be a finite number ≥ 0, got {self.dc_lambda}")
        for name in ("time_limit", "eval_every"):
            value = getattr(self, name)
            if (value is not None or name == "eval_every") and (not is_finite(value) or value <= 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        if self.target_accuracy is not None and not (
            is_finite(self.target_accuracy) and 0 < self.target_accuracy <= 1
        ):
            raise ConfigError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")
        if self.slowdown is not None and (
            len(self.slowdown) != self.workers or not all(is_finite(v) and v >= 1 for v in self.slowdown)
        ):
            raise ConfigError(
                f"slowdown needs one factor ≥ 1 per worker ({self.workers}), got {self.slowdown}"
            )
        if self.on_failure not in ("restart", "continue"):
            raise ConfigError(f"on_failure must be restart or continue, got '{self.on_failure}'")


Strategy = Single | DDP | FSDP | Pipeline | Async
STRATEGIES: dict[str, type[Strategy]] = {c.kind: c for c in (Single, DDP, FSDP, Pipeline, Async)}


def strategy_of(strategy: str | Strategy, workers: int | None = None) -> Strategy:
    """The strategy config for a name ("ddp") or a config; `workers`, when given, sets its worker count.

    A config given with a different `workers` is refused rather than silently changed.
    """
    if isinstance(strategy, str):
        kind = STRATEGIES.get(strategy)
        if kind is None:
            raise ConfigError(f"unknown strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
        if kind is Single:
            if workers not in (None, 1):
                raise ConfigError(f"strategy 'single' runs one worker; got workers={workers}")
            return Single()
        return kind() if workers is None else kind(workers=workers)
    if not isinstance(strategy, tuple(STRATEGIES.values())):
        raise ConfigError(
            f"strategy must be a name ({', '.join(STRATEGIES)}) or a config such as DDP(workers=2), "
            f"got {type(strategy).__name__}"
        )
    strategy.validate()
    if workers is not None and workers != strategy.workers:
        raise ConfigError(f"workers={workers} differs from the strategy's own workers={strategy.workers}")
    return strategy


def grad_compression_of(value: object) -> tuple[str, int] | None:
    """("fp16", 0), ("bf16", 0) or ("powersgd", rank) for a `grad_compression` value; None for None.

    Anything else is refused in one line naming the accepted values.
    """
    if value is None:
        return None
    accepted = f"{', '.join(GRAD_COMPRESSIONS)} or powersgd:RANK (RANK a whole number ≥ 1)"
    if not isinstance(value, str):
        raise ConfigError(f"grad_compression must be {accepted}, got {value!r}")
    kind, colon, rank = value.strip().lower().partition(":")
    if kind in ("fp16", "bf16") and not colon:
        return kind, 0
    if kind == "powersgd" and not colon:
        return kind, POWERSGD_RANK
    if kind == "powersgd" and rank.isascii() and rank.isdigit() and int(rank) >= 1:
        return kind, int(rank)
    raise ConfigError(f"unknown grad_compression '{value}' (choose {accepted})")


def _check_workers(workers: object) -> None:
    check_whole("workers", workers, 1)
