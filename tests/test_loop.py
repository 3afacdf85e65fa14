from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from keiryo import artifacts
from keiryo.errors import ArtifactError, ConfigError
from keiryo.loop import TrainConfig, classification_loss, evaluate, fit
from keiryo.models import build_model
from keiryo.parallel.config import DDP, FSDP, STRATEGIES, Async, Pipeline, Single, strategy_of
from keiryo.training import train


def _mlp():
    torch.manual_seed(0)
    return build_model("mlp", in_features=64, hidden=[32], num_classes=10)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_learns_digits(digits):
    result = train(_mlp(), digits, config=TrainConfig(epochs=3, progress=False, device="cpu"))
    assert len(result.history) == 3
    assert result.history[-1].train_loss < result.history[0].train_loss
    _, acc = evaluate(result.model, digits.test)
    assert acc > 0.7  # chance is 0.1; 3 short epochs of a 32-wide mlp


def test_seeded_runs_are_identical(digits):
    a = train(_mlp(), digits, config=TrainConfig(epochs=2, progress=False, device="cpu", seed=3)).model
    b = train(_mlp(), digits, config=TrainConfig(epochs=2, progress=False, device="cpu", seed=3)).model
    c = train(_mlp(), digits, config=TrainConfig(epochs=2, progress=False, device="cpu", seed=4)).model
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
    config = TrainConfig(epochs=2, progress=False, device="cpu", precision=precision)
    result = train(_mlp(), digits, config=config)
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
    options = dict(options)
    strategy = options.pop("strategy", "single")
    with pytest.raises(ConfigError, match=message) as info:
        train(_mlp(), digits, strategy, TrainConfig.from_dict({"progress": False, **options}))
    assert "\n" not in str(info.value)


