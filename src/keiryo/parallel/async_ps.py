"""Asynchronous data parallel: a Ray parameter server that slow or failing workers cannot stall.

One actor holds the parameters and the optimizer; N worker actors loop pull → gradient on their shard → push,
tagged with the version they pulled. The server applies each push at once (staleness = current version −
pulled version), or controls staleness by mode:

- ``async``   pure asynchronous SGD: every push is applied;
- ``bounded`` stale-synchronous: a push staler than S is discarded (never applied), and a worker more than S
  pushes ahead of the slowest live worker waits before its next pull;
- ``scaled``  the gradient is scaled by 1 / (1 + staleness);
- ``dcasgd``  delay compensation (Zheng et al. 2017): g + λ·g⊙g⊙(w_now − w_pulled);
- ``sync``    a barrier: one averaged update per round of all live workers, for side-by-side comparison.

Ray starts locally (embedded) unless `ray_address` names a cluster; workers are spread over its nodes. A
local Ray listens on 127.0.0.1 only, without a dashboard, with token authentication on, and its log lines stay
in its own files (Ray's banners and worker errors do not reach the terminal); it is shut down when the run
ends, however it ends. A run that joins a cluster says on stderr whether token authentication is on.
Run from the CLI: ``keiryo train --strategy async --workers 4``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from keiryo.data import DataSplits, tensors_of
from keiryo.errors import ArtifactError, ConfigError, KeiryoError, TrainingError, one_line
from keiryo.fileio import atomic_torch_save, safe_torch_load

MODES = ("async", "bounded", "scaled", "dcasgd", "sync")
CHECKPOINT_FORMAT = "keiryo-async-checkpoint/1"


@dataclass
class AsyncConfig:
    """How the parameter server and its workers run."""

    workers: int = 4
    mode: str = "async"
    staleness_bound: int = 4  # S, for mode "bounded"
    dc_lambda: float = 0.04  # λ, for mode "dcasgd"
    lr: float = 0.05
    momentum: float = 0.0
    batch_size: int = 32
    max_updates: int = 2000  # server versions (applied updates) before the run stops
    time_limit: float | None = None  # seconds
    target_accuracy: float | None = None  # stop once validation accuracy reaches it
    eval_every: float = 0.5  # seconds between validation checks on the driver
    slowdown: list[float] | None = None  # per-worker factor ≥ 1: a worker k× slower than its compute
    on_failure: str = "restart"  # restart | continue
    checkpoint: str | None = None
    checkpoint_every: int = 200  # updates
    resume: bool = False
    ray_address: str | None = None
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown async mode '{self.mode}' (choose from {', '.join(MODES)})")
        if self.workers < 1:
            raise ConfigError(f"workers must be ≥ 1, got {self.workers}")
        if self.slowdown is not None and (len(self.slowdown) != self.workers or min(self.slowdown) < 1):
            raise ConfigError(
                f"slowdown needs one factor ≥ 1 per worker ({self.workers}), got {self.slowdown}"
            )
        if self.on_failure not in ("restart", "continue"):
            raise ConfigError(f"on_failure must be restart or continue, got '{self.on_failure}'")
        if self.staleness_bound < 0 or self.max_updates < 1 or not self.lr > 0:
            raise ConfigError("staleness_bound must be ≥ 0, max_updates ≥ 1 and lr > 0")


@dataclass
class AsyncResult:
    """The trained model, the server's counters and the accuracy-over-time curve."""

    model: nn.Module
    stats: dict
    timeline: list[dict] = field(default_factory=list)  # {"seconds", "version", "val_accuracy", "loss"}
    restarts: int = 0


