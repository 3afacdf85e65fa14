"""Training checkpoints on disk: written atomically, read back safely, one loader for every trainer.

`save_run`/`restore_run` hold what the loop's checkpoint contains (weights, optimizer, schedule, RNG,
position, history, best epoch); the parameter server writes its own state with `write_checkpoint`.

A checkpoint is a dict of tensors and plain values tagged with its format (the loop's or the parameter
server's), saved with `fileio.atomic_torch_save` (a killed run leaves the previous checkpoint whole) and read
with `weights_only` loading (a checkpoint cannot run code). What goes into one is the trainer's business.

Restarts (`torchrun --max-restarts N`, or keiryo's local launcher with `max_restarts`): a restarted worker
resumes from the checkpoint its own job wrote before the failure, without `--resume`. A loop checkpoint
records the job that wrote it (`job_key`); on a restart (`restart_count() > 0`) only a checkpoint of the
same job is taken, so a stale file from an earlier run at the same path is never picked up silently. On the
first attempt a checkpoint is read only with `resume`, as without restarts.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from keiryo.errors import ArtifactError, TrainingError, one_line
from keiryo.fileio import atomic_torch_save, safe_torch_load

CHECKPOINT_FORMAT = "keiryo-checkpoint/1"  # keiryo.loop.fit
ASYNC_CHECKPOINT_FORMAT = "keiryo-async-checkpoint/1"  # keiryo.parallel.async_ps
_KINDS = {CHECKPOINT_FORMAT: "training checkpoint", ASYNC_CHECKPOINT_FORMAT: "parameter-server checkpoint"}

RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun, and by keiryo's local launcher on a restart
JOB_ENV = "KEIRYO_JOB"  # keiryo's local launcher: one id per run, the same over its restarts

LoadStates = Callable[[nn.Module, torch.optim.Optimizer, dict, dict], None]
"""(model, optimizer, model_state, optimizer_state): how a sharded run loads full state into its shards."""


def write_checkpoint(state: dict, path: str | Path, format: str = CHECKPOINT_FORMAT) -> None:
    """Write `state` tagged with `format`, atomically: the old checkpoint or the new one, never half."""
    atomic_torch_save({"format": format, **state}, path)


def load_checkpoint(path: str | Path, format: str = CHECKPOINT_FORMAT) -> dict:
    """Read a checkpoint safely (weights_only), checking that it is a keiryo checkpoint of `format`."""
    ckpt = safe_torch_load(path, what="checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != format:
        raise ArtifactError(f"checkpoint '{path}' is not a keiryo {_KINDS.get(format, format)}")
    return ckpt


def remove_stale_temps(path: str | Path) -> None:
    """Delete the temporary files (`.name.*.tmp`) a killed run's atomic save left beside the checkpoint."""
    target = Path(path)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def restart_count() -> int:
    """How many times this job's workers were restarted after a failure (0: the first attempt, or no
    launcher that restarts)."""
    value = os.environ.get(RESTART_ENV, "0")
    return int(value) if value.isdigit() else 0


def job_key() -> str | None:
    """What names this worker's job across its restarts, or None outside a restarting launcher.

    keiryo's local launcher sets KEIRYO_JOB. Under torchrun: the run id and this node's agent (its pid and
    start time), which outlives the workers it restarts; a later torchrun invocation has another agent.
    """
    if JOB_ENV in os.environ:
        return os.environ[JOB_ENV]
    if RESTART_ENV not in os.environ:
        return None
    agent = os.getppid()
    started = ""
    if sys.platform.startswith("linux"):
        try:  # field 22 of /proc/PID/stat, counted after the ")" that ends the command name
            started = Path(f"/proc/{agent}/stat").read_text().rpartition(")")[2].split()[19]
        except (OSError, IndexError):
            started = ""
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}:{agent}:{started}"


