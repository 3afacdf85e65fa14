"""Parallel training: ddp/fsdp equal one worker, the pipeline equals the unsplit model, torchrun across two
agents, and a killed worker stops the run with a resumable checkpoint. Real worker processes over gloo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from keiryo.errors import ConfigError
from keiryo.loop import classification_loss, load_checkpoint, train
from keiryo.models import build_model
from keiryo.parallel.launch import WorkerError, free_port, init_worker, run_local
from keiryo.parallel.pipeline import apply_pipeline, balanced_split_points, split_units

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _mlp(hidden=(32, 32)):
    torch.manual_seed(0)
    return build_model("mlp", in_features=64, hidden=list(hidden), num_classes=10)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


class TeacherLoss:
    """A distillation-style loss holding a teacher: it pickles, so it (and the teacher) reach every worker."""

    def __init__(self, teacher: torch.nn.Module, temperature: float = 2.0) -> None:
        self.teacher, self.temperature = teacher.eval(), temperature

    def __call__(self, model, inputs, targets):
        outputs = model(inputs)
        with torch.no_grad():
            soft = F.softmax(self.teacher(inputs) / self.temperature, dim=-1)
        kl = F.kl_div(F.log_softmax(outputs / self.temperature, dim=-1), soft, reduction="batchmean")
        return 0.5 * kl * self.temperature**2 + 0.5 * F.cross_entropy(outputs, targets), outputs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_with_half_batches_match_one_worker(digits, strategy):
    """20 AdamW steps (batch 64; workers take 32 each, the last batch 21/20): parameters equal to 1e-5.

    ddp trains with a distillation loss holding a teacher: the loss (and teacher) reach every worker.
    """
    torch.manual_seed(5)
    teacher = build_model("mlp", in_features=64, hidden=[48], num_classes=10)
    loss_fn = TeacherLoss(teacher) if strategy == "ddp" else classification_loss
    options = dict(epochs=1, batch_size=64, progress=False, device="cpu", seed=1, loss_fn=loss_fn)
    one = train(_mlp(), digits, **options).model
    result = train(_mlp(), digits, strategy=strategy, workers=2, timeout=60, **options)
    assert _max_diff(one, result.model) < 1e-5
    assert _max_diff(one, _mlp()) > 1e-3  # it did train
    par = result.parallel
    assert par["workers"] == 2 and par["weights_identical"]
    params = sum(p.numel() * 4 for p in one.parameters())
    per_worker = [m["params"] for m in par["memory"]]
    if strategy == "fsdp":  # each worker holds about half of the parameters (shards are padded to equal size)
        assert all(params / 2 <= b < params / 2 + 1024 for b in per_worker)
    else:
        assert per_worker == [params, params]
    assert result.history[0].val_accuracy is not None


def _pipeline_probe(schedules: list[str]) -> dict:
    """In each worker: one step of a 2-stage pipeline per schedule; outputs and gradients gathered."""
    import torch.distributed as dist

    init_worker(torch.device("cpu"), 60)
    found = {}
    for schedule in schedules:
        torch.manual_seed(0)
        inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        stage, worker, info = apply_pipeline(
            _mlp(), inputs, torch.device("cpu"), split_points=["fc1"], schedule=schedule, microbatches=4
        )
        loss, outputs = worker.step(inputs, targets)
        grads = {name: p.grad for name, p in stage.named_parameters()}
        parts = [None, None]
        detached = (outputs.detach(), loss.detach()) if loss is not None else (None, None)
        dist.all_gather_object(parts, (grads, *detached))
        merged = {k: v for g, _, _ in parts for k, v in g.items()}
        found[schedule] = {
            "grads": merged,
            "outputs": parts[1][1],
            "loss": parts[1][2].detach(),
            "info": info,
        }
    return found


def test_pipeline_outputs_and_gradients_equal_the_unsplit_model():
    found = run_local(_pipeline_probe, (["gpipe", "1f1b"],), workers=2, timeout_s=60)
    torch.manual_seed(0)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    model = _mlp()
    loss, outputs = classification_loss(model, inputs, targets)
    loss.backward()
    for schedule, got in found.items():
        assert torch.allclose(got["outputs"], outputs.detach(), atol=1e-6), schedule
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-6), schedule
        assert got["grads"].keys() == {n for n, _ in model.named_parameters()}
        for name, p in model.named_parameters():
            assert torch.allclose(got["grads"][name], p.grad, atol=1e-6), (schedule, name)
        info = got["info"]
        assert info["bubble"] == pytest.approx(1 / 5)  # (stages-1)/(micro-batches+stages-1)
        assert sum(info["stage_param_bytes"]) == sum(p.numel() * 4 for p in model.parameters())


def test_pipeline_trains_and_is_reachable_from_train(digits):
    result = train(
        _mlp(), digits, strategy="pipeline", workers=2, epochs=2, lr=1e-2, progress=False, device="cpu"
    )
    assert result.parallel["split_points"] == balanced_split_points(_mlp(), 2)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[-1].val_accuracy > 0.5


def test_balanced_split_points():
    """Cuts fall between the containers' children so that stages hold about equal parameter counts."""
    model = build_model("cnn", in_channels=1, num_classes=10, width=8, blocks=4)
    units = ["stem.0", "stem.1", "stem.2", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "pool", "fc"]
    assert [n for n, _ in split_units(model)] == units
    assert balanced_split_points(model, 2) == ["blocks.2"]  # 2456 | 2458 parameters
    assert balanced_split_points(model, 4) == [
        "blocks.1",
        "blocks.2",
        "blocks.3",
    ]  # 1272 | 1184 | 1184 | 1274
    assert balanced_split_points(model, 9) == units[1:]  # one unit per stage at most
    with pytest.raises(ConfigError, match="10 stages need 10 units; the model has 9"):
        balanced_split_points(model, 10)


