"""Start N local workers, or join the job `torchrun` started; process-group setup, teardown and a watchdog.

The same `keiryo train --strategy ddp` command runs in one machine's worker processes (keiryo spawns them) or
across machines (each node runs it under `torchrun`, which sets RANK, WORLD_SIZE and MASTER_ADDR):

    keiryo train --strategy ddp --workers 2 --model cnn --epochs 3
    torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m keiryo train --strategy ddp --model cnn --epochs 3

A worker that crashes, is killed or hangs ends the whole run: collectives give up after the process-group
timeout, the launcher stops the other workers and raises a one-line `WorkerError`. Checkpoints are written by
rank 0 only, atomically, so the last one stays whole and `--resume` continues from it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import pickle
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from keiryo.data import DataSplits, make_loader
from keiryo.devices import resolve_device
from keiryo.errors import ConfigError, KeiryoError
from keiryo.train import EpochLog, LossFn, TrainConfig, TrainResult, classification_loss, fit

DEFAULT_TIMEOUT_S = 120.0


class WorkerError(KeiryoError):
    """A training worker crashed, was killed or hung; the whole run was stopped."""


def train_parallel(
    model: torch.nn.Module,
    splits: DataSplits,
    config: TrainConfig,
    loss_fn: LossFn,
    *,
    strategy: str,
    workers: int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    pipeline: dict | None = None,
) -> TrainResult:
    """Train with `strategy` (ddp | fsdp | pipeline) over `workers` local processes, or over the torchrun job
    this process belongs to; `model` comes back trained, and `parallel` says how the work was split.

    `pipeline` holds split_points, schedule and microbatches. `loss_fn` (and a teacher it holds) is copied to
    every worker, so for local workers it must pickle: a module-level function, a class instance or a
    functools.partial, not a lambda or nested function.
    """
    config.validate()
    pipeline = pipeline or {}
    _check(strategy, config, loss_fn, workers, pipeline)
    args = (strategy, model, splits, config, loss_fn, timeout_s, pipeline)
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if workers not in (1, world):
            raise ConfigError(f"--workers {workers} differs from the torchrun job's WORLD_SIZE {world}")
        out = train_worker(*args)
    else:
        if workers < 1:
            raise ConfigError(f"workers must be 1 or more, got {workers}")
        device = resolve_device(config.device)
        if device.type == "cuda" and workers > torch.cuda.device_count():
            raise ConfigError(
                f"{workers} workers need {workers} GPUs; this machine has {torch.cuda.device_count()}"
            )
        for what, value in (("loss_fn", loss_fn), ("model", model)):
            try:
                pickle.dumps(value)
            except Exception as exc:
                raise ConfigError(
                    f"{what} must pickle to reach the worker processes ({one_line(exc)}); "
                    "define it at module level or use a class instance or functools.partial"
                ) from None
        out = run_local(train_worker, args, workers, timeout_s)
    model.load_state_dict(out["state"])
    model.eval()
    history = [EpochLog(**h) for h in out["history"]]
    return TrainResult(
        model=model, history=history, resumed_from=out["resumed_from"], parallel=out["parallel"]
    )


def train_worker(
    strategy: str,
    model: torch.nn.Module,
    splits: DataSplits,
    config: TrainConfig,
    loss_fn: LossFn,
    timeout_s: float,
    pipeline: dict,
) -> dict:
    """One worker's whole run: join the group, wrap a copy of the model for the strategy, run `fit`, and
    return the trained full state (on every worker), the history and what each worker held."""
    from keiryo.parallel.ddp import apply_ddp, apply_fsdp, full_model_state, worker_memory
    from keiryo.parallel.pipeline import apply_pipeline, gather_stages

    device = init_worker(resolve_device(config.device), timeout_s)
    try:
        model = copy.deepcopy(model)  # the caller's model stays plain; the trained state is loaded into it
        config = replace(config, device=str(device))
        info: dict[str, Any] = {
            "strategy": strategy,
            "workers": dist.get_world_size(),
            "rank": dist.get_rank(),
        }
        if strategy == "ddp":
            trained, worker = model, apply_ddp(model, device, config.compile)
        elif strategy == "fsdp":
            trained, worker = model, apply_fsdp(model, device, config.compile)
        elif strategy == "pipeline":
            example = next(iter(make_loader(splits.train, config.batch_size)))[0]
            trained, worker, stages = apply_pipeline(model, example, device, **pipeline)
            info.update(stages)
        else:
            raise ConfigError(f"unknown parallel strategy '{strategy}' (choose ddp, fsdp or pipeline)")
        result = fit(trained, splits, config, loss_fn=loss_fn, worker=worker)
        memory = [None] * dist.get_world_size()
        dist.all_gather_object(memory, worker_memory(trained, config.optimizer))
        info["memory"] = memory
        state = gather_stages(trained) if strategy == "pipeline" else full_model_state(trained)
        prints = [None] * dist.get_world_size()
        dist.all_gather_object(prints, fingerprint(state))
        info.update(fingerprint=prints[dist.get_rank()], weights_identical=len(set(prints)) == 1)
        history = [asdict(h) for h in result.history]
        dist.barrier()  # all workers are done with the group before any of them leaves it
        return {"state": state, "history": history, "resumed_from": result.resumed_from, "parallel": info}
    finally:
        teardown()


def fingerprint(state: dict) -> str:
    """A short sha256 of a state dict's names and tensor bytes: equal on two workers iff the weights are."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _check(strategy: str, config: TrainConfig, loss_fn: LossFn, workers: int, pipeline: dict) -> None:
    """Refuse what a strategy cannot do, before any worker starts."""
    if strategy != "pipeline":
        if pipeline:
            raise ConfigError(f"pipeline options ({', '.join(pipeline)}) need --strategy pipeline")
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


