"""Start N local workers, or join the job `torchrun` started, and train with ddp, fsdp or pipeline.

The same `keiryo train --strategy ddp` command runs in one machine's worker processes (keiryo starts them) or
across machines (each node runs it under `torchrun`, which sets RANK, WORLD_SIZE and MASTER_ADDR):

    keiryo train --strategy ddp --workers 2 --model cnn --epochs 3
    torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m keiryo train --strategy ddp --model cnn --epochs 3

Local workers are `python -m keiryo.parallel.worker` processes that receive the model, loss and data by value
(cloudpickle), so training works from a script without a main guard, `python -c` and notebooks. They meet
through a file in the run's own temp folder (no TCP store) and talk over the loopback interface only, so a
local run listens on no network interface; `watch` stops them all on the first failure. The temp folder goes
with the run. Checkpoints are written by rank 0 only, atomically, so the last one stays whole and `--resume`
continues from it. After a worker dies, `torchrun --max-restarts N` (or keiryo's own `--max-restarts N` for
local workers) starts the workers again and they resume from the run's last checkpoint by themselves:

    torchrun --standalone --nproc-per-node=2 --max-restarts=3 -m keiryo train --strategy ddp \\
        --model cnn --epochs 30 --checkpoint ck.pt --checkpoint-every 50
"""

from __future__ import annotations

import atexit
import copy
import functools
import gc
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from keiryo.checkpoints import JOB_ENV, RESTART_ENV
from keiryo.data import DataSplits, make_loader
from keiryo.devices import resolve_device
from keiryo.errors import ConfigError, one_line
from keiryo.loop import EpochLog, LossFn, TrainConfig, TrainResult, classification_loss, fit
from keiryo.parallel.config import DDP, DEFAULT_TIMEOUT_S, FSDP, Pipeline
from keiryo.parallel.ddp import GradTraffic, apply_ddp, apply_fsdp, full_model_state, worker_memory
from keiryo.parallel.group import STORE_ENV, init_worker, teardown, under_torchrun
from keiryo.parallel.pipeline import apply_pipeline, gather_stages, microbatches_of
from keiryo.parallel.watch import (
    FOLDER_PREFIX,
    WorkerError,
    remove_stale_folders,
    sigterm_as_interrupt,
    stop,
    watch,
)
from keiryo.parallel.worker import LAUNCHER_ENV, write_payload
from keiryo.progress import say

LOOPBACK = "lo0" if sys.platform == "darwin" else "lo"
WORKER_MODULE = "keiryo.parallel.worker"


def run(
    model: torch.nn.Module,
    splits: DataSplits,
    strategy: DDP | FSDP | Pipeline,
    config: TrainConfig,
    loss_fn: LossFn = classification_loss,
) -> TrainResult:
    """Train with `strategy` over `strategy.workers` local processes, or over the torchrun job this process
    belongs to; `model` comes back trained, and `parallel` says how the work was split.

    The model, `loss_fn` (and a teacher it holds) and the data reach every local worker by value, so a model
    class defined in a notebook or a script's `__main__`, and a lambda loss, work.
    """
    config.validate()
    strategy.validate()
    _check(strategy, config, loss_fn)
    args = (strategy, model, splits, config, loss_fn)
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if strategy.workers not in (1, world):
            raise ConfigError(
                f"--workers {strategy.workers} differs from the torchrun job's WORLD_SIZE {world}"
            )
        if strategy.max_restarts:
            raise ConfigError("under torchrun, restarts are torchrun's: pass --max-restarts to torchrun")
        _check_batches(strategy, config, len(splits.train), world)
        out = train_worker(*args)
    else:
        _check_batches(strategy, config, len(splits.train), strategy.workers)
        device = resolve_device(config.device)
        if device.type == "cuda" and strategy.workers > torch.cuda.device_count():
            raise ConfigError(
                f"{strategy.workers} workers need {strategy.workers} GPUs; "
                f"this machine has {torch.cuda.device_count()}"
            )
        out = _run_restarting(args, strategy, config.progress)
    model.load_state_dict(out["state"])
    model.eval()
    history = [EpochLog(**h) for h in out["history"]]
    return TrainResult(
        model=model,
        history=history,
        resumed_from=out["resumed_from"],
        parallel=out["parallel"],
        best_epoch=out["best_epoch"],
    )


