"""Asynchronous data parallel: a Ray parameter server that slow or failing workers cannot stall.

`train_async` starts the server and `strategy.workers` workers (`ps_actors`), restarts a worker that dies
(or goes on without it), evaluates as it goes, and stops at the update budget, a time limit, a target
accuracy or, as `fit` does, after `patience` epochs without a better validation score (the best epoch's
weights are kept). The optimizer, learning rate, schedule, batch size and epochs are the user's
`TrainConfig`, the same as every other strategy's, so switching strategy does not change what is trained: an
epoch is ⌈samples / batch size⌉ updates and the history has one line per epoch. Training runs on CPU.

Ray starts locally (embedded, loopback only, quiet; see `ray_setup`) unless `strategy.ray_address` names a
cluster; workers are spread over its nodes. Run from the CLI: ``keiryo train --strategy async --workers 4``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from keiryo.checkpoints import ASYNC_CHECKPOINT_FORMAT, load_checkpoint
from keiryo.data import DataSplits, tensors_of
from keiryo.errors import ConfigError, TrainingError
from keiryo.loop import EpochLog, LossFn, TrainConfig, TrainResult, classification_loss, evaluate
from keiryo.parallel.config import Async
from keiryo.parallel.ps_actors import ParameterServer, Plan, PSWorker
from keiryo.parallel.ray_setup import quiet_ray, ray_init

MAX_SERVER_RESTARTS = 3  # a server that keeps dying ends the run


@dataclass
class AsyncResult:
    """The trained model, one history line per epoch, the server's counters and the accuracy curve."""

    model: nn.Module
    history: list[EpochLog] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    timeline: list[dict] = field(default_factory=list)  # {"seconds", "version", "val_accuracy", "loss"}
    restarts: int = 0
    best_epoch: int | None = None  # the epoch whose weights the model holds (None: the last)
    server_restarts: list[int] = field(default_factory=list)  # the update each restarted server began at


def run(
    model: nn.Module,
    splits: DataSplits,
    strategy: Async,
    config: TrainConfig,
    loss_fn: LossFn = classification_loss,
) -> TrainResult:
    """`keiryo.train`'s async strategy: `train_async`, reported as every strategy reports (one line per
    epoch); the server's counters stay with `train_async`."""
    result = train_async(model, splits, strategy, config, loss_fn)
    return TrainResult(model=result.model, history=result.history, best_epoch=result.best_epoch)


def train_async(
    model: nn.Module,
    splits: DataSplits,
    strategy: Async,
    config: TrainConfig,
    loss_fn: LossFn = classification_loss,
    on_tick: Callable[[dict], None] | None = None,
) -> AsyncResult:
    """Train `model` with a parameter server and `strategy.workers` workers; returns it with its history.

    `on_tick(ctx)` is called at every driver check with the live worker handles, the server's handle and
    its stats (ctx keys: "workers", "server", "stats", "seconds"); tests use it to kill an actor mid-run.
    A dead parameter server is restarted from its last checkpoint of this run (`on_failure="restart"` and a
    `config.checkpoint`; at most MAX_SERVER_RESTARTS times): the update count goes on from the checkpoint's.
    Otherwise it ends the run with a one-line TrainingError that says how to resume.
    """
    import ray

    config.validate()
    strategy.validate()
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters")
    steps = math.ceil(len(splits.train) / config.batch_size)
    batch = math.ceil(config.batch_size / strategy.workers) if strategy.mode == "sync" else config.batch_size
    plan = Plan(strategy.max_updates or steps * config.epochs_for(steps), steps, batch, uuid.uuid4().hex)
    resume = config.resume and config.checkpoint and Path(config.checkpoint).exists()
    state = load_checkpoint(config.checkpoint, ASYNC_CHECKPOINT_FORMAT) if resume else None
    with quiet_ray():
        started_ray = ray_init(strategy.ray_address)
        try:
            return _run(model, splits, strategy, config, plan, loss_fn, on_tick, state)
        finally:
            if started_ray:
                ray.shutdown()


