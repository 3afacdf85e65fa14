"""Models measured side by side (`keiryo.measuring`): file sizes, ratios against the first, multi-input models
(a raw Hugging Face BertModel with ids and a mask), and the report rendered from it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from multi_input import DictSamples, TwoInputs, tiny_bert
from torch import nn

from keiryo import report
from keiryo.data import load_data
from keiryo.errors import ModelError
from keiryo.measuring import compare, file_bytes, measure
from keiryo.metrics import Timing
from keiryo.models import build_model

QUICK = Timing(runs=5, warmup=1)


def test_file_bytes_tracks_weight_bytes():
    small = build_model("mlp", in_features=64, hidden=[16], num_classes=10)
    big = build_model("mlp", in_features=64, hidden=[512], num_classes=10)
    weights = sum(p.numel() * 4 for p in big.parameters())
    assert weights < file_bytes(big) < weights * 1.1 + 20_000
    assert file_bytes(small) < file_bytes(big)


def test_compare_reports_ratios_against_the_first(digits):
    torch.manual_seed(0)
    big = build_model("mlp", in_features=64, hidden=[512, 512], num_classes=10)
    small = build_model("mlp", in_features=64, hidden=[16], num_classes=10)
    x = torch.randn(64, 1, 8, 8)
    rep = compare({"big": big, "small": small}, x, digits, QUICK)
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
    m = measure(model, torch.randn(16, 8), reference=model, timing=QUICK)
    assert m.params == 27 and m.agreement.top1 == 1.0 and m.flops == 2 * 8 * 3


def test_slower_model_is_marked_worse():
    class Slow(nn.Module):
        def forward(self, x):
            for _ in range(200):
                x = x + 0
            return x

    rep = compare({"fast": nn.Identity(), "slow": Slow()}, torch.zeros(4, 4), timing=QUICK)
    assert "(worse)" in report.rows(rep)[1]["speed-up b64"]


def test_timing_settings_are_the_ones_used():
    model = nn.Linear(4, 2)
    before = torch.get_num_threads()
    rep = compare(
        {"m": model}, torch.randn(3, 4), timing=Timing(runs=3, warmup=0, batch_sizes=(2, 5), threads=1)
    )
    assert rep.threads == 1 and torch.get_num_threads() == before
    assert {b: (lat.batch_size, lat.runs) for b, lat in rep.rows[0].latency.items()} == {2: (2, 3), 5: (5, 3)}


def test_multi_input_models_on_dict_samples_with_labels():
    torch.manual_seed(0)
    model = TwoInputs(width=8).train()
    noisy = copy.deepcopy(model).eval()
    with torch.no_grad():
        noisy.head.weight.add_(torch.randn_like(noisy.head.weight))
    ids = torch.randint(0, 20, (50, 6))
    with torch.no_grad():
        labels = model(ids, torch.ones(50, 6))["logits"].argmax(-1)
    example = {"input_ids": ids[:4], "attention_mask": torch.ones(4, 6)}
    rep = compare({"model": model, "noisy": noisy}, example, DictSamples(ids, labels), QUICK)
    base, other = rep.rows
    assert base.accuracy == 1.0 and other.accuracy < 1.0
    assert other.agreement.samples == 50 and other.agreement.output == "logits"
    assert base.flops == 2 * 8 * 3 and base.params == 20 * 8 + 8 * 3 + 3
    assert model.training and not noisy.training  # each model's mode is restored
    assert "(logits)" in report.rows(rep)[1]["agreement"]


def test_raw_bert_with_ids_and_mask_against_its_int8_copy():
    """Issue 14: a raw transformers BertModel (no keiryo wrapper) measured with (ids, mask) and a dict."""
    from torch.ao.quantization import quantize_dynamic

    bert = tiny_bert(vocab=100, hidden=64, layers=2, heads=2, positions=16)
    int8 = quantize_dynamic(copy.deepcopy(bert), {nn.Linear}, dtype=torch.qint8)
    ids = torch.randint(0, 100, (8, 12))
    mask = torch.ones(8, 12, dtype=torch.long)
    mask[:, -3:] = 0
    params = sum(p.numel() for p in bert.parameters())
    for example in ((ids, mask), {"input_ids": ids, "attention_mask": mask}):
        rep = compare(
            {"float": bert, "int8": int8},
            example,
            timing=Timing(runs=3, warmup=1, batch_sizes=(1, 8), threads=1),
        )
        base, q = rep.rows
        assert base.params == params and q.params == params  # packed int8 weights count by their elements
        assert q.bytes < 0.6 * base.bytes and rep.size_ratio(q) == pytest.approx(q.bytes / base.bytes)
        assert set(q.latency) == {1, 8} and q.latency[8].batch_size == 8 and q.latency[8].p50_ms > 0
        assert base.flops > 0 and q.flops is None  # int8 kernels are invisible to the FLOP counter
        assert q.agreement.output == "last_hidden_state" and q.agreement.samples == 8
        assert 0.98 < q.agreement.cosine < 1.0 and q.agreement.top1 is None
        assert "(last_hidden_state)" in report.rows(rep)[1]["agreement"]
    alone = measure(bert, (ids, mask), timing=Timing(runs=2, warmup=0, batch_sizes=(2,), threads=1))
    assert alone.params == params and alone.agreement is None and alone.latency[2].batch_size == 2


def test_multi_input_example_that_does_not_fit_is_one_line():
    bad = {
        "input_ids": torch.full((2, 5), 50),
        "attention_mask": torch.ones(2, 5),
    }  # ids beyond the vocabulary
    with pytest.raises(ModelError, match="the samples of the example inputs are input_ids \\(1, 5\\) int64"):
        compare({"m": TwoInputs()}, bad, timing=QUICK)


def test_splits_of_a_multi_input_example_are_measured_on_their_test_part():
    torch.manual_seed(0)
    model = TwoInputs()
    ids, mask = torch.randint(0, 20, (200, 6)), torch.ones(200, 6)
    with torch.no_grad():
        labels = model(ids, mask)["logits"].argmax(-1)
    splits = load_data(({"input_ids": ids, "attention_mask": mask}, labels))
    rep = compare({"model": model, "copy": copy.deepcopy(model)}, (ids[:8], mask[:8]), splits, QUICK)
    assert [r.accuracy for r in rep.rows] == [1.0, 1.0]
    assert rep.rows[1].agreement.samples == len(splits.test) > 0 and rep.rows[1].agreement.max_error == 0.0


def test_a_runtime_program_is_a_row_with_its_artifact_size_and_unknown_params(tmp_path):
    from keiryo.runtimes import build

    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[32], num_classes=10).eval()
    x = torch.randn(16, 1, 8, 8)
    runner = build(model, x, "onnxruntime")
    report_ = compare({"torch": model, "onnxruntime": runner}, x, timing=QUICK)
    row = report_.rows[1]
    assert row.params is None and row.flops is None and row.bytes == runner.file_bytes() > 0
    assert row.agreement.cosine > 0.9999 and set(row.latency) == {1, 64}
    assert report.rows(report_)[1]["params"] == "-"


def test_machine_names_the_cpu_and_its_kernel_flags():
    from keiryo.measuring import machine

    text = machine()
    assert text and "(" in text and text.endswith(")")
