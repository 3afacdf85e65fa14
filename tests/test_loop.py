from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from keiryo import artifacts
from keiryo.errors import ArtifactError, ConfigError
from keiryo.loop import TrainConfig, classification_loss, evaluate, fit, train
from keiryo.models import build_model


def _mlp():
    torch.manual_seed(0)
    return build_model("mlp", in_features=64, hidden=[32], num_classes=10)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_learns_digits(digits):
    result = train(_mlp(), digits, epochs=3, progress=False, device="cpu")
    assert len(result.history) == 3
    assert result.history[-1].train_loss < result.history[0].train_loss
    _, acc = evaluate(result.model, digits.test)
    assert acc > 0.7  # chance is 0.1; 3 short epochs of a 32-wide mlp


def test_seeded_runs_are_identical(digits):
    a = train(_mlp(), digits, epochs=2, progress=False, device="cpu", seed=3).model
    b = train(_mlp(), digits, epochs=2, progress=False, device="cpu", seed=3).model
    c = train(_mlp(), digits, epochs=2, progress=False, device="cpu", seed=4).model
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


class _Interrupt:
    """A loss that raises KeyboardInterrupt at training step `at`, as if the run were stopped there."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, model, inputs, targets):
        if model.training:
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
        return classification_loss(model, inputs, targets)


def test_interrupted_run_resumes_to_identical_weights(digits, tmp_path):
    ck = str(tmp_path / "ck.pt")
    full = fit(_mlp(), digits, TrainConfig(epochs=3, progress=False, device="cpu"))
    config = TrainConfig(epochs=3, progress=False, device="cpu", checkpoint=ck, checkpoint_every=5)
    with pytest.raises(KeyboardInterrupt):
        fit(_mlp(), digits, config, loss_fn=_Interrupt(at=33))  # mid-epoch 2 (20 steps per epoch)
    saved = torch.load(ck, weights_only=True)
    assert saved["global_step"] == 30 and saved["epoch"] == 1 and saved["step_in_epoch"] == 10
    config.resume = True
    resumed = fit(_mlp(), digits, config)
    assert resumed.resumed_from == 30
    assert _same_weights(full.model, resumed.model)
    assert [h.epoch for h in resumed.history] == [1, 2, 3]


def test_killed_cli_run_resumes_to_identical_weights(tmp_path):
    """SIGKILL a real `keiryo train` once it has checkpointed; resuming ends where an unbroken run ends."""
    common = ["-m", "keiryo", "train", "--model", "mlp", "--epochs", "12", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ck = tmp_path / "ck.pt"
    subprocess.run([sys.executable, *common, "--out", str(tmp_path / "full.pt")], check=True, env=env)
    args = [
        *common,
        "--out",
        str(tmp_path / "resumed.pt"),
        "--checkpoint",
        str(ck),
        "--checkpoint-every",
        "7",
    ]
    proc = subprocess.Popen([sys.executable, *args], env=env)
    deadline = time.time() + 60
    while not ck.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.exists(), "the run never wrote a checkpoint"
    killed_at = torch.load(ck, weights_only=True)["global_step"]
    out = subprocess.run(
        [sys.executable, *args, "--resume"], check=True, env=env, capture_output=True, text=True
    ).stdout
    assert f"resumed from step {killed_at}" in out
    assert killed_at < 12 * 20
    full, resumed = artifacts.load(tmp_path / "full.pt"), artifacts.load(tmp_path / "resumed.pt")
    assert _same_weights(full, resumed)


def test_checkpoint_of_another_model_is_refused(digits, tmp_path):
    ck = str(tmp_path / "ck.pt")
    fit(_mlp(), digits, TrainConfig(epochs=1, progress=False, device="cpu", checkpoint=ck))
    other = build_model("mlp", in_features=64, hidden=[16], num_classes=10)
    with pytest.raises(ArtifactError, match="does not match this model"):
        fit(other, digits, TrainConfig(epochs=2, progress=False, device="cpu", checkpoint=ck, resume=True))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(digits, precision):
    result = train(_mlp(), digits, epochs=2, progress=False, device="cpu", precision=precision)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast, not a cast


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 0}, "epochs"),
        ({"precision": "fp8"}, "unknown precision"),
        ({"strategy": "magic"}, "unknown strategy"),
        ({"optimizer": "lion"}, "unknown optimizer"),
        ({"bogus": 1}, "unknown training option"),
        ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "nonsense"}, "device"),
    ],
)
def test_bad_options_are_one_line_errors(digits, options, message):
    with pytest.raises(ConfigError, match=message) as info:
        train(_mlp(), digits, progress=False, **options)
    assert "\n" not in str(info.value)


def test_regression_targets_train_with_mse():
    torch.manual_seed(0)
    x = torch.randn(2000, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = build_model("mlp", in_features=4, hidden=[16], num_classes=1)
    result = train(model, (x, y), epochs=10, progress=False, device="cpu", lr=1e-2)
    assert result.history[-1].train_accuracy is None
    assert result.history[-1].train_loss < 0.2 * result.history[0].train_loss