def test_refusals_come_before_any_worker_starts(digits):
    with pytest.raises(ConfigError, match="unknown strategy 'zero'"):
        train(_mlp(), digits, strategy="zero")
    with pytest.raises(ConfigError, match="must pickle"):
        train(_mlp(), digits, strategy="ddp", workers=2, loss_fn=lambda m, x, y: classification_loss(m, x, y))
    with pytest.raises(ConfigError, match="custom loss_fn needs ddp or fsdp"):
        train(_mlp(), digits, strategy="pipeline", workers=2, loss_fn=TeacherLoss(_mlp()))
    with pytest.raises(ConfigError, match="need --strategy pipeline"):
        train(_mlp(), digits, strategy="ddp", workers=2, microbatches=2)
    with pytest.raises(ConfigError, match="strategy 'single' runs one worker"):
        train(_mlp(), digits, workers=2)


class HangOnRank1:
    """A loss that makes worker 1 hang at its first training step, as a deadlocked worker would."""

    def __call__(self, model, inputs, targets):
        if os.environ.get("RANK") == "1" and model.training:
            time.sleep(600)
        return classification_loss(model, inputs, targets)


def test_hung_worker_stops_the_run_within_the_timeout(digits):
    """Worker 0 waits in the gradient all-reduce until the group timeout ends it; the launcher names worker 1
    (the one that did not answer), not worker 0 (the one that gave up), and stops all."""
    started = time.monotonic()
    with pytest.raises(
        WorkerError, match=r"^worker 1 stopped responding for 5 s; the run was stopped$"
    ) as caught:
        options = dict(epochs=1, progress=False, device="cpu", loss_fn=HangOnRank1())
        train(_mlp(), digits, strategy="ddp", workers=2, timeout=5, **options)
    assert "\n" not in str(caught.value)
    assert time.monotonic() - started < 60  # worker start-up (slow on a loaded machine) + the 5 s timeout


def _keiryo_train(*args: str) -> list[str]:
    return ["-m", "keiryo", "train", "--model", "mlp", "--no-progress", "--device", "cpu", *args]


def test_two_torchrun_agents_finish_with_identical_weights(tmp_path):
    """Two torchrun agents (as on two nodes) meet at a c10d rendezvous on 127.0.0.1, run the same command."""
    port = free_port()
    command = [
        *("torchrun", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"),
        *(f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=keiryo-test", "--max-restarts=0"),
        *_keiryo_train("--strategy", "ddp", "--epochs", "2", "--out", str(tmp_path / "model.pt")),
    ]
    agents = [
        subprocess.Popen(
            command, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=240)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs
    prints = [re.search(r"rank (\d)/2: weights sha256 (\w+) \(same on all workers\)", out) for out in outputs]
    assert all(prints), outputs
    assert sorted(m[1] for m in prints) == ["0", "1"]
    assert prints[0][2] == prints[1][2]
    from keiryo.artifacts import load
    from keiryo.parallel.launch import fingerprint

    assert fingerprint(load(tmp_path / "model.pt").state_dict()) == prints[0][2]


def _spawned_workers(parent: int) -> list[int]:
    """Child pids of `parent` that are multiprocessing spawn workers (not the resource tracker)."""
    found = []
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        if "spawn_main" in cmdline:
            found.append(int(child))
    return found


def test_killed_worker_stops_the_run_and_the_checkpoint_resumes(tmp_path):
    ck, out = tmp_path / "ck.pt", tmp_path / "model.pt"
    args = _keiryo_train(
        *("--strategy", "ddp", "--workers", "2", "--epochs", "30", "--timeout", "20"),
        *("--checkpoint", str(ck), "--checkpoint-every", "7", "--out", str(out)),
    )
    run = subprocess.Popen(
        [sys.executable, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not ck.exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    assert ck.exists() and run.poll() is None, "no checkpoint before the run ended"
    workers = _spawned_workers(run.pid)
    assert len(workers) == 2
    killed_at = time.monotonic()
    os.kill(workers[-1], 9)
    _, err = run.communicate(timeout=60)
    assert time.monotonic() - killed_at < 20 + 10  # the timeout, plus slack for a loaded machine
    assert run.returncode == 2
    lines = [line for line in err.strip().splitlines() if "Warning" not in line and "warn" not in line]
    assert len(lines) == 1 and re.fullmatch(
        r"error: worker \d was killed \(SIGKILL\); the run was stopped", lines[0]
    )
    saved = load_checkpoint(ck)
    assert saved["global_step"] > 0
    resumed = subprocess.run(
        [sys.executable, *args, "--resume"], env=ENV, capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {saved['global_step']}" in resumed.stdout
    assert out.exists()
