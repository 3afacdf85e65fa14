"""The Ray parameter server: counting, staleness control, failures, checkpoints (one local Ray)."""

from __future__ import annotations

import re

import pytest
import torch

from keiryo.checkpoints import ASYNC_CHECKPOINT_FORMAT, load_checkpoint, write_checkpoint
from keiryo.errors import ConfigError, TrainingError
from keiryo.loop import TrainConfig
from keiryo.metrics import accuracy
from keiryo.models import build_model
from keiryo.parallel import async_ps
from keiryo.parallel.async_ps import train_async
from keiryo.parallel.config import Async
from keiryo.parallel.ray_setup import ray_init

ray = pytest.importorskip("ray")  # a declared dependency; this only keeps a broken install from hiding here


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module, started the way train_async starts its own (loopback only)."""
    started = ray_init(None)
    yield
    if started:
        ray.shutdown()


def _mlp():
    torch.manual_seed(0)
    return build_model("mlp", in_features=64, hidden=[32], num_classes=10)


def _async(**overrides) -> Async:
    return Async(**{"workers": 3, "max_updates": 60, "eval_every": 0.2, **overrides})


def _train(**options) -> TrainConfig:
    """The user's training settings: AdamW at its default rate on the server, batches of 32."""
    return TrainConfig(**{"batch_size": 32, "progress": False, "patience": None, **options})


def _run(data, strategy: Async, config: TrainConfig | None = None, **kwargs):
    return train_async(_mlp(), data, strategy, config or _train(), **kwargs)


def test_every_accepted_push_is_one_update_and_the_model_learns(digits):
    model = _mlp()
    before = accuracy(model, digits.test)
    result = train_async(model, digits, _async(max_updates=150), _train())
    s = result.stats
    assert s["version"] == s["accepted"] == 150 == sum(s["pushes"].values())
    assert s["discarded"] == 0 and len(s["pushes"]) == 3
    assert accuracy(result.model, digits.test) > max(0.6, before + 0.3)
    assert result.timeline and result.timeline[-1]["version"] <= 150


def test_bounded_staleness_never_applies_a_staler_gradient(digits):
    slow = [1.0, 1.0, 6.0]
    free = _run(digits, _async(mode="async", slowdown=slow, max_updates=80))
    bounded = _run(digits, _async(mode="bounded", staleness_bound=1, slowdown=slow, max_updates=80))
    assert free.stats["staleness_max"] > 1  # without a bound, the slow worker's pushes are stale
    assert bounded.stats["staleness_max"] <= 1
    assert bounded.stats["version"] == bounded.stats["accepted"] == 80


def test_sync_mode_is_a_barrier(digits):
    result = _run(digits, _async(mode="sync", max_updates=20, slowdown=[1.0, 1.0, 3.0]))
    pushes = result.stats["pushes"]
    assert result.stats["version"] == 20
    assert set(pushes.values()) == {20}  # every worker contributed to every round, the slow one too
    assert result.stats["staleness_max"] == 0


@pytest.mark.parametrize("mode", ["scaled", "dcasgd"])
def test_staleness_corrections_train(digits, mode):
    result = _run(digits, _async(mode=mode, max_updates=120))
    assert result.stats["version"] == 120
    assert accuracy(result.model, digits.test) > 0.6


def test_killed_worker_is_restarted_and_no_update_is_lost(digits, tmp_path):
    """...and the server's checkpoint holds the optimizer the user configured (AdamW's moments, its decay)."""
    ck = str(tmp_path / "ps.pt")
    killed = []

    def kill_once(ctx):
        if not killed and ctx["stats"]["version"] >= 10 and 0 in ctx["workers"]:
            ray.kill(ctx["workers"][0])
            killed.append(ctx["stats"]["version"])

    config = _train(checkpoint=ck, checkpoint_every=20)
    result = _run(digits, _async(max_updates=120, eval_every=0.1), config, on_tick=kill_once)
    assert killed, "the worker was never killed"
    assert result.restarts == 1
    s = result.stats
    assert s["version"] == s["accepted"] == 120 == sum(s["pushes"].values())
    saved = load_checkpoint(ck, ASYNC_CHECKPOINT_FORMAT)
    assert saved["version"] == 120
    assert all(torch.equal(saved["model"][k], v) for k, v in result.model.state_dict().items())
    assert {"exp_avg", "exp_avg_sq"} <= set(saved["optimizer"]["state"][0])
    assert saved["optimizer"]["param_groups"][0]["weight_decay"] == config.weight_decay
    # resume from the checkpoint and go on to 160 updates
    resumed = _run(digits, _async(max_updates=160), _train(checkpoint=ck, resume=True))
    assert resumed.stats["version"] == 160 and resumed.stats["accepted"] == 160
    assert sum(resumed.stats["pushes"].values()) == 40


