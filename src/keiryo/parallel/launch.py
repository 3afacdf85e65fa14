"""Start N local workers, or join the job `torchrun` started; process-group setup, teardown and a watchdog.

The same `keiryo train --strategy ddp` command runs in one machine's worker processes (keiryo spawns them) or
across machines (each node runs it under `torchrun`, which sets RANK, WORLD_SIZE and MASTER_ADDR):

    keiryo train --strategy ddp --workers 2 --model cnn --epochs 3
    torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m keiryo train --strategy ddp --model cnn --epochs 3

Local workers meet through a file in the run's own temp folder (no TCP store) and talk over the loopback
interface only, so a local run listens on no network interface. Each worker touches a heartbeat file every
second; the launcher ends the whole run with one `WorkerError` line naming the rank and the cause when a
worker fails, dies by a signal, or stops responding (a collective times out, or its heartbeat is older than
the timeout, e.g. a stopped process). The temp folder goes with the run, and folders left by a killed
launcher are removed by a later run. Checkpoints are written by rank 0 only, atomically, so the last one
stays whole and `--resume` continues from it.
"""

from __future__ import annotations

import atexit
import copy
import functools
import gc
import hashlib
import json
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from keiryo.data import DataSplits, make_loader
from keiryo.devices import resolve_device
from keiryo.errors import ConfigError, TrainingError, one_line
from keiryo.loop import EpochLog, LossFn, TrainConfig, TrainResult, classification_loss, fit

DEFAULT_TIMEOUT_S = 120.0
FOLDER_PREFIX = "keiryo-workers-"  # + the launcher's pid + "-" + random
STALE_AFTER_S = 3600.0  # a folder whose launcher is gone and that nothing touched for an hour is removed
HEARTBEAT_S = 1.0
STARTUP_S = 60.0  # time a worker may take to start (imports) before its first heartbeat, beyond the timeout
STORE_ENV = "KEIRYO_STORE"  # the rendezvous file of a local run
LOOPBACK = "lo0" if sys.platform == "darwin" else "lo"


class WorkerError(TrainingError):
    """A training worker crashed, was killed, stopped responding or hung; the whole run was stopped."""


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
        _check_batches(strategy, config, len(splits.train), world, pipeline)
        out = train_worker(*args)
    else:
        if workers < 1:
            raise ConfigError(f"workers must be 1 or more, got {workers}")
        _check_batches(strategy, config, len(splits.train), workers, pipeline)
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
    """One worker's whole run: join the group, train, and leave it; returns the trained full state (on every
    worker), the history and what each worker held."""
    device = init_worker(resolve_device(config.device), timeout_s)
    # On an error the group is left up: the process is about to end (a local worker reports the error and
    # exits at once; under torchrun the CLI prints it), and tearing down beside live wrappers and dead peers
    # can hang or abort before the error is reported.
    out = _train_in_group(strategy, model, splits, config, loss_fn, pipeline, device)
    gc.collect()  # the DDP/FSDP wrappers died with _train_in_group's frame; collect any cycles now
    dist.barrier()  # every worker is done with the group before any of them leaves it
    teardown()
    return out


def _train_in_group(
    strategy: str,
    model: torch.nn.Module,
    splits: DataSplits,
    config: TrainConfig,
    loss_fn: LossFn,
    pipeline: dict,
    device: torch.device,
) -> dict:
    """Wrap a copy of the model for the strategy and run `fit`; the wrappers are local, so they (and their
    hold on the process group) are gone when this returns."""
    from keiryo.parallel.ddp import apply_ddp, apply_fsdp, full_model_state, worker_memory
    from keiryo.parallel.pipeline import apply_pipeline, gather_stages

    model = copy.deepcopy(model)  # the caller's model stays plain; the trained state is loaded into it
    config = replace(config, device=str(device))
    info: dict[str, Any] = {"strategy": strategy, "workers": dist.get_world_size(), "rank": dist.get_rank()}
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
    return {"state": state, "history": history, "resumed_from": result.resumed_from, "parallel": info}


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