class ParameterServer:
    """Ray actor (async methods run concurrently): parameters, optimizer, version and staleness control."""

    def __init__(self, model: nn.Module, config: dict, state: dict | None = None) -> None:
        torch.set_num_threads(1)
        self.cfg = AsyncConfig(**config)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=self.cfg.lr, momentum=self.cfg.momentum)
        self.version = self.accepted = self.discarded = 0
        self.staleness_sum, self.staleness_max = 0, 0
        self.pushes: dict[int, int] = {}
        self.live: set[int] = set()
        self.pulled: dict[int, list[Tensor]] = {}
        self.round: list[list[Tensor]] = []
        self.round_done = asyncio.Event()
        self.stop = False
        self.losses: list[float] = []
        self.nodes: dict[int, str] = {}
        if state is not None:
            model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.version = self.accepted = state["version"]

    def set_live(self, worker_ids: list[int]) -> None:
        self.live = set(worker_ids)
        for w in self.live:
            self.pushes.setdefault(w, 0)
        if self.cfg.mode == "sync" and self.round and len(self.round) >= len(self.live):
            self._apply_round()

    def register(self, worker_id: int, node_id: str) -> None:
        """Where a worker runs (a Ray node id), reported in the stats."""
        self.nodes[worker_id] = node_id

    def request_stop(self) -> None:
        self.stop = True
        self.round_done.set()

    async def pull(self, worker_id: int) -> tuple[int, list[Tensor]] | None:
        """Current version and parameters; in bounded mode a worker too far ahead waits first."""
        if self.cfg.mode == "bounded":
            while not self._done() and self._ahead(worker_id) > self.cfg.staleness_bound:
                await asyncio.sleep(0.001)
        if self._done():
            return None
        snapshot = [p.detach().clone() for p in self.params]
        if self.cfg.mode == "dcasgd":
            self.pulled[worker_id] = snapshot
        return self.version, snapshot

    async def push(self, worker_id: int, pulled_version: int, grads: list[Tensor], loss: float) -> bool:
        """Apply (or, by mode, scale, compensate, discard or wait for the round); False means stop."""
        if self._done() or worker_id not in self.live:
            return False
        staleness = self.version - pulled_version
        if self.cfg.mode == "bounded" and staleness > self.cfg.staleness_bound:
            self.discarded += 1
            return True
        self.pushes[worker_id] = self.pushes.get(worker_id, 0) + 1
        self.losses.append(loss)
        if self.cfg.mode == "sync":
            self.round.append(grads)
            event = self.round_done
            if len(self.round) >= len(self.live):
                self._apply_round()
            else:
                await event.wait()
            return not self._done()
        if self.cfg.mode == "scaled":
            grads = [g / (1 + staleness) for g in grads]
        elif self.cfg.mode == "dcasgd":
            backup = self.pulled.pop(worker_id, None)
            if backup is not None:
                lam = self.cfg.dc_lambda
                grads = [
                    g + lam * g * g * (p.detach() - b)
                    for g, p, b in zip(grads, self.params, backup, strict=True)
                ]
        self._apply(grads)
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)
        return not self._done()

    def _apply_round(self) -> None:
        grads = [torch.stack(gs).mean(0) for gs in zip(*self.round, strict=True)]
        self.round = []
        self._apply(grads)
        event, self.round_done = self.round_done, asyncio.Event()
        event.set()

    def _apply(self, grads: list[Tensor]) -> None:
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.opt.step()
        self.version += 1
        self.accepted += 1
        if self.cfg.checkpoint and self.version % self.cfg.checkpoint_every == 0:
            self.save(self.cfg.checkpoint)

    def _ahead(self, worker_id: int) -> int:
        live = [self.pushes.get(w, 0) for w in self.live] or [0]
        return self.pushes.get(worker_id, 0) - min(live)

    def _done(self) -> bool:
        return self.stop or self.version >= self.cfg.max_updates

    def save(self, path: str) -> None:
        """Atomic checkpoint of everything a resumed run needs."""
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "version": self.version,
            },
            path,
        )

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def stats(self) -> dict:
        applied = self.accepted if self.cfg.mode != "sync" else 0
        return {
            "version": self.version,
            "accepted": self.accepted,
            "discarded": self.discarded,
            "staleness_mean": self.staleness_sum / applied if applied else 0.0,
            "staleness_max": self.staleness_max,
            "pushes": dict(self.pushes),
            "loss": sum(self.losses[-50:]) / len(self.losses[-50:]) if self.losses else math.nan,
            "done": self._done(),
            "nodes": dict(self.nodes),
        }


class Worker:
    """Ray actor: pull → gradient on its own shard → push, until the server says stop."""

    def __init__(
        self, worker_id: int, model: nn.Module, inputs: Tensor, targets: Tensor, config: dict
    ) -> None:
        torch.set_num_threads(1)
        self.id, self.model, self.inputs, self.targets = worker_id, model, inputs, targets
        self.cfg = AsyncConfig(**config)
        self.slowdown = (self.cfg.slowdown or [1.0] * self.cfg.workers)[worker_id]
        self.generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + worker_id)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def run(self, server, loss_fn: Callable) -> int:
        """Loop until the server says stop; a worker with slowdown k takes k times as long per iteration."""
        import ray

        steps = 0
        ray.get(server.register.remote(self.id, ray.get_runtime_context().get_node_id()))
        while True:
            started = time.perf_counter()
            pulled = ray.get(server.pull.remote(self.id))
            if pulled is None:
                return steps
            version, values = pulled
            with torch.no_grad():
                for p, v in zip(self.params, values, strict=True):
                    p.copy_(v)
            idx = torch.randint(len(self.inputs), (self.cfg.batch_size,), generator=self.generator)
            self.model.train()
            self.model.zero_grad(set_to_none=True)
            loss, _ = loss_fn(self.model, self.inputs[idx], self.targets[idx])
            loss.backward()
            grads = [p.grad.detach().clone() for p in self.params]
            steps += 1
            go_on = ray.get(server.push.remote(self.id, version, grads, float(loss)))
            if self.slowdown > 1:
                time.sleep((self.slowdown - 1) * (time.perf_counter() - started))
            if not go_on:
                return steps