def test_killed_parameter_server_is_restarted_from_its_checkpoint_and_the_count_goes_on(digits, tmp_path):
    """on_failure="restart": the driver starts a new server from the last checkpoint of this run; it counts on
    from the checkpoint's update, applies exactly the updates left, and the run ends at max_updates."""
    ck = str(tmp_path / "ps.pt")
    killed = []

    def kill_server_once(ctx):
        if not killed and ctx["stats"]["version"] >= 6:
            killed.append(load_checkpoint(ck, ASYNC_CHECKPOINT_FORMAT)["version"])
            ray.kill(ctx["server"])

    model = _mlp()
    before = accuracy(model, digits.test)
    config = _train(checkpoint=ck, checkpoint_every=3)
    result = train_async(
        model, digits, _async(workers=2, max_updates=90, eval_every=0.1), config, on_tick=kill_server_once
    )
    assert killed, "the server was never killed"
    (resumed_at,) = result.server_restarts
    assert resumed_at % 3 == 0 and resumed_at >= killed[0] >= 6  # its checkpoint when it died, or a later one
    s = result.stats
    assert s["version"] == s["accepted"] == 90
    assert sum(s["pushes"].values()) == 90 - resumed_at  # the new server applied exactly the updates left
    assert load_checkpoint(ck, ASYNC_CHECKPOINT_FORMAT)["version"] == 90
    assert accuracy(result.model, digits.test) > before + 0.3


def test_a_server_that_keeps_dying_ends_the_run_and_a_stale_checkpoint_is_not_taken(
    digits, tmp_path, monkeypatch
):
    """A server killed at every check is restarted MAX_SERVER_RESTARTS times (1 here), then the run ends in
    one line. The checkpoint file at the path is another run's, and this run never reaches its first
    checkpoint: the restart begins from the start, not from the stale file."""
    monkeypatch.setattr(async_ps, "MAX_SERVER_RESTARTS", 1)
    ck = str(tmp_path / "ps.pt")
    write_checkpoint({"version": 40, "run": "an-earlier-run"}, ck, ASYNC_CHECKPOINT_FORMAT)
    seen = []

    def kill_server(ctx):
        seen.append(ctx["stats"]["version"])
        ray.kill(ctx["server"])

    config = _train(checkpoint=ck, checkpoint_every=10_000)
    with pytest.raises(TrainingError) as caught:
        _run(digits, _async(workers=2, max_updates=100_000, eval_every=0.1), config, on_tick=kill_server)
    assert len(seen) == 2 and max(seen) < 40  # two servers, each from the start
    assert re.fullmatch(
        r"the parameter server died \(\w+Error; last seen at update \d+, after 1 restarts\); "
        rf"nothing of this run to resume from \('{re.escape(ck)}' is another run's\)",
        str(caught.value),
    )


def test_dead_parameter_server_ends_the_run_in_one_line_and_the_checkpoint_resumes(digits, tmp_path):
    """on_failure="continue": a dead server ends the run, and --resume continues from its checkpoint."""
    ck = str(tmp_path / "ps.pt")

    def kill_server(ctx):
        if ctx["stats"]["version"] >= 6:
            ray.kill(ctx["server"])

    config = _train(checkpoint=ck, checkpoint_every=3)
    with pytest.raises(TrainingError) as caught:
        _run(
            digits,
            _async(max_updates=100_000, eval_every=0.1, on_failure="continue"),
            config,
            on_tick=kill_server,
        )
    saved = load_checkpoint(ck, ASYNC_CHECKPOINT_FORMAT)["version"]
    assert saved >= 6
    assert re.fullmatch(
        r"the parameter server died \(\w+Error; last seen at update \d+\); "
        rf"rerun with --resume to continue from its checkpoint at update {saved}",
        str(caught.value),
    )
    resumed = _run(digits, _async(max_updates=saved + 5), _train(checkpoint=ck, resume=True))
    assert resumed.stats["version"] == saved + 5


def test_run_goes_on_without_a_dead_worker_when_configured(digits):
    def kill_once(ctx):
        if ctx["stats"]["version"] >= 5 and 1 in ctx["workers"]:
            ray.kill(ctx["workers"][1])

    result = _run(digits, _async(on_failure="continue", max_updates=80), on_tick=kill_once)
    assert result.restarts == 0 and result.stats["version"] == 80


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "hogwild"}, "unknown async mode"),
        ({"slowdown": [1.0]}, "slowdown"),
        ({"on_failure": "panic"}, "on_failure"),
    ],
)
def test_bad_config_is_one_line(digits, overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        _run(digits, _async(**overrides))
    assert "\n" not in str(caught.value)


def test_train_cli_runs_the_async_strategy(tmp_path, capsys):
    from keiryo import artifacts
    from keiryo.cli import main

    out = tmp_path / "async.pt"
    args = [
        "train",
        "--model",
        "mlp",
        "--strategy",
        "async",
        "--workers",
        "2",
        "--epochs",
        "2",
        "--async-mode",
        "bounded",
        "--slowdown",
        "1,2",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert "test accuracy" in capsys.readouterr().out
    assert artifacts.load(out)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    assert main([*args[:-2], "--slowdown", "fast", "--out", str(out)]) == 2
    assert "--slowdown" in capsys.readouterr().err