def train_worker(
    strategy: DDP | FSDP | Pipeline,
    model: torch.nn.Module,
    splits: DataSplits,
    config: TrainConfig,
    loss_fn: LossFn,
) -> dict:
    """One worker's whole run: join the group, train, and leave it; returns the trained full state (on every
    worker), the history and what each worker held."""
    device = init_worker(resolve_device(config.device), strategy.timeout)
    # On an error the group is left up: the process is about to end (a local worker reports the error and
    # exits at once; under torchrun the CLI prints it), and tearing down beside live wrappers and dead peers
    # can hang or abort before the error is reported.
    out = train_in_group(strategy, model, splits, config, loss_fn, device)
    gc.collect()  # the DDP/FSDP wrappers died with train_in_group's frame; collect any cycles now
    dist.barrier()  # every worker is done with the group before any of them leaves it
    teardown()
    return out


def train_in_group(
    strategy: DDP | FSDP | Pipeline,
    model: torch.nn.Module,
    splits: DataSplits,
    config: TrainConfig,
    loss_fn: LossFn,
    device: torch.device,
) -> dict:
    """Wrap a copy of the model for the strategy and run `fit`; the wrappers are local, so they (and their
    hold on the process group) are gone when this returns."""
    model = copy.deepcopy(model)  # the caller's model stays plain; the trained state is loaded into it
    config = replace(config, device=str(device))
    world, rank = dist.get_world_size(), dist.get_rank()
    info: dict[str, Any] = {"strategy": strategy.kind, "workers": world, "rank": rank}
    traffic = GradTraffic()  # the bytes DDP's hook hands to all-reduce, counted during fit
    if isinstance(strategy, DDP):
        trained, worker = model, apply_ddp(model, device, config.compile, strategy.grad_compression, traffic)
    elif isinstance(strategy, FSDP):
        trained, worker = model, apply_fsdp(model, device, config.compile)
    else:
        example = next(iter(make_loader(splits.train, config.batch_size)))[0]
        trained, worker, stages = apply_pipeline(model, example, device, strategy)
        info.update(stages)
    result = fit(trained, splits, config, loss_fn=loss_fn, worker=worker)
    memory = [None] * dist.get_world_size()
    dist.all_gather_object(memory, worker_memory(trained, config.optimizer))
    info["memory"] = memory
    state = gather_stages(trained) if isinstance(strategy, Pipeline) else full_model_state(trained)
    prints = [None] * dist.get_world_size()
    dist.all_gather_object(prints, fingerprint(state))
    info.update(fingerprint=prints[dist.get_rank()], weights_identical=len(set(prints)) == 1)
    if isinstance(strategy, DDP):
        info["grad_traffic"] = traffic.summary()
    return {
        "state": state,
        "history": [asdict(h) for h in result.history],
        "resumed_from": result.resumed_from,
        "best_epoch": result.best_epoch,
        "parallel": info,
    }


def _run_restarting(args: tuple, strategy: DDP | FSDP | Pipeline, progress: bool) -> dict:
    """`run_local(train_worker, ...)`, started again up to `strategy.max_restarts` times after a worker dies,
    hangs or loses its peers, as torchrun --max-restarts does; the new workers resume from the run's last
    checkpoint (`keiryo.checkpoints`: the job id and restart count travel in their environment). A worker's
    own error (bad data, a diverged loss) is not retried: it would fail again."""
    if not strategy.max_restarts:
        return run_local(train_worker, args, strategy.workers, strategy.timeout)
    job, restart = uuid.uuid4().hex, 0
    while True:
        env = {JOB_ENV: job, RESTART_ENV: str(restart)}
        try:
            return run_local(train_worker, args, strategy.workers, strategy.timeout, env)
        except WorkerError as exc:
            if exc.own_error or restart == strategy.max_restarts:
                raise
            restart += 1
            if progress:
                say(f"{exc}; restarting the workers (restart {restart} of {strategy.max_restarts})")