def _check_batches(strategy: str, config: TrainConfig, samples: int, workers: int, pipeline: dict) -> None:
    """Refuse batch sizes that would leave a worker without samples (every batch skipped), before any
    worker starts: ddp/fsdp give each worker a share of every batch, a pipeline trains on whole batches."""
    if strategy in ("ddp", "fsdp"):
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
    elif strategy == "pipeline":
        micro = pipeline.get("microbatches", 4)
        if micro < 1 or config.batch_size % micro:
            raise ConfigError(f"batch size {config.batch_size} must split into {micro} equal micro-batches")
        if samples < config.batch_size:
            raise ConfigError(
                f"a pipeline trains on whole batches only: the training split has {samples} samples, "
                f"less than one batch of {config.batch_size}; use a smaller batch size"
            )


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
    timeout = timedelta(seconds=timeout_s)
    store_path = os.environ.get(STORE_ENV)
    if store_path:  # a local run: meet through a file, so that no TCP store listens anywhere
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.FileStore(store_path, world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return device


def teardown() -> None:
    """Leave the process group (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_local(fn: Callable[..., Any], args: tuple, workers: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Run `fn(*args)` in `workers` spawned processes joined in one process group; return rank 0's result.

    `fn` and `args` must pickle (spawn starts fresh interpreters). The workers meet through a file in a temp
    folder of this run, talk over loopback only, and rank 0's result comes back through a file there. The
    folder is removed when the run ends, however it ends; a SIGTERM to this process stops the workers first.
    """
    remove_stale_folders()
    threads = max(1, torch.get_num_threads() // workers)
    tmp = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-")
    cleanup = functools.partial(shutil.rmtree, tmp, ignore_errors=True)
    atexit.register(cleanup)  # in case the interpreter exits some way that skips the finally below
    env = {
        "WORLD_SIZE": str(workers),
        STORE_ENV: str(Path(tmp) / "store"),
        "MASTER_ADDR": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": LOOPBACK,  # gloo binds to the interface its hostname resolves to otherwise
        "NCCL_SOCKET_IFNAME": LOOPBACK,
    }
    try:
        with _sigterm_as_interrupt():
            context = mp.start_processes(
                _entry,
                args=(fn, args, env, threads, tmp, os.getpid()),
                nprocs=workers,
                join=False,
                start_method="spawn",
            )
            _watch(context.processes, tmp, timeout_s)
        result = Path(tmp) / "result.pt"
        if not result.exists():
            raise WorkerError("the workers finished without a result from rank 0")
        return torch.load(result, map_location="cpu", weights_only=True)
    finally:
        cleanup()
        atexit.unregister(cleanup)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (torchrun rendezvous, benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_stale_folders(max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temp folders of local runs whose launcher is gone (killed before it could clean up) and
    that nothing has touched for `max_age_s`; the age guard spares runs of other PID namespaces."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            owner = folder.name[len(FOLDER_PREFIX) :].split("-")[0]
            if owner.isdigit() and _pid_alive(int(owner)):
                continue
            newest = max([folder.stat().st_mtime] + [f.stat().st_mtime for f in folder.iterdir()])
            if time.time() - newest < max_age_s:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except OSError:  # removed meanwhile, or not ours to read
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the workers run, a SIGTERM to the launcher stops them and cleans up, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _entry(
    rank: int, fn: Callable[..., Any], args: tuple, env: dict, threads: int, tmp: str, launcher: int
) -> None:
    """One spawned worker: beat, set its rank, run `fn`, save rank 0's result, or leave its error.

    The worker leaves with os._exit once its result is on disk and the group is torn down: the interpreter's
    own teardown (destructors of gloo threads and sockets) is where workers used to abort at random.
    """
    folder = Path(tmp)
    threading.Thread(target=_heartbeat, args=(folder / f"beat-{rank}", launcher), daemon=True).start()
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        result = fn(*args)
        if rank == 0:
            from keiryo.fileio import atomic_torch_save

            atomic_torch_save(result, folder / "result.pt")
        if dist.is_initialized():  # `fn` left the group up: all leave it together
            dist.barrier()
        teardown()
    except BaseException as exc:
        text = json.dumps({"message": one_line(exc), "comm": _is_comm_error(exc)})
        (folder / f"error-{rank}.json").write_text(text)
        _exit(1)
    _exit(0)


def _exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _heartbeat(path: Path, launcher: int) -> None:
    """Write this worker's pid to `path` every second (the launcher reads its age, tests the pid); leave at
    once if the launcher is gone (killed) or has removed the folder."""
    while True:
        if os.getppid() != launcher:
            os._exit(1)
        try:
            path.write_text(f"{os.getpid()}\n")
        except OSError:
            os._exit(1)
        time.sleep(HEARTBEAT_S)


def _is_comm_error(error: BaseException) -> bool:
    """True when a worker failed because a peer did not answer (a collective timed out, a connection
    closed): then the peer, not this worker, is the cause."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    needles = ("timed out", "connection closed", "connection reset", "gloo", "nccl", "socket timeout")
    return isinstance(error, RuntimeError) and any(n in text for n in needles)


def _watch(processes: list, tmp: str, timeout_s: float) -> None:
    """Wait for the workers; on the first failure, a silent worker or a hang, stop them all and raise one
    WorkerError that names the rank and the cause."""
    started, first_done = time.monotonic(), None
    try:
        while True:
            running = [p.sentinel for p in processes if p.exitcode is None]
            if running:
                multiprocessing.connection.wait(running, timeout=0.5)
            codes = [p.exitcode for p in processes]
            if all(code == 0 for code in codes):
                return
            if any(code not in (0, None) for code in codes):
                message = _failure(processes, tmp, timeout_s)
            elif silent := _silent(processes, tmp, timeout_s, started):
                message = f"{_ranks(silent)} stopped responding for {timeout_s:.0f} s; the run was stopped"
            else:
                if first_done is None and any(code == 0 for code in codes):
                    first_done = time.monotonic()
                if first_done is None or time.monotonic() - first_done <= timeout_s:
                    continue
                hung = [rank for rank, code in enumerate(codes) if code is None]
                message = f"{_ranks(hung)} hung {timeout_s:.0f} s after the others finished; run stopped"
            raise WorkerError(message)
    finally:
        _stop(processes)


def _silent(processes: list, tmp: str, timeout_s: float, started: float) -> list[int]:
    """Ranks alive whose heartbeat is older than the timeout (stopped or frozen), or that never beat."""
    silent = []
    for rank, process in enumerate(processes):
        if process.exitcode is not None:
            continue
        try:
            age = time.time() - (Path(tmp) / f"beat-{rank}").stat().st_mtime
        except FileNotFoundError:
            age = None
        if (age is None and time.monotonic() - started > timeout_s + STARTUP_S) or (age or 0) > timeout_s:
            silent.append(rank)
    return silent


def _failure(processes: list, tmp: str, timeout_s: float) -> str:
    """Say which worker caused the failure and how. A worker's own error beats a death by a signal, which
    beats the communication errors such a death causes in the others; when the others only timed out
    waiting, the workers still running are the ones that stopped responding."""
    codes = {rank: p.exitcode for rank, p in enumerate(processes)}
    errors = {}
    for rank in codes:
        try:
            errors[rank] = json.loads((Path(tmp) / f"error-{rank}.json").read_text())
        except (OSError, ValueError):
            continue
    own = [rank for rank, e in errors.items() if not e["comm"]]
    if own:
        return f"worker {own[0]} failed: {errors[own[0]]['message']}"
    for rank, code in codes.items():
        if code is not None and code < 0:
            return _signal_text(rank, -code)
    alive = [rank for rank, code in codes.items() if code is None]
    timed_out = [rank for rank, e in errors.items() if "timed out" in e["message"].lower()]
    if timed_out and alive:
        return f"{_ranks(alive)} stopped responding for {timeout_s:.0f} s; the run was stopped"
    if errors:
        rank = min(errors)
        return f"worker {rank} failed: {errors[rank]['message']}"
    rank = next(r for r, code in codes.items() if code not in (0, None))
    return f"worker {rank} exited with code {codes[rank]}; the run was stopped"


def _signal_text(rank: int, signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if name == "SIGTERM":
        return f"worker {rank} was terminated by SIGTERM; the run was stopped"
    return f"worker {rank} was killed ({name}); the run was stopped"


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"worker {ranks[0]}"
    return f"workers {', '.join(map(str, ranks[:-1]))} and {ranks[-1]}"


def _stop(processes: list) -> None:
    """Terminate, then kill, every worker still running (a stopped one is continued so that it can die)."""
    for process in processes:
        if process.is_alive():
            process.terminate()
            try:
                os.kill(process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 3
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
