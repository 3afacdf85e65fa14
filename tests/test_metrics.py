"""Layer-1 figures: parameters, FLOPs, timing, agreement and accuracy, for every form of example inputs."""

from __future__ import annotations

import time

import pytest
import torch
from multi_input import DictSamples, TwoInputs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from keiryo import metrics
from keiryo.errors import ConfigError, DataError


def test_parameters_and_flops_of_a_known_model_are_exact():
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))
    total, nonzero = metrics.count_parameters(model)
    assert total == 10 * 5 + 5 + 5 * 2 + 2 == nonzero
    # one sample: 2·m·n multiply-adds per Linear (bias adds are not counted by flop_counter)
    assert metrics.count_flops(model, torch.randn(8, 10)) == 2 * 10 * 5 + 2 * 5 * 2
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1, bias=False)
    assert metrics.count_flops(conv, torch.randn(2, 3, 6, 6)) == 2 * (3 * 3 * 3) * 4 * 6 * 6


def test_flops_of_one_sample_for_tuple_and_dict_inputs():
    model = TwoInputs(width=4, classes=3)
    ids, mask = torch.randint(0, 20, (8, 5)), torch.ones(8, 5)
    flops = 2 * 4 * 3  # the head on one sample (the embedding lookup and the mask multiply are not counted)
    assert metrics.count_flops(model, (ids, mask)) == flops
    assert metrics.count_flops(model, {"input_ids": ids, "attention_mask": mask}) == flops


def test_flops_of_kernels_the_counter_cannot_see_are_unknown_not_zero():
    from torch.ao.quantization import quantize_dynamic
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))
    assert (
        metrics.count_flops(quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8), torch.randn(8, 10))
        is None
    )
    quantize_(model, Int8WeightOnlyConfig())  # torchao: quantized weights as tensor subclasses
    assert metrics.count_flops(model, torch.randn(8, 10)) is None


def test_a_compiled_model_is_counted_through_its_eager_forward():
    def compiled_code(*args, **kwargs):
        raise AssertionError("the compiled code ran under the FLOP counter")

    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))
    flops = 2 * 10 * 5 + 2 * 5 * 2
    wrapped = torch.compile(model)
    wrapped.forward = compiled_code  # what torch.compile(model)'s wrapper would run
    assert metrics.count_flops(wrapped, torch.randn(8, 10)) == flops
    model._compiled_call_impl = compiled_code  # what model.compile() installs in place
    assert metrics.count_flops(model, torch.randn(8, 10)) == flops
    assert model._compiled_call_impl is compiled_code  # still compiled afterwards


def test_nonzero_counts_zeroed_weights():
    model = nn.Linear(10, 10)
    with torch.no_grad():
        model.weight[:, :4] = 0
    total, nonzero = metrics.count_parameters(model)
    assert total == 110
    assert nonzero == 110 - 40


def test_agreement_of_identical_and_perturbed_models():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    x = torch.randn(64, 8)
    same = metrics.agreement(model, model, x)
    assert same.top1 == 1.0 and same.max_error == 0.0 and same.cosine == pytest.approx(1.0)
    assert same.output == "output"
    noisy = nn.Linear(8, 4)
    noisy.load_state_dict(model.state_dict())
    with torch.no_grad():
        noisy.weight.add_(0.5 * torch.randn_like(noisy.weight))
    worse = metrics.agreement(noisy, model, x)
    assert worse.top1 < 1.0 and worse.cosine < 0.99 and worse.max_error > 0


def test_agreement_compares_the_main_output_and_names_it():
    torch.manual_seed(0)
    model = TwoInputs()
    ids, mask = torch.randint(0, 20, (300, 5)), torch.ones(300, 5)  # more than one inner batch of 256
    same = metrics.agreement(model, model, {"input_ids": ids, "attention_mask": mask})
    assert same.output == "logits" and same.samples == 300 and same.top1 == 1.0 and same.max_error == 0.0
    noisy = TwoInputs()
    noisy.load_state_dict(model.state_dict())
    with torch.no_grad():
        noisy.head.weight.add_(torch.randn_like(noisy.head.weight))
    worse = metrics.agreement(noisy, model, (ids, mask))
    assert worse.output == "logits" and worse.cosine < 0.99 and worse.max_error > 0

    class Tuple(nn.Module):
        def forward(self, x):
            return (None, x * 2, x)

    pair = metrics.agreement(Tuple(), Tuple(), torch.randn(4, 3, 2))
    assert pair.output == "output[1]" and pair.top1 is None and pair.cosine == pytest.approx(1.0)


