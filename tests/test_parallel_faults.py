"""Distributed faults and exposure: local runs listen on loopback only, a stopped or terminated worker ends
the run with its rank and cause in one line, temp folders go with the run, and Ray stays quiet and local."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils.data import Subset

from keiryo.errors import ConfigError, TrainingError
from keiryo.loop import TrainConfig, classification_loss
from keiryo.models import build_model
from keiryo.parallel import launch, watch
from keiryo.parallel.config import DDP
from keiryo.training import train

# The test process sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (conftest); the runs below must not need it.
ENV = {
    **{k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"},
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
}


def _mlp():
    torch.manual_seed(0)
    return build_model("mlp", in_features=64, hidden=[16], num_classes=10)


def _cli(tmp_path: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "keiryo", "train", "--model", "mlp", "--no-progress", "--device", "cpu"]
    command += [*args, "--out", str(tmp_path / "model.pt")]
    return subprocess.Popen(
        command, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _listening(processes: list[psutil.Process]) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket the processes listen on."""
    found = set()
    for process in processes:
        try:
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((process.name(), conn.laddr.ip, conn.laddr.port))
        except psutil.Error:  # ended meanwhile
            continue
    return found


def _alive(pids: set[int]) -> list[str]:
    """Names of the processes among `pids` still running (zombies aside)."""
    names = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                names.append(process.name())
        except psutil.Error:
            continue
    return names


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_local_ddp_listens_on_loopback_only_and_a_stopped_worker_ends_the_run(tmp_path):
    """A local ddp run: every listening socket of its processes is on 127.0.0.1; SIGSTOP on worker 1 ends
    the run within the timeout with one line naming worker 1; no worker and no temp folder is left."""
    run = _cli(tmp_path, "--strategy", "ddp", "--workers", "2", "--epochs", "500", "--timeout", "8")
    beats = f"{watch.FOLDER_PREFIX}{run.pid}-*/beat-1"
    sockets, worker_pids = set(), set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and run.poll() is None:
        tree = _tree(run.pid)
        worker_pids |= {p.pid for p in tree[1:]}
        sockets |= _listening(tree)
        beat = next(Path(tempfile.gettempdir()).glob(beats), None)
        if beat and len(sockets) >= 2 and beat.read_text().strip():
            break
        time.sleep(0.2)
    assert run.poll() is None, run.communicate()[1]
    assert sockets and all(_loopback(ip) for _, ip, _ in sockets), sockets
    os.kill(int(beat.read_text()), signal.SIGSTOP)
    stopped = time.monotonic()
    _, err = run.communicate(timeout=120)
    assert time.monotonic() - stopped < 8 + 10  # the timeout, plus a heartbeat and slack for a loaded machine
    assert run.returncode == 2
    assert err.strip() == "error: worker 1 stopped responding for 8 s; the run was stopped"
    time.sleep(0.5)
    assert not _alive(worker_pids)
    assert not list(Path(tempfile.gettempdir()).glob(f"{watch.FOLDER_PREFIX}{run.pid}-*"))


class TermOnRank1:
    """A loss that makes worker 1 receive SIGTERM at its first training step, as if an operator sent it."""

    def __call__(self, model, inputs, targets):
        if os.environ.get("RANK") == "1" and model.training:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        return classification_loss(model, inputs, targets)


def test_sigterm_on_rank_1_is_reported_as_rank_1_terminated(digits):
    mine = f"{watch.FOLDER_PREFIX}{os.getpid()}-*"
    with pytest.raises(TrainingError) as caught:
        config = TrainConfig(epochs=1, progress=False, device="cpu")
        train(_mlp(), digits, DDP(workers=2, timeout=20), config, loss_fn=TermOnRank1())
    assert str(caught.value) == "worker 1 was terminated by SIGTERM; the run was stopped"
    assert not list(Path(tempfile.gettempdir()).glob(mine))  # the failed run's temp folder is gone


@pytest.mark.parametrize(
    ("strategy", "samples", "options", "message"),
    [
        ("ddp", 200, {"workers": 4, "batch_size": 2}, "batch size 2 is smaller than the 4 workers"),
        ("fsdp", 200, {"workers": 4, "batch_size": 3}, "batch size 3 is smaller than the 4 workers"),
        ("ddp", 3, {"workers": 4, "batch_size": 8}, "training split has 3 samples, fewer than the 4 workers"),
        ("pipeline", 20, {"workers": 2, "batch_size": 32}, "less than one batch of 32"),
        ("pipeline", 200, {"workers": 2, "batch_size": 30}, "batch size 30 must split into 4 equal"),
    ],
)
def test_batches_that_leave_a_worker_empty_are_refused_before_any_worker_starts(
    digits, monkeypatch, strategy, samples, options, message
):
    def no_start(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(launch, "run_local", no_start)
    data = dataclasses.replace(digits, train=Subset(digits.train, range(samples)))
    config = TrainConfig(epochs=1, batch_size=options["batch_size"], progress=False, device="cpu")
    with pytest.raises(ConfigError, match=message) as caught:
        train(_mlp(), data, strategy, config, workers=options["workers"])
    assert "\n" not in str(caught.value)


def test_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path, monkeypatch):
    """A folder whose launcher is gone and that nothing touched for an hour goes; a live run's stays, and so
    does a recent one (it may belong to a run in another PID namespace)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    old = time.time() - 2 * watch.STALE_AFTER_S
    folders = {}
    for name, pid, age in [("stale", dead_pid, old), ("live", os.getpid(), old), ("recent", dead_pid, None)]:
        folder = tmp_path / f"{watch.FOLDER_PREFIX}{pid}-{name}"
        (folder / "beat-0").parent.mkdir()
        (folder / "beat-0").write_text("1\n")
        if age is not None:
            for path in (folder / "beat-0", folder):
                os.utime(path, (age, age))
        folders[name] = folder
    assert watch.remove_stale_folders() == [folders["stale"]]
    assert not folders["stale"].exists() and folders["live"].exists() and folders["recent"].exists()


def test_an_unreachable_ray_address_is_one_line_at_once():
    from keiryo.errors import KeiryoError
    from keiryo.parallel.ray_setup import check_reachable

    started = time.monotonic()
    with pytest.raises(KeiryoError, match=r"^cannot reach the Ray cluster at '127\.0\.0\.1:\d+': "):
        check_reachable(f"127.0.0.1:{launch.free_port()}")
    assert time.monotonic() - started < 6


def test_local_async_run_listens_on_loopback_keeps_ray_quiet_and_stops_it(tmp_path):
    """`keiryo train --strategy async`: Ray's processes listen on loopback only, nothing of Ray's reaches
    stderr (no token-auth banner), and Ray's processes are gone soon after the run."""
    run = _cli(tmp_path, "--strategy", "async", "--workers", "2", "--epochs", "1")
    sockets, pids = set(), set()
    while run.poll() is None:
        tree = _tree(run.pid)
        pids |= {p.pid for p in tree[1:]}
        sockets |= _listening(tree)
        time.sleep(0.3)
    out, err = run.communicate(timeout=10)
    assert run.returncode == 0, err
    assert err == ""
    assert "test accuracy" in out
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    assert all(_loopback(ip) for _, ip, _ in sockets), sockets
    deadline = time.monotonic() + 30
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pids)