def _placement(worker_id: int) -> object:
    """Worker `worker_id`'s node: the cluster's live nodes in turn. The affinity is hard because Ray places
    an actor that asks for no resources (ours ask for num_cpus=0) on a random node unless its node affinity
    is hard: a soft one was ignored, and 1 run in 8 put all four workers on one node. Should the node die
    before the worker starts, the worker fails unschedulable and its restart picks among the live nodes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    if len(nodes) < 2:
        return "DEFAULT"
    return NodeAffinitySchedulingStrategy(node_id=nodes[worker_id % len(nodes)], soft=False)


def _run(model, splits, strategy, config, plan, loss_fn, on_tick, state) -> AsyncResult:
    """The driver: start the server and the workers, restart failed workers (and a failed server, from its
    checkpoint), evaluate, stop, collect."""
    import ray
    from ray.exceptions import RayActorError

    server_cls = ray.remote(num_cpus=0, max_concurrency=1000)(ParameterServer)
    worker_cls = ray.remote(num_cpus=0, max_restarts=0)(PSWorker)
    inputs, targets = tensors_of(splits.train)
    shards = [
        (inputs[i :: strategy.workers], targets[i :: strategy.workers]) for i in range(strategy.workers)
    ]
    torch.manual_seed(config.seed)

    def start(server, worker_id: int) -> tuple:
        handle = worker_cls.options(scheduling_strategy=_placement(worker_id)).remote(
            worker_id, copy.deepcopy(model).cpu(), *shards[worker_id], plan, config.seed
        )
        slowdown = strategy.slowdown[worker_id] if strategy.slowdown else 1.0
        return handle, handle.run.remote(server, loss_fn, slowdown)

    drive = _Drive(_History(config.patience), _LiveLine(config.progress), {"version": _version(state)})
    drive.run_id, drive.first_state = plan.run_id, state
    evaluator = copy.deepcopy(model).cpu().eval()
    begin = time.perf_counter()
    try:
        while True:
            drive.server = server_cls.remote(copy.deepcopy(model).cpu(), strategy, config, plan, state)
            drive.running = {i: start(drive.server, i) for i in range(strategy.workers)}
            try:
                _train(drive, strategy, splits, loss_fn, evaluator, begin, on_tick, start)
                final = _collect(drive, config, splits, loss_fn, evaluator)
                break
            except RayActorError as exc:  # worker failures are handled in _train: the server itself is gone
                state = _restart_state(config, strategy, drive, exc)
                _kill([h for h, _ in drive.running.values()] + [drive.server])
                drive.running = {}
                drive.server_restarts.append(_version(state))
                drive.history.rewind(_version(state) // plan.steps_per_epoch)
                drive.line.say(
                    f"the parameter server died at update {drive.stats['version']}; restarted it from "
                    + (f"its checkpoint at update {_version(state)}" if state else "the start")
                )
        history = drive.history
        last = history.lines[-1].epoch if history.lines else None
        best = history.best_state if history.best_epoch != last else None
        model.load_state_dict(best if best is not None else final)
    finally:
        drive.line.close()
        _kill([h for h, _ in drive.running.values()] + ([drive.server] if drive.server else []))
    if drive.stats["version"] == 0:
        raise TrainingError("every async worker failed before the first update")
    history = drive.history
    best_epoch = history.best_epoch if history.best_state is not None else None
    return AsyncResult(
        model.eval(),
        history.lines,
        drive.stats,
        drive.timeline,
        drive.restarts,
        best_epoch,
        drive.server_restarts,
    )


def _collect(drive: _Drive, config: TrainConfig, splits, loss_fn, evaluator) -> dict:
    """Once the workers are done: the last (short) epoch's line, the final stats and checkpoint; returns the
    server's final weights."""
    import ray

    server = drive.server
    ray.get(server.finish_epoch.remote())
    drive.history.add(ray.get(server.take_epochs.remote()), evaluator, splits, loss_fn)
    drive.stats = ray.get(server.stats.remote())
    if config.checkpoint:
        ray.get(server.save.remote(config.checkpoint))
    return ray.get(server.state_dict.remote())