def fingerprint(state: dict) -> str:
    """A short sha256 of a state dict's names and tensor bytes: equal on two workers iff the weights are."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _check(strategy: DDP | FSDP | Pipeline, config: TrainConfig, loss_fn: LossFn) -> None:
    """Refuse what a strategy cannot do, before any worker starts."""
    if not isinstance(strategy, (DDP, FSDP, Pipeline)):
        raise ConfigError(f"launch runs ddp, fsdp or pipeline, not {type(strategy).__name__}")
    if not isinstance(strategy, Pipeline):
        return
    if loss_fn is not classification_loss:
        raise ConfigError(
            "pipeline trains with the built-in loss on outputs; a custom loss_fn needs ddp or fsdp"
        )
    if config.checkpoint:
        raise ConfigError("pipeline runs do not write checkpoints yet; use ddp or fsdp for checkpoint/resume")
    if config.precision == "fp16" and resolve_device(config.device).type == "cuda":
        raise ConfigError("pipeline with fp16 on CUDA needs loss scaling, which the schedules lack; use bf16")
    if config.compile:
        raise ConfigError("pipeline stages are traced graphs already; drop --compile")


def _check_batches(strategy: DDP | FSDP | Pipeline, config: TrainConfig, samples: int, workers: int) -> None:
    """Refuse batch sizes that would leave a worker without samples (every batch skipped), before any
    worker starts: ddp/fsdp give each worker a share of every batch, a pipeline trains on whole batches."""
    if isinstance(strategy, Pipeline):
        micro = microbatches_of(strategy)
        if config.batch_size % micro:
            raise ConfigError(f"batch size {config.batch_size} must split into {micro} equal micro-batches")
        if samples < config.batch_size:
            raise ConfigError(
                f"a pipeline builds its stages from one whole batch: the training split has {samples} "
                f"samples, less than one batch of {config.batch_size}; use a smaller batch size"
            )
        return
    if config.batch_size < workers:
        raise ConfigError(
            f"batch size {config.batch_size} is smaller than the {workers} workers: each worker takes "
            f"a share of every batch; use a batch size of at least {workers} or fewer workers"
        )
    if samples < workers:
        raise ConfigError(
            f"the training split has {samples} samples, fewer than the {workers} workers; "
            "use fewer workers or more data"
        )


def run_local(
    fn: Callable[..., Any],
    args: tuple,
    workers: int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> Any:
    """Run `fn(*args)` in `workers` worker processes joined in one process group; return rank 0's result.
    `env`: more environment for the workers (a restart's count and job id).

    `fn` and `args` travel by value (cloudpickle) to `python -m keiryo.parallel.worker` processes. The
    workers meet through a file in a temp folder of this run, talk over loopback only, and rank 0's result
    comes back through a file there. The folder is removed when the run ends, however it ends; a SIGTERM to
    this process stops the workers first.
    """
    work = _pickled(fn, args)
    remove_stale_folders()
    tmp = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-")
    cleanup = functools.partial(shutil.rmtree, tmp, ignore_errors=True)
    atexit.register(cleanup)  # in case the interpreter exits some way that skips the finally below
    write_payload(Path(tmp), work, threads=max(1, torch.get_num_threads() // workers))
    env = {
        **os.environ,
        **(env or {}),
        "WORLD_SIZE": str(workers),
        STORE_ENV: str(Path(tmp) / "store"),
        LAUNCHER_ENV: str(os.getpid()),
        "MASTER_ADDR": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": LOOPBACK,  # gloo binds to the interface its hostname resolves to otherwise
        "NCCL_SOCKET_IFNAME": LOOPBACK,
    }
    processes: list[subprocess.Popen] = []
    try:
        with sigterm_as_interrupt():
            for rank in range(workers):
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", WORKER_MODULE, tmp],
                        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                        stdin=subprocess.DEVNULL,
                    )
                )
            watch(processes, tmp, timeout_s)
        result = Path(tmp) / "result.pt"
        if not result.exists():
            raise WorkerError("the workers finished without a result from rank 0")
        return torch.load(result, map_location="cpu", weights_only=True)
    finally:
        stop(processes)  # those started before an error or Ctrl-C here; `watch` stopped the others
        cleanup()
        atexit.unregister(cleanup)


def _pickled(fn: Callable[..., Any], args: tuple) -> bytes:
    """`(fn, args)` as cloudpickle bytes: classes and functions of `__main__` (a script, `python -c`, a
    notebook) by value, importable ones by reference; refused in one line before any worker starts."""
    import cloudpickle

    try:
        return cloudpickle.dumps((fn, args))
    except Exception as exc:
        raise ConfigError(
            f"the model, loss_fn and data must pickle to reach the worker processes ({one_line(exc)}); "
            "keep open files, locks and threads out of them"
        ) from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (torchrun rendezvous, benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
