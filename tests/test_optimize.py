from __future__ import annotations

import pytest
import torch

from keiryo.errors import ConfigError
from keiryo.loop import TrainConfig
from keiryo.models import build_model
from keiryo.optimize import Search, optimize, parse_duration
from keiryo.training import train


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[128], num_classes=10)
    train(model, digits, config=TrainConfig(epochs=4, progress=False, device="cpu"))
    return model


def test_choice_is_within_budget_on_test_and_on_the_pareto_front(trained, digits):
    search = Search(
        max_drop=1.0,
        objective="size",
        ratios=(0.3, 0.6, 0.95),
        distill=(False,),
        methods=(None,),
        finetune=TrainConfig(epochs=1, lr=1e-3, device="cpu", progress=False),
        time_limit=None,
    )
    result = optimize(trained, digits, search)
    best = result.best
    assert len(result.candidates) == 3
    assert (
        best.test_accuracy >= result.baseline_test - 0.01 and best.val_accuracy >= result.baseline_val - 0.01
    )
    tried = [*result.candidates]
    original_cost = next(r.bytes for r in result.report.rows if r.name == "original")
    assert best.cost <= original_cost
    for c in tried:  # nothing tried is at least as cheap and at least as accurate, and better in one
        dominates = c.cost <= best.cost and c.drop >= best.drop and (c.cost < best.cost or c.drop > best.drop)
        assert not dominates, c.name
    assert any(not c.within_budget for c in tried) or best.name != "original"


def test_time_limit_stops_the_search_and_keeps_the_original(trained, digits):
    result = optimize(trained, digits, Search(time_limit=0.0, methods=(None,), ratios=(0.5,)))
    assert result.stopped_early and result.candidates == [] and result.best.name == "original"


@pytest.mark.parametrize(
    ("options", "message"), [({"objective": "joy"}, "unknown objective"), ({"max_drop": -1}, "max_drop")]
)
def test_bad_options(trained, digits, options, message):
    with pytest.raises(ConfigError, match=message):
        optimize(trained, digits, Search(**options))


def test_parse_duration():
    assert parse_duration("90s") == 90 and parse_duration("10m") == 600 and parse_duration("2") == 2
    with pytest.raises(ConfigError, match="duration"):
        parse_duration("soon")


def test_cli_optimize_writes_the_chosen_model(trained, tmp_path, capsys):
    from keiryo import artifacts
    from keiryo.cli import main

    path = artifacts.save(trained, tmp_path / "mlp.pt")
    out = tmp_path / "best.pt"
    args = [
        "optimize",
        str(path),
        "--ratios",
        "0.5",
        "--methods",
        "none",
        "--finetune-epochs",
        "1",
        "--objective",
        "size",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "chosen:" in text and "tried p0.5" in text and out.exists()
    assert main(["optimize", str(path), "--ratios", "half"]) == 2
    assert "--ratios" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratios": (0.5, 1.5)}, "between 0 and 1"),
        ({"ratios": (0.95,)}, "narrowest layer"),  # the model has an 8-wide layer: ≤ 0.875
        ({"time_limit": -5.0}, "time limit"),
        ({"methods": (None, "int3")}, "int3"),
        ({"finetune": 3}, "finetune"),
        ({"finetune": None}, "finetune"),  # distilled candidates need fine-tuning
        ({"seed": 2**70}, "seed"),
    ],
)
def test_bad_search_options_fail_before_any_candidate(digits, options, message):
    tried = []
    model = build_model("mlp", in_features=64, hidden=[8], num_classes=10)
    with pytest.raises(ConfigError, match=message):
        optimize(model, digits, Search(**options), on_candidate=tried.append)
    assert tried == []


def test_negative_or_nan_durations_are_refused():
    for text in ("-5", "-1m", "nan"):
        with pytest.raises(ConfigError, match="time limit"):
            parse_duration(text)
    assert parse_duration("0") == 0