def _ray_init(address: str | None) -> bool:
    """Start a Ray of this run's own (or join `address`) unless already connected; True when this call
    started it.

    A local Ray is kept on the loopback address with Ray's own switch for single-machine clusters
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by every Ray process it starts), so that an embedded run never
    listens on the machine's network interfaces. Token authentication is Ray's default for a cluster it
    starts; `_quiet_ray` keeps its banner off the terminal.
    """
    import ray

    if ray.is_initialized():
        return False
    options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with _quiet_ray():
            if address is None:
                with _loopback_only():
                    # "local": a new Ray of this run's own, never one found running on the machine
                    ray.init("local", num_cpus=2, _node_ip_address="127.0.0.1", **options)
            else:
                _check_reachable(address)
                _auth_for_cluster()
                ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at '{address}'" if address else "a local Ray"
        raise KeiryoError(f"cannot start {where}: {one_line(exc)}") from exc
    if address is not None:
        auth = os.environ.get("RAY_AUTH_MODE", "disabled")
        note = (
            "token authentication on"
            if auth == "token"
            else "token authentication OFF: anyone who reaches the cluster can run code on it "
            "(start it with RAY_AUTH_MODE=token)"
        )
        print(f"note: joined the Ray cluster at {address}, {note}", file=sys.stderr)
    return True


def _check_reachable(address: str) -> None:
    """Fail in one line at once when nothing answers at `address` (host:port, or ray://host:port): Ray
    itself retries for minutes and prints a warning every few seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise KeiryoError(
            f"cannot reach the Ray cluster at '{address}': {exc.strerror or type(exc).__name__}; "
            "check --ray-address (the head's host:port, e.g. 10.0.0.5:6379)"
        ) from None


def _auth_for_cluster() -> None:
    """Keep token authentication on when joining a cluster: Ray enables it by itself only for a cluster it
    finds on its own, so keiryo asks Ray to when RAY_AUTH_MODE is unset and a token is at hand."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:  # Ray's own switch (private): sets RAY_AUTH_MODE=token and reloads Ray's cached config
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's "no cluster" switch, on while a local Ray starts: its processes inherit the variable, and the
    driver's already-imported constant is set too (it was read when ray was first imported)."""
    import ray._private.ray_constants as constants

    name = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    before, flag = os.environ.get(name), getattr(constants, "ENABLE_RAY_CLUSTER", True)
    os.environ[name] = "0"
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = flag
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def _quiet_ray() -> Iterator[None]:
    """Keep Ray's own messages off the terminal unless KEIRYO_DEBUG is set: keiryo reports what went wrong
    itself, in one line, and Ray's session folder keeps its logs.

    Two channels: Ray's Python loggers (banners, warnings), and the driver thread that prints the errors the
    raylet publishes (a dead actor's "(raylet) A worker died..." paragraph) straight to stdout; that one has
    no switch, so its printer is swapped for a debug log line while keiryo runs.
    """
    if os.environ.get("KEIRYO_DEBUG"):
        yield
        return
    import ray._private.worker as ray_worker

    ray_logger = logging.getLogger("ray")
    level, propagate = ray_logger.level, ray_logger.propagate
    printer = getattr(ray_worker, "print_to_stdstream", None)
    ray_logger.setLevel(logging.CRITICAL + 1)
    ray_logger.propagate = False
    if printer is not None:
        ray_worker.print_to_stdstream = _to_debug_log
    try:
        yield
    finally:
        ray_logger.setLevel(level)
        ray_logger.propagate = propagate
        if printer is not None:
            ray_worker.print_to_stdstream = printer


def _to_debug_log(data: dict, ignore_prefix: bool = False) -> None:
    logging.getLogger("ray").debug("(%s) %s", data.get("pid"), " ".join(data.get("lines", [])))


