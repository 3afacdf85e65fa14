from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from keiryo import report
from keiryo.metrics import (
    agreement,
    batch_of,
    compare,
    count_flops,
    count_parameters,
    file_bytes,
    measure,
    threads,
    time_models,
)
from keiryo.models import build_model


def test_parameters_and_flops_of_a_known_model_are_exact():
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))
    total, nonzero = count_parameters(model)
    assert total == 10 * 5 + 5 + 5 * 2 + 2 == nonzero
    # one sample: 2·m·n multiply-adds per Linear (bias adds are not counted by flop_counter)
    assert count_flops(model, torch.randn(8, 10)) == 2 * 10 * 5 + 2 * 5 * 2
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1, bias=False)
    assert count_flops(conv, torch.randn(2, 3, 6, 6)) == 2 * (3 * 3 * 3) * 4 * 6 * 6


def test_flops_of_kernels_the_counter_cannot_see_are_unknown_not_zero():
    from torch.ao.quantization import quantize_dynamic
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))
    assert count_flops(quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8), torch.randn(8, 10)) is None
    quantize_(model, Int8WeightOnlyConfig())  # torchao: quantized weights as tensor subclasses
    assert count_flops(model, torch.randn(8, 10)) is None


def test_a_compiled_model_is_counted_through_its_eager_forward():
    def compiled_code(*args, **kwargs):
        raise AssertionError("the compiled code ran under the FLOP counter")

    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))
    flops = 2 * 10 * 5 + 2 * 5 * 2
    wrapped = torch.compile(model)
    wrapped.forward = compiled_code  # what torch.compile(model)'s wrapper would run
    assert count_flops(wrapped, torch.randn(8, 10)) == flops
    model._compiled_call_impl = compiled_code  # what model.compile() installs in place
    assert count_flops(model, torch.randn(8, 10)) == flops
    assert model._compiled_call_impl is compiled_code  # still compiled afterwards


def test_nonzero_counts_zeroed_weights():
    model = nn.Linear(10, 10)
    with torch.no_grad():
        model.weight[:, :4] = 0
    total, nonzero = count_parameters(model)
    assert total == 110
    assert nonzero == 110 - 40


def test_file_bytes_tracks_weight_bytes():
    small = build_model("mlp", in_features=64, hidden=[16], num_classes=10)
    big = build_model("mlp", in_features=64, hidden=[512], num_classes=10)
    weights = sum(p.numel() * 4 for p in big.parameters())
    assert weights < file_bytes(big) < weights * 1.1 + 20_000
    assert file_bytes(small) < file_bytes(big)


def test_agreement_of_identical_and_perturbed_models():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    x = torch.randn(64, 8)
    same = agreement(model, model, x)
    assert same.top1 == 1.0 and same.max_error == 0.0 and same.cosine == pytest.approx(1.0)
    noisy = nn.Linear(8, 4)
    noisy.load_state_dict(model.state_dict())
    with torch.no_grad():
        noisy.weight.add_(0.5 * torch.randn_like(noisy.weight))
    worse = agreement(noisy, model, x)
    assert worse.top1 < 1.0 and worse.cosine < 0.99 and worse.max_error > 0


def test_models_are_timed_interleaved():
    calls: list[str] = []

    class Tag(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    lat = time_models({"a": Tag("a"), "b": Tag("b")}, torch.zeros(4, 2), runs=20, warmup=2)
    assert calls[:4] == ["a", "b"] * 2
    rounds = ["".join(calls[i : i + 4]) for i in range(4, len(calls), 4)]
    # Each round visits both models (an untimed call, then the timed one), in a shuffled order.
    assert len(rounds) == 20 and set(rounds) == {"aabb", "bbaa"}
    assert lat["a"].runs == 20 and lat["a"].batch_size == 4
    assert lat["a"].p90_ms >= lat["a"].p50_ms > 0


def test_thread_count_is_fixed_and_restored():
    before = torch.get_num_threads()
    with threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_batch_of_repeats_rows():
    x = torch.arange(3.0).reshape(3, 1)
    assert batch_of(x, 7).flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_compare_reports_ratios_against_the_first(digits):
    torch.manual_seed(0)
    big = build_model("mlp", in_features=64, hidden=[512, 512], num_classes=10)
    small = build_model("mlp", in_features=64, hidden=[16], num_classes=10)
    x = torch.randn(64, 1, 8, 8)
    rep = compare({"big": big, "small": small}, x, digits, runs=5, warmup=1)
    b, s = rep.rows
    assert b.agreement is None and s.agreement is not None and s.agreement.samples == len(digits.test)
    assert 0 <= s.accuracy <= 1 and b.accuracy is not None
    assert rep.size_ratio(s) == pytest.approx(s.bytes / b.bytes)
    assert rep.speedup(s, 64) == pytest.approx(b.latency[64].p50_ms / s.latency[64].p50_ms)
    assert set(b.latency) == {1, 64}
    raw = json.loads(report.to_json(rep))
    assert raw["models"][1]["size_ratio"] == pytest.approx(rep.size_ratio(s))
    md = report.markdown(rep)
    assert md.count("\n") == 4 and "| big |" in md and "baseline" in md


def test_measure_one_model_against_reference():
    model = nn.Linear(8, 3)
    m = measure(model, torch.randn(16, 8), reference=model, runs=3, warmup=1)
    assert m.params == 27 and m.agreement.top1 == 1.0 and m.flops == 2 * 8 * 3


def test_slower_model_is_marked_worse():
    class Slow(nn.Module):
        def forward(self, x):
            for _ in range(200):
                x = x + 0
            return x

    rep = compare({"fast": nn.Identity(), "slow": Slow()}, torch.zeros(4, 4), runs=5, warmup=1)
    assert "(worse)" in report.rows(rep)[1]["speed-up b64"]
