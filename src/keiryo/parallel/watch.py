"""Watching local workers: heartbeats, deaths and hangs, one `WorkerError` line, and nothing left behind.

Each worker touches a heartbeat file in the run's temp folder every second and leaves at once when its
launcher is gone. The launcher ends the whole run with one line naming the rank and the cause when a worker
fails, dies by a signal, or stops responding (a collective times out, or its heartbeat is older than the
timeout, e.g. a stopped process). Folders left by a killed launcher are removed by a later run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from keiryo.errors import TrainingError

FOLDER_PREFIX = "keiryo-workers-"  # + the launcher's pid + "-" + random
STALE_AFTER_S = 3600.0  # a folder whose launcher is gone and that nothing touched for an hour is removed
HEARTBEAT_S = 1.0
STARTUP_S = 60.0  # time a worker may take to start (imports) before its first heartbeat, beyond the timeout
POLL_S = 0.2


class WorkerError(TrainingError):
    """A training worker crashed, was killed, stopped responding or hung; the whole run was stopped.

    `own_error`: a worker raised an error of its own (not a lost peer): running again would fail the same.
    """

    def __init__(self, message: str, own_error: bool = False) -> None:
        super().__init__(message)
        self.own_error = own_error


def heartbeat(path: Path, launcher: int) -> None:
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


def is_comm_error(error: BaseException) -> bool:
    """True when a worker failed because a peer did not answer (a collective timed out, a connection
    closed): then the peer, not this worker, is the cause."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    needles = ("timed out", "connection closed", "connection reset", "gloo", "nccl", "socket timeout")
    return isinstance(error, RuntimeError) and any(n in text for n in needles)


def watch(processes: list[subprocess.Popen], tmp: str, timeout_s: float) -> None:
    """Wait for the workers; on the first failure, a silent worker or a hang, stop them all and raise one
    WorkerError that names the rank and the cause."""
    started, first_done = time.monotonic(), None
    try:
        while True:
            codes = [p.poll() for p in processes]
            if all(code == 0 for code in codes):
                return
            own_error = False
            if any(code not in (0, None) for code in codes):
                message, own_error = _failure(codes, tmp, timeout_s)
            elif silent := _silent(codes, tmp, timeout_s, started):
                message = f"{_ranks(silent)} stopped responding for {timeout_s:.0f} s; the run was stopped"
            else:
                if first_done is None and any(code == 0 for code in codes):
                    first_done = time.monotonic()
                if first_done is None or time.monotonic() - first_done <= timeout_s:
                    time.sleep(POLL_S)
                    continue
                hung = [rank for rank, code in enumerate(codes) if code is None]
                message = f"{_ranks(hung)} hung {timeout_s:.0f} s after the others finished; run stopped"
            raise WorkerError(message, own_error)
    finally:
        stop(processes)


def stop(processes: list[subprocess.Popen]) -> None:
    """Terminate, then kill, every worker still running (a stopped one is continued so that it can die)."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                os.kill(process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 3
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _silent(codes: list[int | None], tmp: str, timeout_s: float, started: float) -> list[int]:
    """Ranks alive whose heartbeat is older than the timeout (stopped or frozen), or that never beat."""
    silent = []
    for rank, code in enumerate(codes):
        if code is not None:
            continue
        try:
            age = time.time() - (Path(tmp) / f"beat-{rank}").stat().st_mtime
        except FileNotFoundError:
            age = None
        if (age is None and time.monotonic() - started > timeout_s + STARTUP_S) or (age or 0) > timeout_s:
            silent.append(rank)
    return silent


def _failure(codes: list[int | None], tmp: str, timeout_s: float) -> tuple[str, bool]:
    """Say which worker caused the failure and how. A worker's own error beats a death by a signal, which
    beats the communication errors such a death causes in the others; when the others only timed out
    waiting, the workers still running are the ones that stopped responding. Flag: a worker's own error."""
    errors = {}
    for rank in range(len(codes)):
        try:
            errors[rank] = json.loads((Path(tmp) / f"error-{rank}.json").read_text())
        except (OSError, ValueError):
            continue
    own = [rank for rank, e in errors.items() if not e["comm"]]
    if own:
        return f"worker {own[0]} failed: {errors[own[0]]['message']}", True
    for rank, code in enumerate(codes):
        if code is not None and code < 0:
            return _signal_text(rank, -code), False
    alive = [rank for rank, code in enumerate(codes) if code is None]
    timed_out = [rank for rank, e in errors.items() if "timed out" in e["message"].lower()]
    if timed_out and alive:
        return f"{_ranks(alive)} stopped responding for {timeout_s:.0f} s; the run was stopped", False
    if errors:
        rank = min(errors)
        return f"worker {rank} failed: {errors[rank]['message']}", False
    rank = next(r for r, code in enumerate(codes) if code not in (0, None))
    return f"worker {rank} exited with code {codes[rank]}; the run was stopped", False


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
def sigterm_as_interrupt() -> Iterator[None]:
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
