"""Parallel training: ddp/fsdp equal one worker, the pipeline equals the unsplit model, torchrun across two
agents, a killed worker stops the run with a resumable checkpoint, training starts from a script without a
main guard, `python -c` and a notebook, and every strategy reaches single's accuracy. Real worker processes
over gloo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from keiryo.checkpoints import load_checkpoint
from keiryo.data import DataSplits, split_tensors
from keiryo.errors import ConfigError
from keiryo.loop import TrainConfig, classification_loss
from keiryo.metrics import accuracy
from keiryo.models import build_model
from keiryo.parallel.config import ASYNC_MODES, DDP, FSDP, Async, Pipeline
from keiryo.parallel.group import init_worker, teardown
from keiryo.parallel.launch import free_port, run_local, train_in_group
from keiryo.parallel.pipeline import apply_pipeline, balanced_split_points, split_units
from keiryo.parallel.ray_setup import ray_init
from keiryo.parallel.watch import WorkerError
from keiryo.training import train

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
    config = TrainConfig(epochs=1, batch_size=64, progress=False, device="cpu", seed=1)
    alone = train(_mlp(), digits, "single", config, loss_fn=loss_fn)
    one = alone.model
    spec = DDP(workers=2, timeout=60) if strategy == "ddp" else FSDP(workers=2, timeout=60)
    result = train(_mlp(), digits, spec, config, loss_fn=loss_fn)
    assert result.best_epoch == alone.best_epoch == 1  # the epoch whose weights the model holds
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
        spec = Pipeline(workers=2, split_points=["fc1"], schedule=schedule, microbatches=4)
        stage, worker, info = apply_pipeline(_mlp(), inputs, torch.device("cpu"), spec)
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
    config = TrainConfig(epochs=2, lr=1e-2, progress=False, device="cpu")
    result = train(_mlp(), digits, "pipeline", config, workers=2)
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


class LockedLoss:
    """A loss holding a lock: nothing can pickle it, so it cannot reach a worker process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, model, inputs, targets):
        return classification_loss(model, inputs, targets)


def test_refusals_come_before_any_worker_starts(digits):
    with pytest.raises(ConfigError, match="unknown strategy 'zero'"):
        train(_mlp(), digits, "zero")
    with pytest.raises(ConfigError, match="must pickle") as caught:
        train(_mlp(), digits, "ddp", workers=2, loss_fn=LockedLoss())
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="custom loss_fn needs ddp or fsdp"):
        train(_mlp(), digits, "pipeline", workers=2, loss_fn=TeacherLoss(_mlp()))
    with pytest.raises(TypeError, match="microbatches"):  # pipeline options exist on Pipeline only
        DDP(workers=2, microbatches=2)
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
        config = TrainConfig(epochs=1, progress=False, device="cpu")
        train(_mlp(), digits, DDP(workers=2, timeout=5), config, loss_fn=HangOnRank1())
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
    """Child pids of `parent` that are keiryo's worker processes."""
    found = []
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        if "keiryo.parallel.worker" in cmdline:
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


ANYWHERE = """
import torch
import keiryo


class Net(torch.nn.Module):  # defined in __main__: it reaches the workers by value
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


torch.manual_seed(0)
inputs = torch.randn(96, 4)
targets = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long()
config = keiryo.TrainConfig(epochs=2, batch_size=16, progress=False, device="cpu")
result = keiryo.train(Net(), (inputs, targets), keiryo.DDP(workers=2, timeout=60), config, loss_fn=LOSS)
par = result.parallel
print(f"trained on {par['workers']} workers: {len(result.history)} epochs, same {par['weights_identical']}")
"""
TRAINED = "trained on 2 workers: 2 epochs, same True"


def _anywhere(loss: str) -> str:
    return ANYWHERE.replace("LOSS", loss)


