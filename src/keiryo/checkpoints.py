"""Training checkpoints on disk: written atomically, read back safely, one loader for every trainer.

A checkpoint is a dict of tensors and plain values tagged with its format (the loop's or the parameter
server's), saved with `fileio.atomic_torch_save` (a killed run leaves the previous checkpoint whole) and read
with `weights_only` loading (a checkpoint cannot run code). What goes into one is the trainer's business.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from keiryo.errors import ArtifactError, one_line
from keiryo.fileio import atomic_torch_save, safe_torch_load

CHECKPOINT_FORMAT = "keiryo-checkpoint/1"  # keiryo.loop.fit
ASYNC_CHECKPOINT_FORMAT = "keiryo-async-checkpoint/1"  # keiryo.parallel.async_ps
_KINDS = {CHECKPOINT_FORMAT: "training checkpoint", ASYNC_CHECKPOINT_FORMAT: "parameter-server checkpoint"}

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


def resume_state(path: str | Path | None, rank: int = 0, world_size: int = 1) -> dict | None:
    """The loop checkpoint to resume from, or None when there is none yet.

    In a multi-worker run rank 0 reads it and sends it to the others (whose disks may not hold it), so that
    every worker makes the same choice.
    """
    if world_size == 1:
        return load_checkpoint(path) if path and Path(path).exists() else None
    box = [load_checkpoint(path) if rank == 0 and path and Path(path).exists() else None]
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
