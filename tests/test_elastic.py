"""Restarts after a failure: torchrun restarts a killed worker and the run resumes from its own last
checkpoint to the same accuracy; a restart never picks up another run's checkpoint. Real worker processes
over gloo."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from keiryo.checkpoints import JOB_ENV, RESTART_ENV, load_checkpoint
from keiryo.loop import TrainConfig, fit

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
EPOCHS = 8
linux_only = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds workers through /proc")


def _keiryo(tmp_path: Path, name: str) -> list[str]:
    """The same run in every test: ddp over 2 workers training the mlp on digits, a checkpoint every 10
    steps."""
    return [
        *("-m", "keiryo", "train", "--model", "mlp", "--device", "cpu", "--no-progress"),
        *("--strategy", "ddp", "--epochs", str(EPOCHS), "--seed", "3"),
        *("--checkpoint", str(tmp_path / f"{name}.ck"), "--checkpoint-every", "10"),
        *("--out", str(tmp_path / f"{name}.pt")),
    ]


def _torchrun(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["torchrun", "--standalone", "--nproc-per-node=2", *extra, *_keiryo(tmp_path, name)]


def _worker_of_rank(agent: int, rank: int) -> int | None:
    """The pid of the torchrun agent's worker with RANK=rank, if it runs now."""
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


def _accuracy(output: str) -> float:
    found = re.search(r"test accuracy ([\d.]+)%", output)
    assert found, output
    return float(found[1])


@pytest.fixture(scope="module")
def plain_accuracy(tmp_path_factory) -> float:
    """Test accuracy of the same ddp run under torchrun, uninterrupted."""
    folder = tmp_path_factory.mktemp("plain")
    plain = subprocess.run(
        _torchrun(folder, "plain", "--max-restarts=0"),
        env=ENV,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "resumed" not in plain.stdout
    return _accuracy(plain.stdout)


def _kill_after_first_checkpoint(command: list[str], ck: Path, cwd: Path) -> str:
    """Start `command` (torchrun, or keiryo's own launcher: the workers' parent either way), SIGKILL its
    rank-1 worker once `ck` is on disk, and return its output."""
    run = subprocess.Popen(
        command, env=ENV, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while not ck.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = _worker_of_rank(run.pid, 1) if run.poll() is None else None
    assert victim is not None, "the run ended before its first checkpoint"
    os.kill(victim, signal.SIGKILL)
    output = run.communicate(timeout=180)[0]
    assert run.returncode == 0, output
    return output


def _check_resumed(output: str, ck: Path, plain_accuracy: float) -> None:
    """The run went on from a checkpoint (not from step 0), ran every epoch, and reached the plain run's
    accuracy within 1 point."""
    resumed = re.search(r"resumed from step (\d+) of", output)
    assert resumed, output
    final = load_checkpoint(ck)
    assert 10 <= int(resumed[1]) < final["global_step"]
    assert [h["epoch"] for h in final["history"]] == list(range(1, EPOCHS + 1))
    assert abs(_accuracy(output) - plain_accuracy) <= 1.0


@linux_only
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_from_its_checkpoint(tmp_path, plain_accuracy):
    """SIGKILL to rank 1 once the first checkpoint is on disk: torchrun restarts both workers, they resume
    from rank 0's last checkpoint, and finish with the uninterrupted run's accuracy."""
    command = _torchrun(tmp_path, "elastic", "--max-restarts=1")
    output = _kill_after_first_checkpoint(command, tmp_path / "elastic.ck", tmp_path)
    _check_resumed(output, tmp_path / "elastic.ck", plain_accuracy)


@linux_only
def test_local_workers_restart_with_max_restarts_and_resume(tmp_path, plain_accuracy):
    """keiryo's own launcher (no torchrun) with --max-restarts 1 does the same."""
    ck = tmp_path / "local.ck"
    command = [sys.executable, *_keiryo(tmp_path, "local"), "--workers", "2", "--max-restarts", "1"]
    output = _kill_after_first_checkpoint(command, ck, tmp_path)
    _check_resumed(output, ck, plain_accuracy)


def _data():
    torch.manual_seed(0)
    inputs = torch.randn(120, 6)
    targets = (inputs[:, 0] > 0).long()
    return {
        "train": (inputs[:96], targets[:96]),
        "validation": (inputs[96:], targets[96:]),
    }


def _fit(ck: Path, **options) -> object:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    config = TrainConfig(epochs=2, batch_size=16, progress=False, checkpoint=str(ck), **options)
    return fit(model, _data(), config)


def test_a_restart_resumes_only_from_a_checkpoint_of_its_own_run(tmp_path, monkeypatch):
    """A restarted worker takes the checkpoint its own job wrote (no --resume needed); a stale file of an
    earlier run at the same path is neither read on the first attempt nor on a restart."""
    ck = tmp_path / "run.ck"
    monkeypatch.setenv(JOB_ENV, "earlier-run")
    monkeypatch.delenv(RESTART_ENV, raising=False)
    first = _fit(ck)
    assert first.resumed_from is None and load_checkpoint(ck)["job"] == "earlier-run"
    steps = load_checkpoint(ck)["global_step"]

    monkeypatch.setenv(JOB_ENV, "this-run")
    assert _fit(ck).resumed_from is None  # first attempt, no --resume: the stale checkpoint is not read
    assert load_checkpoint(ck)["job"] == "this-run"

    monkeypatch.setenv(RESTART_ENV, "1")
    assert _fit(ck).resumed_from == steps  # restart of the same run: resumes by itself
    monkeypatch.setenv(JOB_ENV, "another-run")
    assert _fit(ck).resumed_from is None  # restart of another run: not this run's checkpoint
    monkeypatch.setenv(JOB_ENV, "yet-another-run")
    assert _fit(ck, resume=True).resumed_from == steps  # --resume takes whatever the file holds