def test_regression_targets_train_with_mse():
    torch.manual_seed(0)
    x = torch.randn(2000, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = build_model("mlp", in_features=4, hidden=[16], num_classes=1)
    result = train(model, (x, y), config=TrainConfig(epochs=10, progress=False, device="cpu", lr=1e-2))
    assert result.history[-1].train_accuracy is None
    assert result.history[-1].train_loss < 0.2 * result.history[0].train_loss


# ---- defaults that fit small data (issue 14.6) -------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny models on a shared machine: a second thread only contends (conftest restores the count after)."""
    torch.set_num_threads(1)


def _small_data_benchmark():
    """benchmarks/small_data.py, whose figures the test below checks (the same code, not a copy)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "small_data.py"
    spec = importlib.util.spec_from_file_location("small_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_on_a_few_hundred_samples_reach_a_plain_adamw_loop(one_thread):
    """keiryo's defaults (budget of min_steps, early stopping, best weights) on breast cancer's 398 samples
    are no worse than the 10-line loop users would write (issue 14: they were 0.924 vs 0.947)."""
    bench = _small_data_benchmark()
    x, y, _, _ = bench.load("breast-cancer", 0)
    said = fit(bench.mlp(30, 2, 0), (x, y), TrainConfig(epochs=1, progress=False, device="cpu")).data
    assert said.startswith("data: 398 samples → 338 train / 60 validation (15%, stratified)")
    accuracy = {way: sum(accs) / len(accs) for way, accs in bench.run("breast-cancer", (0, 1, 2)).items()}
    assert accuracy["keiryo"] >= accuracy["plain"] - 1e-9, accuracy
    assert accuracy["keiryo"] > accuracy["old defaults"] + 0.01, accuracy


def test_the_budget_grows_on_small_data_and_explicit_epochs_are_kept():
    assert TrainConfig().epochs_for(steps_per_epoch=6) == 167  # 1000 steps
    assert TrainConfig().epochs_for(steps_per_epoch=500) == 10
    assert TrainConfig(min_steps=0).epochs_for(steps_per_epoch=1) == 10
    assert TrainConfig(epochs=3).epochs_for(steps_per_epoch=1) == 3


def _noise(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", in_features=8, hidden=[16], num_classes=3)


def test_the_split_is_said_and_can_be_chosen(capsys):
    x, y = _noise(200, 0)
    shown = fit(_net(), (x, y), TrainConfig(epochs=1, device="cpu"))
    assert shown.data.startswith("data: 200 samples → 170 train / 30 validation (15%, stratified)")
    assert "validation=0" in shown.data and shown.data in capsys.readouterr().out.replace("\n", "")
    everything = fit(_net(), (x, y), TrainConfig(epochs=2, progress=False, device="cpu", validation=0))
    assert "200 samples, all for training" in everything.data
    assert everything.best_epoch is None and all(h.val_loss is None for h in everything.history)
    given = {"train": (x, y), "validation": _noise(20, 1)}
    chosen = fit(_net(), given, TrainConfig(epochs=1, progress=False, device="cpu"))
    assert chosen.data == "data: 200 train / 20 validation samples, as given"
    with pytest.raises(ConfigError, match="'train' entry"):
        fit(_net(), {"training": (x, y)}, TrainConfig(epochs=1, progress=False, device="cpu"))
    with pytest.raises(ConfigError, match="validation must be a fraction"):
        TrainConfig(validation=1.0)


def test_early_stopping_keeps_the_best_epochs_weights(one_thread):
    """Labels that are noise: validation never keeps improving, the run stops, and the model holds the best
    epoch's weights, not the last."""
    x, y = _noise(300, 0)
    x_val, y_val = _noise(60, 1)
    config = TrainConfig(epochs=200, patience=3, lr=1e-2, progress=False, device="cpu")
    result = fit(_net(), {"train": (x, y), "validation": (x_val, y_val)}, config)
    assert len(result.history) < 200
    best = max(result.history, key=lambda h: (h.val_accuracy, -h.val_loss))
    assert result.best_epoch == best.epoch == len(result.history) - 3
    loss, acc = evaluate(result.model, torch.utils.data.TensorDataset(x_val, y_val))
    assert (loss, acc) == pytest.approx((best.val_loss, best.val_accuracy))
    kept_last = fit(_net(), {"train": (x, y), "validation": (x_val, y_val)}, replace(config, patience=None))
    assert len(kept_last.history) == 200 and kept_last.best_epoch is None


def test_an_interrupted_run_resumes_with_its_best_epoch(tmp_path, one_thread):
    x, y = _noise(300, 0)
    data = {"train": (x, y), "validation": _noise(60, 1)}
    config = TrainConfig(epochs=12, patience=100, lr=1e-2, progress=False, device="cpu")
    full = fit(_net(), data, config)
    assert full.best_epoch is not None and full.best_epoch < 12  # noise: the best is not the last
    ck = str(tmp_path / "ck.pt")
    interrupted = replace(config, checkpoint=ck, checkpoint_every=7)
    with pytest.raises(KeyboardInterrupt):
        fit(_net(), data, interrupted, loss_fn=_Interrupt(at=58))  # 5 steps per epoch: late in the last one
    resumed = fit(_net(), data, replace(interrupted, resume=True))
    assert resumed.resumed_from is not None and resumed.best_epoch == full.best_epoch
    assert _same_weights(full.model, resumed.model)


class _Keyed(torch.nn.Module):
    """A model called with keyword arguments, as Hugging Face models are."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> dict:
        return {"logits": self.net(features * scale[:, None])}


def test_samples_of_dicts_train_and_evaluate():
    x, y = _noise(120, 0)
    samples = [{"features": x[i], "scale": torch.tensor(1.0), "labels": y[i]} for i in range(len(x))]
    result = fit(_Keyed(), samples, TrainConfig(epochs=3, progress=False, device="cpu", lr=1e-2))
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[-1].val_accuracy is not None


# ---- strategies: a name or a config ------------------------------------------------------------------------


def test_strategy_names_and_configs_are_the_same_choice():
    assert strategy_of("single") == Single() and strategy_of("single", 1) == Single()
    assert strategy_of("ddp") == DDP(workers=2) and strategy_of("fsdp", 4) == FSDP(workers=4)
    pipeline = Pipeline(workers=3, split_points=["fc1"], schedule="gpipe", microbatches=2)
    assert strategy_of(pipeline) is pipeline and strategy_of(pipeline, 3) is pipeline
    assert strategy_of("async", 3) == Async(workers=3, mode="async")
    for config in (Single(), DDP(timeout=5.0), pipeline, Async(mode="bounded", staleness_bound=2)):
        assert STRATEGIES[config.kind](**asdict(config)) == config  # a recipe step / provenance round trip


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: strategy_of("magic"), "unknown strategy 'magic'"),
        (lambda: strategy_of("single", 2), "'single' runs one worker"),
        (lambda: strategy_of(DDP(workers=2), 3), "differs"),
        (lambda: strategy_of({"kind": "ddp"}), "strategy must be a name"),
        (lambda: DDP(workers=0), "workers must be a whole number ≥ 1"),
        (lambda: FSDP(timeout=float("nan")), "timeout"),
        (lambda: Pipeline(schedule="zigzag"), "unknown pipeline schedule"),
        (lambda: Pipeline(split_points="fc1"), "split_points"),
        (lambda: Pipeline(microbatches=0), "microbatches"),
        (lambda: Async(mode="eventually"), "unknown async mode"),
        (lambda: Async(workers=2, slowdown=[1.0]), "one factor ≥ 1 per worker"),
        (lambda: Async(max_updates=0), "max_updates"),
        (lambda: Async(on_failure="ignore"), "on_failure"),
    ],
)
def test_bad_strategy_options_are_one_line_errors(make, message):
    with pytest.raises(ConfigError, match=message) as info:
        make()
    assert "\n" not in str(info.value)