@dataclass
class _Drive:
    """What the driver keeps over the run, across server restarts."""

    history: _History
    line: _LiveLine
    stats: dict
    server: object = None  # the live server's actor handle
    running: dict = field(default_factory=dict)  # worker id -> (actor handle, its run() ref)
    timeline: list[dict] = field(default_factory=list)
    restarts: int = 0
    server_restarts: list[int] = field(default_factory=list)
    run_id: str = ""  # the server writes it into its checkpoints: a restart takes only this run's
    first_state: dict | None = None  # the state the run began with (a --resume checkpoint, or None)


def _train(drive: _Drive, strategy, splits, loss_fn, evaluator, begin, on_tick, start) -> None:
    """Run until every worker has returned: restart failed workers, evaluate, stop at a target; a dead server
    raises RayActorError out of here."""
    import ray
    from ray.exceptions import ActorUnschedulableError, RayActorError, RayTaskError

    server, running = drive.server, drive.running
    ray.get(server.set_live.remote(list(running)))
    while running:  # workers return once the server is done (or all have failed for good)
        refs = {ref: wid for wid, (_, ref) in running.items()}
        finished, _ = ray.wait(list(refs), num_returns=len(refs), timeout=strategy.eval_every)
        for ref in finished:
            wid = refs[ref]
            try:
                ray.get(ref)
                del running[wid]
            except (RayActorError, RayTaskError, ActorUnschedulableError):
                del running[wid]
                if strategy.on_failure == "restart" and not ray.get(server.stats.remote())["done"]:
                    running[wid] = start(server, wid)
                    drive.restarts += 1
                ray.get(server.set_live.remote(list(running)))
        drive.stats = stats = ray.get(server.stats.remote())
        seconds = time.perf_counter() - begin
        drive.history.add(ray.get(server.take_epochs.remote()), evaluator, splits, loss_fn)
        evaluator.load_state_dict(ray.get(server.state_dict.remote()))
        val_acc = evaluate(evaluator, splits.val, loss_fn=loss_fn)[1] if len(splits.val) else None
        drive.timeline.append(
            {"seconds": seconds, "version": stats["version"], "val_accuracy": val_acc, "loss": stats["loss"]}
        )
        drive.line.update(stats, seconds, val_acc)
        if on_tick is not None:
            handles = {w: h for w, (h, _) in running.items()}
            on_tick({"workers": handles, "server": server, "stats": stats, "seconds": seconds})
        target_hit = strategy.target_accuracy is not None and (val_acc or 0.0) >= strategy.target_accuracy
        out_of_time = strategy.time_limit is not None and seconds >= strategy.time_limit
        if target_hit or out_of_time or drive.history.stopped:
            ray.get(server.request_stop.remote())


def _restart_state(config: TrainConfig, strategy: Async, drive: _Drive, error: BaseException) -> dict | None:
    """The state to restart a dead server from: its last checkpoint of this run (or, before it wrote one, the
    state this run began with). Without a checkpoint, with on_failure="continue" or after
    MAX_SERVER_RESTARTS restarts, the run ends with the one-line TrainingError instead."""
    if (
        strategy.on_failure != "restart"
        or not config.checkpoint
        or len(drive.server_restarts) >= MAX_SERVER_RESTARTS
    ):
        raise TrainingError(_server_died(config, drive, error)) from None
    if not Path(config.checkpoint).exists():
        return drive.first_state
    saved = load_checkpoint(config.checkpoint, ASYNC_CHECKPOINT_FORMAT)
    return saved if saved.get("run") == drive.run_id else drive.first_state


def _version(state: dict | None) -> int:
    return state["version"] if state else 0


def _kill(handles: list) -> None:
    import ray

    for handle in handles:
        with contextlib.suppress(Exception):
            ray.kill(handle)