def load_checkpoint(path: str | Path) -> dict:
    """A parameter-server checkpoint, loaded safely."""
    ckpt = safe_torch_load(path, what="checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"checkpoint '{path}' is not a keiryo parameter-server checkpoint")
    return ckpt


def train_async(
    model: nn.Module,
    splits: DataSplits,
    config: AsyncConfig,
    *,
    loss_fn: Callable | None = None,
    on_tick: Callable[[dict], None] | None = None,
) -> AsyncResult:
    """Train `model` with a parameter server and `config.workers` workers; returns it with the curve.

    `on_tick(ctx)` is called at every driver check with the live worker handles, the server's handle and
    its stats (ctx keys: "workers", "server", "stats", "seconds"); tests use it to kill an actor mid-run.
    A dead parameter server ends the run with a one-line TrainingError that says how to resume.
    """
    import ray

    config.validate()
    loss_fn = loss_fn or _default_loss()
    resume = config.resume and config.checkpoint and Path(config.checkpoint).exists()
    state = load_checkpoint(config.checkpoint) if resume else None
    with _quiet_ray():
        started_ray = _ray_init(config.ray_address)
        try:
            return _run(model, splits, config, loss_fn, on_tick, state)
        finally:
            if started_ray:
                ray.shutdown()


def _default_loss() -> Callable:
    from keiryo.loop import classification_loss

    return classification_loss


def _run(model, splits, config, loss_fn, on_tick, state) -> AsyncResult:
    """The driver: start the server and the workers, restart failed workers, evaluate, stop, collect."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from keiryo.metrics import accuracy

    cfg = asdict(config)
    server_cls = ray.remote(num_cpus=0, max_concurrency=1000)(ParameterServer)
    worker_cls = ray.remote(num_cpus=0, max_restarts=0)(Worker)
    inputs, targets = tensors_of(splits.train)
    shards = [(inputs[i :: config.workers], targets[i :: config.workers]) for i in range(config.workers)]
    torch.manual_seed(config.seed)
    server = server_cls.remote(copy.deepcopy(model).cpu(), cfg, state)

    def start(worker_id: int):
        handle = worker_cls.options(scheduling_strategy="SPREAD").remote(
            worker_id, copy.deepcopy(model).cpu(), *shards[worker_id], cfg
        )
        return handle, handle.run.remote(server, loss_fn)

    running: dict = {}
    timeline, restarts, begin = [], 0, time.perf_counter()
    stats = {"version": state["version"] if state else 0}
    evaluator = copy.deepcopy(model).cpu().eval()
    line = _LiveLine(config.progress)
    try:
        running.update({i: start(i) for i in range(config.workers)})
        ray.get(server.set_live.remote(list(running)))
        while True:
            refs = {ref: wid for wid, (_, ref) in running.items()}
            finished, _ = ray.wait(list(refs), num_returns=len(refs), timeout=config.eval_every)
            for ref in finished:
                wid = refs[ref]
                try:
                    ray.get(ref)
                    del running[wid]
                except (RayActorError, RayTaskError):
                    del running[wid]
                    if config.on_failure == "restart" and not ray.get(server.stats.remote())["done"]:
                        running[wid] = start(wid)
                        restarts += 1
                    ray.get(server.set_live.remote(list(running)))
            stats = ray.get(server.stats.remote())
            seconds = time.perf_counter() - begin
            evaluator.load_state_dict(ray.get(server.state_dict.remote()))
            val_acc = accuracy(evaluator, splits.val) if len(splits.val) else None
            timeline.append(
                {
                    "seconds": seconds,
                    "version": stats["version"],
                    "val_accuracy": val_acc,
                    "loss": stats["loss"],
                }
            )
            line.update(stats, seconds, val_acc)
            if on_tick is not None:
                workers = {w: h for w, (h, _) in running.items()}
                on_tick({"workers": workers, "server": server, "stats": stats, "seconds": seconds})
            target_hit = config.target_accuracy is not None and (val_acc or 0.0) >= config.target_accuracy
            out_of_time = config.time_limit is not None and seconds >= config.time_limit
            if target_hit or out_of_time:
                ray.get(server.request_stop.remote())
            if not running:  # workers return once the server is done (or all have failed for good)
                break
        stats = ray.get(server.stats.remote())
        model.load_state_dict(ray.get(server.state_dict.remote()))
        if config.checkpoint:
            ray.get(server.save.remote(config.checkpoint))
    except RayActorError as exc:  # worker failures are handled above: here the server itself is gone
        raise TrainingError(_server_died(config, stats["version"], exc)) from None
    finally:
        line.close()
        for handle in [h for h, _ in running.values()] + [server]:
            with contextlib.suppress(Exception):
                ray.kill(handle)
    if not running and stats["version"] == 0:
        raise TrainingError("every async worker failed before the first update")
    return AsyncResult(model=model.eval(), stats=stats, timeline=timeline, restarts=restarts)


def _server_died(config: AsyncConfig, version: int, error: BaseException) -> str:
    """One line: the server died, when, and what can be resumed."""
    what = f"the parameter server died ({type(error).__name__}; last seen at update {version})"
    if config.checkpoint and Path(config.checkpoint).exists():
        saved = load_checkpoint(config.checkpoint)["version"]
        return f"{what}; rerun with --resume to continue from its checkpoint at update {saved}"
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

    def close(self) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            if self.text:
                self.live.console.print(self.text, highlight=False)