def test_ddp_from_a_script_without_a_main_guard(tmp_path):
    """The workers run keiryo's own entry point: the script is not run again in them (spawn re-ran it and
    failed with "An attempt has been made to start a new process before ... bootstrapping phase")."""
    script = tmp_path / "train_me.py"
    script.write_text(_anywhere("None"))
    run = subprocess.run(
        [sys.executable, str(script)], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == TRAINED  # printed once: the workers did not run the script
    assert "bootstrapping" not in run.stderr


def test_ddp_from_python_c_with_a_lambda_loss(tmp_path):
    loss = "lambda model, x, y: (torch.nn.functional.cross_entropy(model(x), y), model(x))"
    run = subprocess.run(
        [sys.executable, "-c", _anywhere(loss)],
        env=ENV,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == TRAINED


def test_ddp_from_a_notebook_whose_model_class_is_defined_in_it(tmp_path):
    """A real .ipynb executed by nbclient on an ipykernel kernel: class in one cell, training in the next."""
    import nbclient
    import nbformat

    code = _anywhere("None")
    model_cell, train_cell = code[: code.index("torch.manual_seed")], code[code.index("torch.manual_seed") :]
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(model_cell), nbformat.v4.new_code_cell(train_cell)]
    path = tmp_path / "train_me.ipynb"
    nbformat.write(notebook, path)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=ENV)
    outputs = notebook.cells[1].outputs
    assert not [o for o in outputs if o.output_type == "error"], outputs
    assert "".join(o.get("text", "") for o in outputs if o.output_type == "stream").strip() == TRAINED


def _wine() -> DataSplits:
    """scikit-learn's wine (178 samples, 13 features, 3 classes), standardized; 30% held out for the test."""
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    inputs = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    train_set, val, test = split_tensors(inputs, torch.tensor(y), seed=0, val_fraction=0.2, test_fraction=0.3)
    return DataSplits(train_set, val, test, num_classes=3, input_shape=(13,), name="wine")


def _wine_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", in_features=13, hidden=[32], num_classes=3)


def _in_one_group(specs: list, splits: DataSplits, config: TrainConfig) -> dict:
    """In each worker: train a fresh copy of the model under each strategy, one after another in one group
    (one start of the worker processes for all three); the trained weights and the history length of each."""
    device = init_worker(torch.device("cpu"), 60)
    found = {}
    for spec in specs:
        out = train_in_group(spec, _wine_mlp(), splits, config, classification_loss, device)
        found[spec.kind] = {"state": out["state"], "epochs": [h["epoch"] for h in out["history"]]}
    teardown()
    return found


def test_every_strategy_reaches_single_accuracy_with_one_line_per_epoch():
    """Same model, data and 30 epochs: ddp, fsdp, pipeline and every async mode (the server applying the
    configured AdamW) end within 2 points of `single` on the test split, each history one line per epoch."""
    splits, epochs = _wine(), 30
    config = TrainConfig(epochs=epochs, batch_size=16, patience=None, progress=False, device="cpu")
    single = train(_wine_mlp(), splits, "single", config)
    reference = accuracy(single.model, splits.test)
    found = {"single": (reference, [h.epoch for h in single.history])}
    specs = [DDP(), FSDP(), Pipeline(microbatches=4)]
    for kind, out in run_local(_in_one_group, (specs, splits, config), workers=2, timeout_s=60).items():
        model = _wine_mlp()
        model.load_state_dict(out["state"])
        found[kind] = (accuracy(model, splits.test), out["epochs"])
    started = ray_init(None)
    try:
        for mode in ASYNC_MODES:
            result = train(_wine_mlp(), splits, Async(workers=2, mode=mode, eval_every=0.2), config)
            found[f"async-{mode}"] = (accuracy(result.model, splits.test), [h.epoch for h in result.history])
    finally:
        if started:
            import ray

            ray.shutdown()
    assert reference >= 0.9, found
    for kind, (acc, lines) in found.items():
        assert acc >= reference - 0.02, (kind, found)
        assert lines == list(range(1, epochs + 1)), (kind, lines)