class _History:
    """The run's epoch lines, and its best epoch on validation as `fit` keeps it: a higher accuracy, or the
    same with a lower loss (regression: lower loss); `patience` epochs without a better one stop the run."""

    def __init__(self, patience: int | None) -> None:
        self.lines: list[EpochLog] = []
        self.patience, self.stopped = patience, False
        self.best_epoch: int | None = None
        self.best_score: tuple[float, ...] | None = None
        self.best_state: dict | None = None

    def add(self, epochs: list[dict], evaluator: nn.Module, splits: DataSplits, loss_fn: LossFn) -> None:
        """Lines for the epochs the server finished: its training figures, validation on its weights."""
        for epoch in epochs:
            val_loss = val_acc = None
            if len(splits.val):
                evaluator.load_state_dict(epoch["state"])
                val_loss, val_acc = evaluate(evaluator, splits.val, loss_fn=loss_fn)
            line = EpochLog(
                epoch=epoch["epoch"],
                train_loss=epoch["train_loss"],
                train_accuracy=epoch["train_accuracy"],
                val_loss=val_loss,
                val_accuracy=val_acc,
                seconds=epoch["seconds"],
            )
            self.lines.append(line)
            self._track(line, epoch["state"])

    def rewind(self, epochs: int) -> None:
        """Drop the lines after the first `epochs` epochs: a restarted server trains them again (the best
        weights seen so far stay the best candidate)."""
        self.lines = [line for line in self.lines if line.epoch <= epochs]

    def _track(self, line: EpochLog, state: dict) -> None:
        if self.patience is None or line.val_loss is None or not math.isfinite(line.val_loss):
            return
        score = (-line.val_loss,) if line.val_accuracy is None else (line.val_accuracy, -line.val_loss)
        if self.best_score is None or score > self.best_score:
            self.best_epoch, self.best_score, self.best_state = line.epoch, score, state
            return
        self.stopped = self.stopped or line.epoch - self.best_epoch >= self.patience


def _server_died(config: TrainConfig, drive: _Drive, error: BaseException) -> str:
    """One line: the server died, when (after how many restarts), and what can be resumed."""
    restarted = f", after {len(drive.server_restarts)} restarts" if drive.server_restarts else ""
    what = f"the parameter server died ({type(error).__name__}; last seen at update {drive.stats['version']}"
    what += f"{restarted})"
    if config.checkpoint and Path(config.checkpoint).exists():
        saved = load_checkpoint(config.checkpoint, ASYNC_CHECKPOINT_FORMAT)
        if saved.get("run") != drive.run_id and drive.first_state is None:
            return f"{what}; nothing of this run to resume from ('{config.checkpoint}' is another run's)"
        return f"{what}; rerun with --resume to continue from its checkpoint at update {saved['version']}"
    return f"{what}; nothing to resume from (pass --checkpoint to keep one)"


class _LiveLine:
    """One live status line: updates/s, staleness, loss, accuracy and pushes per worker; kept at the end."""

    def __init__(self, enabled: bool) -> None:
        self.live, self.text = None, ""
        if enabled:
            from rich.live import Live

            self.live = Live("", refresh_per_second=4, transient=True)
            self.live.__enter__()

    def update(self, stats: dict, seconds: float, val_acc: float | None) -> None:
        if self.live is None:
            return
        rate = stats["version"] / seconds if seconds else 0.0
        pushes = " ".join(f"w{w}:{n}" for w, n in sorted(stats["pushes"].items()))
        acc = f"  val acc {val_acc:.1%}" if val_acc is not None else ""
        self.text = (
            f"updates {stats['version']} ({rate:.0f}/s)  staleness mean {stats['staleness_mean']:.1f} "
            f"max {stats['staleness_max']}  loss {stats['loss']:.4f}{acc}  pushes {pushes}"
        )
        self.live.update(self.text)

    def say(self, text: str) -> None:
        """A line that stays, above the live one."""
        if self.live is not None:
            self.live.console.print(text, highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            if self.text:
                self.live.console.print(self.text, highlight=False)
