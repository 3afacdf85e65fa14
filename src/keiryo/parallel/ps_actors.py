"""The parameter server and its workers, as plain classes that `async_ps` turns into Ray actors.

The server holds the parameters and the optimizer the user configured (`TrainConfig`: AdamW by default, with
its learning-rate schedule and weight decay; its state lives on the server). Workers loop pull → gradient on
their shard → push, tagged with the version they pulled. The server applies each push at once (staleness =
current version − pulled version), or controls staleness by mode:

- ``async``   every push is applied;
- ``bounded`` stale-synchronous: a push staler than S is discarded (never applied), and a worker more than S
  pushes ahead of the slowest live worker waits before its next pull;
- ``scaled``  the gradient is scaled by 1 / (1 + staleness);
- ``dcasgd``  delay compensation (Zheng et al. 2017): g + λ·g⊙g⊙(w_now − w_pulled);
- ``sync``    a barrier: each live worker takes its share of one batch, one averaged update per round.

One update is one step of the loop: an epoch is ⌈training samples / batch size⌉ updates, and the server
keeps each epoch's mean loss, accuracy and weights for the driver's history line.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from keiryo.checkpoints import ASYNC_CHECKPOINT_FORMAT, write_checkpoint
from keiryo.loop import LossFn, TrainConfig, make_optimizer, make_scheduler
from keiryo.parallel.config import Async


@dataclass
class Plan:
    """The run in updates: how many in all, how many make an epoch, and each push's batch size; `run_id`
    tags the server's checkpoints, so that a restarted server takes only its own run's."""

    max_updates: int
    steps_per_epoch: int
    worker_batch: int
    run_id: str = ""


class ParameterServer:
    """Ray actor (async methods run concurrently): parameters, optimizer, version and staleness control."""

    def __init__(
        self, model: nn.Module, strategy: Async, config: TrainConfig, plan: Plan, state: dict | None
    ) -> None:
        torch.set_num_threads(1)
        self.strategy, self.config, self.plan = strategy, config, plan
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(model, config)
        self.schedule = make_scheduler(self.opt, config, plan.max_updates)
        self.version = self.accepted = self.discarded = 0
        self.staleness_sum, self.staleness_max = 0, 0
        self.pushes: dict[int, int] = {}
        self.live: set[int] = set()
        self.pulled: dict[int, list[Tensor]] = {}
        self.round: list[tuple[list[Tensor], tuple]] = []
        self.round_done = asyncio.Event()
        self.stop = False
        self.losses: list[float] = []
        self.nodes: dict[int, str] = {}
        self.epochs: list[dict] = []  # finished epochs the driver has not taken yet
        self._new_epoch()
        if state is not None:
            model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["scheduler"])
            self.version = self.accepted = state["version"]

    def set_live(self, worker_ids: list[int]) -> None:
        self.live = set(worker_ids)
        for w in self.live:
            self.pushes.setdefault(w, 0)
        if self.strategy.mode == "sync" and self.round and len(self.round) >= len(self.live):
            self._apply_round()

    def register(self, worker_id: int, node_id: str) -> None:
        """Where a worker runs (a Ray node id), reported in the stats."""
        self.nodes[worker_id] = node_id

    def request_stop(self) -> None:
        self.stop = True
        self.round_done.set()

    async def pull(self, worker_id: int) -> tuple[int, list[Tensor]] | None:
        """Current version and parameters; in bounded mode a worker too far ahead waits first."""
        if self.strategy.mode == "bounded":
            while not self._done() and self._ahead(worker_id) > self.strategy.staleness_bound:
                await asyncio.sleep(0.001)
        if self._done():
            return None
        snapshot = [p.detach().clone() for p in self.params]
        if self.strategy.mode == "dcasgd":
            self.pulled[worker_id] = snapshot
        return self.version, snapshot

    async def push(self, worker_id: int, pulled_version: int, grads: list[Tensor], figures: tuple) -> bool:
        """Apply (or, by mode, scale, compensate, discard or wait for the round); False means stop.

        `figures` are the push's (loss, correct or None, samples), for the epoch's history line.
        """
        if self._done() or worker_id not in self.live:
            return False
        mode = self.strategy.mode
        staleness = self.version - pulled_version
        if mode == "bounded" and staleness > self.strategy.staleness_bound:
            self.discarded += 1
            return True
        self.pushes[worker_id] = self.pushes.get(worker_id, 0) + 1
        self.losses.append(figures[0])
        if mode == "sync":
            self.round.append((grads, figures))
            event = self.round_done
            if len(self.round) >= len(self.live):
                self._apply_round()
            else:
                await event.wait()
            return not self._done()
        if mode == "scaled":
            grads = [g / (1 + staleness) for g in grads]
        elif mode == "dcasgd":
            backup = self.pulled.pop(worker_id, None)
            if backup is not None:
                lam = self.strategy.dc_lambda
                grads = [
                    g + lam * g * g * (p.detach() - b)
                    for g, p, b in zip(grads, self.params, backup, strict=True)
                ]
        self._apply(grads, [figures])
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)
        return not self._done()

    def _apply_round(self) -> None:
        grads = [torch.stack(gs).mean(0) for gs in zip(*(g for g, _ in self.round), strict=True)]
        figures = [f for _, f in self.round]
        self.round = []
        self._apply(grads, figures)
        event, self.round_done = self.round_done, asyncio.Event()
        event.set()

    def _apply(self, grads: list[Tensor], figures: list[tuple]) -> None:
        """One optimizer step (the user's optimizer and schedule), and the epoch's running figures."""
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.opt.step()
        self.schedule.step()
        self.version += 1
        self.accepted += 1
        self.epoch_updates += 1
        for loss, correct, samples in figures:
            self.epoch_loss += loss * samples
            self.epoch_seen += samples
            self.epoch_correct = (
                None if correct is None or self.epoch_correct is None else self.epoch_correct + correct
            )
        if self.version % self.plan.steps_per_epoch == 0:
            self.finish_epoch()
        every = self.config.checkpoint_every or self.plan.steps_per_epoch
        if self.config.checkpoint and self.version % every == 0:
            self.save(self.config.checkpoint)

    def finish_epoch(self) -> None:
        """Close the running epoch (a short last one too) with its figures and a copy of the weights."""
        if self.epoch_updates == 0:
            return
        seen = max(self.epoch_seen, 1)
        self.epochs.append(
            {
                "epoch": math.ceil(self.version / self.plan.steps_per_epoch),
                "train_loss": self.epoch_loss / seen,
                "train_accuracy": None if self.epoch_correct is None else self.epoch_correct / seen,
                "seconds": time.perf_counter() - self.epoch_started,
                "state": self.state_dict(),
            }
        )
        self._new_epoch()

    def take_epochs(self) -> list[dict]:
        """The epochs finished since the last call (the driver evaluates and logs them)."""
        taken, self.epochs = self.epochs, []
        return taken

    def _new_epoch(self) -> None:
        self.epoch_updates, self.epoch_loss, self.epoch_seen = 0, 0.0, 0
        self.epoch_correct: int | None = 0
        self.epoch_started = time.perf_counter()

    def _ahead(self, worker_id: int) -> int:
        live = [self.pushes.get(w, 0) for w in self.live] or [0]
        return self.pushes.get(worker_id, 0) - min(live)

    def _done(self) -> bool:
        return self.stop or self.version >= self.plan.max_updates

    def save(self, path: str) -> None:
        """Atomic checkpoint of everything a resumed run needs."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "version": self.version,
            "run": self.plan.run_id,
        }
        write_checkpoint(state, path, ASYNC_CHECKPOINT_FORMAT)

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def stats(self) -> dict:
        applied = self.accepted if self.strategy.mode != "sync" else 0
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