def resume_state(
    path: str | Path | None, rank: int = 0, world_size: int = 1, job: str | None = None
) -> dict | None:
    """The loop checkpoint to resume from, or None when there is none yet.

    With `job` (a restart without `resume`), only a checkpoint written by that job counts. In a
    multi-worker run rank 0 reads it and sends it to the others (whose disks may not hold it), so that every
    worker makes the same choice and resumes at the same step.
    """
    ckpt = None
    if rank == 0 and path and Path(path).exists():
        ckpt = load_checkpoint(path)
        if job is not None and ckpt.get("job") != job:
            ckpt = None
    if world_size == 1:
        return ckpt
    box = [ckpt]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_states(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    states: tuple[dict, dict],
    load: LoadStates | None = None,
) -> None:
    """Load a checkpoint's (model, optimizer) `states`, through `load` for sharded models; a checkpoint of
    another model is a one-line ArtifactError naming `path`."""
    try:
        if load is not None:
            load(model, optimizer, *states)
        else:
            model.load_state_dict(states[0])
            optimizer.load_state_dict(states[1])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ArtifactError(f"checkpoint '{path}' does not match this model: {one_line(exc)}") from exc


class Gatherer(Protocol):
    """What saving needs of `keiryo.loop.Worker`: its rank, a sum over workers, and sharded-state hooks."""

    rank: int
    state_dicts: Callable[[nn.Module, torch.optim.Optimizer], tuple[dict, dict]] | None
    load_state_dicts: LoadStates | None

    def all_sum(self, *values: float, device: torch.device | None = None) -> list[float]: ...


@dataclass
class RunState:
    """What the loop carries from step to step and writes into a checkpoint."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    worker: Gatherer
    history: list = field(default_factory=list)  # keiryo.loop.EpochLog
    best_epoch: int | None = None
    best_score: tuple[float, ...] | None = None
    best_weights: dict | None = None  # this worker's own tensors of the best epoch, to load back at the end
    best_saved: dict | None = None  # the best epoch's full state as a checkpoint holds it (rank 0)
    stopped: bool = False  # early stopping ended the run


def own_state(model: nn.Module) -> dict:
    """A copy of this worker's tensors of the model (its shards under FSDP), to load back later."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_run(path: str, run: RunState, position: tuple[int, int, int]) -> None:
    """Rank 0 writes the checkpoint at (epoch, step in epoch, global step); with sharded state every worker
    takes part in gathering it first.

    The best epoch's weights go with it: at the end of a best epoch they are the weights being saved, and
    they are kept for the checkpoints after it. Weights that became NaN/inf stop the run instead (every
    worker decides alike), so the checkpoint on disk stays the last good one.
    """
    worker, model = run.worker, run.model
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    (bad,) = worker.all_sum(float(sum(not bool(torch.isfinite(p.detach()).all()) for p in local)))
    if bad:
        kept = f"; checkpoint '{path}' keeps the last good weights" if Path(path).exists() else ""
        raise TrainingError(
            f"training diverged: the weights became NaN/inf by step {position[2]}; "
            f"lower the learning rate or set grad_clip{kept}"
        )
    if worker.state_dicts is not None:
        model_state, optimizer_state = worker.state_dicts(model, run.optimizer)
    else:
        model_state, optimizer_state = model.state_dict(), run.optimizer.state_dict()
    if worker.rank != 0:
        return
    epoch, step_in_epoch, global_step = position
    if run.best_epoch == epoch and not step_in_epoch:  # a state_dict() of plain tensors is live: use the copy
        run.best_saved = model_state if worker.state_dicts is not None else run.best_weights
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": run.scheduler.state_dict(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "history": [asdict(h) for h in run.history],
        "rng": torch.get_rng_state(),
        "best": {"epoch": run.best_epoch, "score": list(run.best_score or []), "stopped": run.stopped},
        "job": job_key(),
    }
    if run.best_epoch is not None:
        state["best_model"] = run.best_saved
    write_checkpoint(state, path)


def restore_run(ckpt: dict, path: str, run: RunState) -> None:
    """Load a checkpoint into the run: weights, optimizer, schedule, RNG and the best epoch so far (the
    history stays as dicts in `ckpt["history"]` for the loop to read)."""
    load = run.worker.load_state_dicts
    best = ckpt.get("best", {})
    if best.get("epoch") is not None:  # the best weights first, to keep this worker's copy of them
        load_states(path, run.model, run.optimizer, (ckpt["best_model"], ckpt["optimizer"]), load)
        run.best_epoch, run.best_score = best["epoch"], tuple(best["score"])
        run.best_weights, run.best_saved = own_state(run.model), ckpt["best_model"]
        run.stopped = best["stopped"]
    load_states(path, run.model, run.optimizer, (ckpt["model"], ckpt["optimizer"]), load)
    run.scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