def under_torchrun() -> bool:
    """True when this process is one worker of a job started by torchrun (or any env:// launcher)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_worker(device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group from the environment (gloo on CPU, NCCL on CUDA); return this worker's device.

    On CUDA each worker takes the GPU numbered by its LOCAL_RANK, so one node can hold several workers.
    """
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return device


def teardown() -> None:
    """Leave the process group (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_local(fn: Callable[..., Any], args: tuple, workers: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Run `fn(*args)` in `workers` spawned processes joined in one process group; return rank 0's result.

    `fn` and `args` must pickle (spawn starts fresh interpreters). The result travels back through a file.
    The launcher watches the workers: if one dies, the others are stopped at once; if some finish and the
    rest have not finished `timeout_s` later, those are taken to be hung and stopped too.
    """
    threads = max(1, torch.get_num_threads() // workers)
    with tempfile.TemporaryDirectory(prefix="keiryo-workers-") as tmp:
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(workers)}
        context = mp.start_processes(
            _entry,
            args=(fn, args, env, threads, tmp),
            nprocs=workers,
            join=False,
            start_method="spawn",
        )
        _watch(context, tmp, timeout_s)
        result = Path(tmp) / "result.pt"
        if not result.exists():
            raise WorkerError("the workers finished without a result from rank 0")
        return torch.load(result, map_location="cpu", weights_only=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(error: BaseException) -> str:
    """An exception as one short line: its own message for keiryo errors, else type and first line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text if isinstance(error, KeiryoError) else f"{type(error).__name__}: {text}".rstrip(": ")
    return text if len(text) <= 200 else text[:197] + "..."


def _entry(rank: int, fn: Callable[..., Any], args: tuple, env: dict, threads: int, tmp: str) -> None:
    """One spawned worker: set its rank, run `fn`, save rank 0's result, or leave its error."""
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        result = fn(*args)
        if rank == 0:
            from keiryo.artifacts import atomic_torch_save

            atomic_torch_save(result, Path(tmp) / "result.pt")
    except BaseException as exc:
        (Path(tmp) / f"error-{rank}.txt").write_text(one_line(exc))
        raise SystemExit(1) from None
    finally:
        teardown()


def _watch(context: mp.ProcessContext, tmp: str, timeout_s: float) -> None:
    """Wait for the workers; on the first failure (or a hang) stop them all and raise one WorkerError."""
    first_done = None
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # we say it in one line
    try:
        while not context.join(timeout=0.5):
            done = [p for p in context.processes if not p.is_alive()]
            if done and first_done is None:
                first_done = time.monotonic()
            if first_done is not None and time.monotonic() - first_done > timeout_s:
                hung = [i for i, p in enumerate(context.processes) if p.is_alive()]
                _stop(context)
                names = ", ".join(map(str, hung))
                raise WorkerError(
                    f"worker(s) {names} hung {timeout_s:.0f}s after the others ended; run stopped"
                )
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        _stop(context)
        raise WorkerError(_failure(context, tmp)) from None
    except KeyboardInterrupt:
        _stop(context)
        raise


def _failure(context: mp.ProcessContext, tmp: str) -> str:
    """Say which worker failed first and why: a death by signal beats the errors it caused in the others."""
    codes = {i: p.exitcode for i, p in enumerate(context.processes)}
    # The launcher stops the survivors with SIGTERM, so a worker that died by another signal is the cause.
    for rank, code in codes.items():
        if code is not None and code < 0 and code != -signal.SIGTERM:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"worker {rank} was killed ({name}); the run was stopped"
    for rank in codes:
        error = Path(tmp) / f"error-{rank}.txt"
        if error.exists():
            return f"worker {rank} failed: {error.read_text().strip()}"
    failed = next((r for r, c in codes.items() if c not in (0, None)), 0)
    return f"worker {failed} exited with code {codes[failed]}; the run was stopped"


def _stop(context: mp.ProcessContext) -> None:
    """Terminate, then kill, every worker still running."""
    for process in context.processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 5
    for process in context.processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