class PSWorker:
    """Ray actor: pull → gradient on its own shard → push, until the server says stop.

    The shard is walked in a fresh seeded order each pass, as the loop walks the data each epoch.
    """

    def __init__(
        self, worker_id: int, model: nn.Module, inputs: Tensor, targets: Tensor, plan: Plan, seed: int
    ) -> None:
        torch.set_num_threads(1)
        self.id, self.model, self.plan = worker_id, model, plan
        self.inputs, self.targets = inputs, targets
        self.generator = torch.Generator().manual_seed(seed * 1000 + worker_id)
        self.order, self.position = torch.randperm(len(self.targets), generator=self.generator), 0
        self.params = [p for p in model.parameters() if p.requires_grad]

    def run(self, server, loss_fn: LossFn, slowdown: float = 1.0) -> int:
        """Loop until the server says stop; with `slowdown` k an iteration takes k times as long."""
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
            idx = self._next_batch()
            inputs, targets = self.inputs[idx], self.targets[idx]
            self.model.train()
            self.model.zero_grad(set_to_none=True)
            loss, outputs = loss_fn(self.model, inputs, targets)
            loss.backward()
            grads = [p.grad.detach().clone() for p in self.params]
            correct = None
            if not targets.is_floating_point():
                correct = int((outputs.detach().argmax(-1) == targets).sum())
            steps += 1
            go_on = ray.get(server.push.remote(self.id, version, grads, (float(loss), correct, len(idx))))
            if slowdown > 1:
                time.sleep((slowdown - 1) * (time.perf_counter() - started))
            if not go_on:
                return steps

    def _next_batch(self) -> Tensor:
        size = min(self.plan.worker_batch, len(self.order))
        if self.position + size > len(self.order):
            self.order, self.position = torch.randperm(len(self.order), generator=self.generator), 0
        idx = self.order[self.position : self.position + size]
        self.position += size
        return idx