def test_models_are_timed_in_blocks_interleaved(monkeypatch: pytest.MonkeyPatch):
    calls: list[str] = []

    class Tag(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    monkeypatch.setattr(metrics, "SETTLE_S", 0.0)  # settle with the minimum: two untimed calls per visit
    lat = metrics.time_models({"a": Tag("a"), "b": Tag("b")}, torch.zeros(4, 2), runs=20, warmup=2)
    assert calls[:4] == ["a", "b"] * 2
    visits = ["".join(calls[i : i + 6]) for i in range(4, len(calls), 6)]
    # 5 rounds; each visits both models in a shuffled order: 2 settling calls, then a block of 4 timed ones.
    assert len(visits) == 10 and set(visits) == {"a" * 6, "b" * 6}
    rounds = {visits[i][0] + visits[i + 1][0] for i in range(0, 10, 2)}
    assert rounds == {"ab", "ba"}
    assert lat["a"].runs == 20 and lat["a"].batch_size == 4
    assert lat["a"].p90_ms >= lat["a"].p50_ms > 0


def test_each_visit_settles_for_a_while_before_its_block():
    calls: list[float] = []

    class Stamp(nn.Module):
        def forward(self, x):
            calls.append(time.perf_counter())
            return x

    metrics.time_models({"a": Stamp()}, torch.zeros(1), runs=2, warmup=0, blocks=1)
    assert len(calls) > 4 and calls[-2] - calls[0] >= 0.9 * metrics.SETTLE_S  # the first timed call


def test_models_with_several_inputs_are_timed_on_all_of_them():
    seen: list[tuple] = []

    class Pair(nn.Module):
        def forward(self, input_ids, attention_mask):
            seen.append((input_ids.shape, attention_mask.shape))
            return input_ids * attention_mask

    example = metrics.batch_of({"input_ids": torch.ones(3, 5), "attention_mask": torch.ones(3, 5)}, 7)
    lat = metrics.time_models({"pair": Pair()}, example, runs=3, warmup=1)
    assert lat["pair"].batch_size == 7 and set(seen) == {(torch.Size([7, 5]), torch.Size([7, 5]))}
    assert (
        metrics.time_models({"pair": Pair()}, (torch.ones(2, 5), torch.ones(2, 5)), runs=2)["pair"].batch_size
        == 2
    )


def test_thread_count_is_fixed_and_restored():
    before = torch.get_num_threads()
    with metrics.threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_batch_of_repeats_rows():
    x = torch.arange(3.0).reshape(3, 1)
    assert metrics.batch_of(x, 7).flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]
    ids, mask = metrics.batch_of((torch.arange(3).reshape(3, 1), torch.ones(3, 2)), 5)
    assert ids.flatten().tolist() == [0, 1, 2, 0, 1] and mask.shape == (5, 2) and ids.is_contiguous()


def test_timing_refuses_values_that_cannot_be_measured():
    assert metrics.Timing(batch_sizes=[1, 8]).batch_sizes == (1, 8)
    for bad in ({"runs": 0}, {"warmup": -1}, {"batch_sizes": ()}, {"batch_sizes": (0, 4)}, {"threads": 0}):
        with pytest.raises(ConfigError):
            metrics.Timing(**bad)


def test_accuracy_on_pairs_dicts_and_loaders():
    torch.manual_seed(0)
    model = TwoInputs(classes=3)
    ids = torch.randint(0, 20, (40, 5))
    with torch.no_grad():
        predicted = model(ids, torch.ones(40, 5))["logits"].argmax(-1)
    labels = predicted.clone()
    labels[:10] = (labels[:10] + 1) % 3  # a quarter wrong
    dicts = DictSamples(ids, labels)
    assert metrics.accuracy(model, dicts, batch_size=16) == pytest.approx(0.75)
    loader = DataLoader(TensorDataset(ids, torch.ones(40, 5), labels), batch_size=8)  # (ids, mask, labels)
    assert metrics.accuracy(model, loader) == pytest.approx(0.75)
    assert (
        metrics.accuracy(model, TensorDataset(ids, torch.ones(40, 5), labels.float())) is None
    )  # regression
    assert metrics.accuracy(model, TensorDataset(ids, torch.ones(40, 5))) is None  # no labels
    with pytest.raises(DataError, match="data .x. has class labels 7..7 but the model has 3"):
        metrics.accuracy(model, TensorDataset(ids, torch.ones(40, 5), labels * 0 + 7), what="data 'x'")


def test_labelled_batches_keep_the_order_and_split_labels_off():
    ids = torch.arange(10).reshape(5, 2)
    batches = list(metrics.labelled_batches(DictSamples(ids, torch.arange(5)), batch_size=2))
    assert [len(y) for _, y in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([x["input_ids"] for x, _ in batches]), ids)
    assert set(batches[0][0]) == {"input_ids", "attention_mask"}
    plain = list(metrics.labelled_batches(TensorDataset(ids), batch_size=4))
    assert [y for _, y in plain] == [None, None] and torch.equal(plain[1][0], ids[4:])
