"""Distillation: the loss is the formula, the teacher never changes, features and caching do their job."""

from __future__ import annotations

import copy
import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from keiryo import artifacts, provenance
from keiryo.checkpoints import load_checkpoint
from keiryo.compress import distill as distill_module
from keiryo.compress.distill import Distill, distill, output_cosine, soft_target_kl, soft_target_loss
from keiryo.compress.distill_features import make_projection
from keiryo.data import load_data, tensors_of
from keiryo.errors import ConfigError
from keiryo.loop import TrainConfig, fit
from keiryo.models import build_model, kwargs_for_data
from keiryo.training import train


def quiet(**options) -> TrainConfig:
    """Training settings for tests: on the CPU, no progress bar."""
    return TrainConfig(progress=False, device="cpu", **options)


def _model(name: str, splits, seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **{**kwargs_for_data(name, splits.input_shape, splits.num_classes), **extra})


@pytest.fixture(scope="module")
def small(digits):
    """A quarter of the digits training split: enough to learn from, quick to run."""
    return replace(digits, train=Subset(digits.train, range(len(digits.train) // 4)))


@pytest.fixture(scope="module")
def teacher(digits):
    """An mlp teacher: quick to train to ~95% on digits."""
    net = _model("mlp", digits, hidden=[128, 64])
    fit(net, digits, quiet(epochs=6))
    return net


def _fixed(logits: list[float]) -> nn.Module:
    """A 'teacher' that outputs the same logits for every input (zero weights, the logits as bias)."""
    layer = nn.Linear(len(logits), len(logits))
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor(logits))
    return layer


def _softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


# --- the loss ------------------------------------------------------------------------------------------


def test_loss_equals_the_formula_on_a_hand_computed_example():
    teacher_logits, student_logits, label, t, alpha = [1.0, 2.0, 0.0], [0.0, 1.0, 3.0], 2, 2.0, 0.7
    p, q = _softmax(teacher_logits, t), _softmax(student_logits, t)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    ce = -math.log(_softmax(student_logits, 1.0)[label])
    expected = alpha * t * t * kl + (1 - alpha) * ce

    loss_fn = soft_target_loss(_fixed(teacher_logits), Distill(temperature=t, alpha=alpha))
    loss, outputs = loss_fn(nn.Identity(), torch.tensor([student_logits]), torch.tensor([label]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert outputs.tolist() == [student_logits]


class _Column(nn.Module):
    """Logits read from the inputs: (B, 2, K) holds the student's at [:, 0], the teacher's at [:, 1]."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.index]


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 8.0, 20.0])
def test_soft_term_gradient_is_alpha_t_times_the_probability_gap(t):
    """d/dz of alpha·T²·KL is alpha·T·(softmax(z/T) − softmax(v/T)) per sample (Hinton et al., eq. 1)."""
    torch.manual_seed(1)
    z, v = torch.randn(4, 10), torch.randn(4, 10)
    both = torch.stack([z, v], dim=1).requires_grad_()
    loss_fn = soft_target_loss(_Column(1), Distill(temperature=t, alpha=0.6))
    loss, _ = loss_fn(_Column(0), both, torch.zeros(4, dtype=torch.long))
    loss_fn_hard = soft_target_loss(_Column(1), Distill(temperature=t, alpha=0.0))
    hard, _ = loss_fn_hard(_Column(0), both, torch.zeros(4, dtype=torch.long))
    (grad,) = torch.autograd.grad(loss - 0.4 * hard, both)
    expected = 0.6 * t * (torch.softmax(z / t, dim=-1) - torch.softmax(v / t, dim=-1)) / 4
    torch.testing.assert_close(grad[:, 0], expected)
    assert torch.all(grad[:, 1] == 0)  # nothing flows into the teacher


def test_soft_term_gradient_at_high_temperature_matches_logits_regression():
    """With zero-mean logits, T·(q − p) → (z − v)/K as T grows: the T² factor keeps gradients O(1)."""
    torch.manual_seed(2)
    z = torch.randn(3, 10)
    v = torch.randn(3, 10)
    z, v = (z - z.mean(-1, keepdim=True)).requires_grad_(), v - v.mean(-1, keepdim=True)
    grads = {}
    for t in (8.0, 1000.0):
        loss = soft_target_kl(z, torch.softmax(v / t, dim=-1), t)
        (grads[t],) = torch.autograd.grad(loss, z)
    limit = (z.detach() - v) / 10 / 3
    torch.testing.assert_close(grads[1000.0], limit, rtol=2e-2, atol=1e-4)
    assert 0.5 < grads[8.0].norm() / grads[1000.0].norm() < 2.0


def test_ensemble_averages_the_teachers_probabilities():
    a, b, t = [2.0, 0.0, -1.0], [-1.0, 1.0, 0.5], 3.0
    mean = [(x + y) / 2 for x, y in zip(_softmax(a, t), _softmax(b, t), strict=True)]
    student = [-2.0, 1.5, 1.0]
    q = _softmax(student, t)
    expected = t * t * sum(m * math.log(m / qi) for m, qi in zip(mean, q, strict=True))
    loss, _ = soft_target_loss([_fixed(a), _fixed(b)], Distill(temperature=t, alpha=1.0))(
        nn.Identity(), torch.tensor([student]), torch.tensor([0])
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_cosine_and_mse_output_losses():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    assert output_cosine(x, 2 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert output_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])).item() == pytest.approx(1.0)
    loss, _ = soft_target_loss(_fixed([1.0, 1.0]), Distill(alpha=1.0, loss="mse"))(
        nn.Identity(), torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, 0.0]])
    )
    assert loss.item() == pytest.approx((1 + 4) / 2)


# --- distill ------------------------------------------------------------------------------------------


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_teacher_is_bit_identical_after_distillation(small, digits):
    teacher = _model(
        "cnn", digits, width=8, blocks=1
    )  # batch-norm buffers change if it ever runs in train mode
    teacher.train()  # distill must still run it in eval mode, and give back its mode
    before = _snapshot(teacher)
    student = _model("mlp", digits, hidden=[16])
    returned = distill(teacher, student, small, Distill(features={"fc0": "pool"}), quiet(epochs=1))
    assert returned is student and not student.training
    assert teacher.training
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert all(p.grad is None for p in teacher.parameters())


def test_distilled_student_learns_the_task(teacher, small, digits):
    student = _model("mlp", digits, hidden=[32])
    untrained = copy.deepcopy(student)
    distill(teacher, student, small, Distill(cache_teacher=True), quiet(epochs=15, lr=1e-2))
    x, y = tensors_of(digits.test)
    with torch.no_grad():
        learned = (student(x).argmax(-1) == y).float().mean()
        agree = (student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean()
        assert learned > (untrained(x).argmax(-1) == y).float().mean() + 0.5
    assert agree > 0.7


def test_ensemble_of_teachers_stays_fixed(teacher, small, digits):
    second = _model("mlp", digits, seed=3, hidden=[32])
    fit(second, small, quiet(epochs=2))
    snapshots = [_snapshot(teacher), _snapshot(second)]
    distill([teacher, second], _model("mlp", digits, hidden=[16]), small, train=quiet(epochs=1))
    for net, before in zip([teacher, second], snapshots, strict=True):
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_caching_the_teacher_gives_the_same_student(teacher, small, digits):
    students = []
    for cache in (False, True):
        student = _model("mlp", digits, seed=5, hidden=[32])
        config = Distill(cache_teacher=cache, features={"fc0": "act1"})
        distill(teacher, student, small, config, quiet(epochs=2))
        students.append(student.state_dict())
    for key, value in students[0].items():
        torch.testing.assert_close(students[1][key], value, rtol=1e-4, atol=1e-5)


def _features(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    kept = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, out: kept.append(out))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return kept[0]


def test_feature_projection_is_trained_and_brings_features_closer(teacher, small, digits, monkeypatch):
    made = []

    def recording(student_shape, teacher_shape):
        projection = make_projection(student_shape, teacher_shape)
        made.append((projection, copy.deepcopy(projection)))
        return projection

    monkeypatch.setattr(distill_module, "make_projection", recording)
    student = _model("mlp", digits, hidden=[32])
    initial_student = copy.deepcopy(student)
    x, _ = tensors_of(small.train)
    target = _features(teacher, "act1", x)
    config = Distill(alpha=0.0, features={"act0": "act1"}, feature_weight=10.0)
    distill(teacher, student, small, config, quiet(epochs=4, lr=1e-2))
    ((trained, initial),) = made
    assert isinstance(trained, nn.Linear) and trained.out_features == 64  # student width 32 → teacher's 64
    assert not torch.equal(trained.weight, initial.weight)
    with torch.no_grad():
        before = nn.functional.mse_loss(initial(_features(initial_student, "act0", x)), target)
        after = nn.functional.mse_loss(trained(_features(student, "act0", x)), target)
    assert after < 0.5 * before


def test_projection_shapes():
    assert isinstance(make_projection((2, 8, 4, 4), (2, 8, 4, 4)), nn.Identity)
    conv = make_projection((2, 8, 4, 4), (2, 16, 4, 4))
    assert isinstance(conv, nn.Conv2d) and conv(torch.zeros(2, 8, 4, 4)).shape == (2, 16, 4, 4)
    tokens = make_projection((2, 5, 8), (2, 5, 12))
    assert isinstance(tokens, nn.Linear) and tokens(torch.zeros(2, 5, 8)).shape == (2, 5, 12)
    assert make_projection((2, 32), (2, 16, 1, 1))(torch.zeros(2, 32)).shape == (2, 16, 1, 1)


def test_regression_outputs_distil_with_mse():
    torch.manual_seed(0)
    x = torch.randn(400, 6)
    y = (x @ torch.randn(6, 1)).squeeze(1) + 0.1 * torch.randn(400)
    splits = load_data((x, y), seed=0)
    teacher = build_model("mlp", in_features=6, hidden=[32], num_classes=1)
    fit(teacher, splits, quiet(epochs=20))
    with pytest.raises(ConfigError, match="needs class outputs"):
        distill(teacher, build_model("mlp", in_features=6, hidden=[4], num_classes=1), splits, train=quiet())
    test_x, _ = tensors_of(splits.test)
    student = build_model("mlp", in_features=6, hidden=[8], num_classes=1)
    before = (student(test_x) - teacher(test_x)).pow(2).mean().item()
    distill(teacher, student, splits, Distill(loss="mse", alpha=1.0), quiet(epochs=30, lr=1e-2))
    after = (student(test_x) - teacher(test_x)).pow(2).mean().item()
    assert after < 0.25 * before


def test_embeddings_distil_with_cosine():
    """A fixed random network's 4-d embeddings; the labels are unused (alpha=1), only directions matter."""
    torch.manual_seed(0)
    splits = load_data((torch.randn(400, 6), torch.zeros(400)), seed=0)
    teacher = build_model("mlp", in_features=6, hidden=[16], num_classes=4)
    student = build_model("mlp", in_features=6, hidden=[16], num_classes=4)
    test_x, _ = tensors_of(splits.test)

    def similarity() -> float:
        with torch.no_grad():
            return nn.functional.cosine_similarity(student(test_x), teacher(test_x)).mean().item()

    before = similarity()
    distill(teacher, student, splits, Distill(loss="cosine", alpha=1.0), quiet(epochs=20, lr=1e-2))
    assert similarity() > max(0.9, before + 0.3)


def test_runs_on_the_training_loop_with_checkpoint_and_resume(teacher, small, digits, tmp_path):
    ckpt = tmp_path / "distill.ckpt"
    student = _model("mlp", digits, hidden=[16])
    distill(teacher, student, small, train=quiet(epochs=2, checkpoint=str(ckpt)))
    saved = load_checkpoint(ckpt)
    assert saved["epoch"] == 2 and all(k.startswith("student.") for k in saved["model"])
    again = _model("mlp", digits, seed=9, hidden=[16])
    distill(teacher, again, small, train=quiet(epochs=2, checkpoint=str(ckpt), resume=True))
    for key, value in student.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
        (dict(temperature=-2), "temperature must be > 0"),
        (dict(alpha=1.5), r"alpha must be in \[0, 1\], got 1.5"),
        (dict(alpha=-0.1), r"alpha must be in \[0, 1\]"),
        (dict(loss="l1"), "unknown distillation loss 'l1'"),
        (dict(features={"nope": "act0"}), "the student has no layer 'nope'"),
        (dict(features={"fc0": "nope"}), "the teacher has no layer 'nope'"),
    ],
)
def test_bad_options_are_one_line_config_errors(teacher, small, digits, options, message):
    with pytest.raises(ConfigError, match=message) as info:
        distill(teacher, _model("mlp", digits, hidden=[8]), small, Distill(**options), quiet(epochs=1))
    assert "\n" not in str(info.value)


def test_mismatched_output_shapes_are_refused(teacher, small, digits):
    five = build_model("mlp", in_features=64, hidden=[8], num_classes=5)
    with pytest.raises(ConfigError, match=r"teacher outputs have shape \(8, 10\) but the student's \(8, 5\)"):
        distill(teacher, five, small, train=quiet(epochs=1))


def test_cli_distill_writes_a_student_and_refuses_bad_values(teacher, tmp_path, capsys):
    from keiryo.cli import main  # here: the CLI is not what the other tests exercise

    teacher_file = artifacts.save(copy.deepcopy(teacher), tmp_path / "teacher.pt")
    out = tmp_path / "student.pt"
    args = ["distill", "--teacher", str(teacher_file), "--student", "mlp", "--data", "digits"]
    quick = ["--epochs", "1", "--no-progress", "--runs", "3", "-a", "hidden=[16]"]
    assert main([*args, "--out", str(out), *quick]) == 0
    student = artifacts.load(out)
    assert student.fc0.out_features == 16
    assert provenance.metadata_of(student)["distilled_from"] == str(teacher_file)
    assert "teacher" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "x.pt"), "--temperature", "0", *quick]) == 2
    assert "temperature must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


# --- inputs as PyTorch passes them --------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dict samples", "tuple inputs"])
def test_multi_input_models_distil_from_dict_or_tuple_samples(form):
    """ids and a mask in, a dict of outputs out: the student learns the teacher's `logits` either way."""
    from multi_input import TwoInputs

    torch.manual_seed(0)
    teacher, student = TwoInputs(width=8).eval(), TwoInputs(width=8)
    ids = torch.randint(0, 20, (240, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        labels = teacher(ids, mask)["logits"].argmax(-1)
    samples = [
        {"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels, strict=True)
    ]
    data = samples if form == "dict samples" else ((ids, mask), labels)
    before = _snapshot(teacher)

    def agreement() -> float:
        with torch.no_grad():
            return (student(ids, mask)["logits"].argmax(-1) == labels).float().mean().item()

    start = agreement()
    distill(
        teacher, student, data, Distill(temperature=1.0, alpha=1.0), quiet(epochs=30, lr=3e-2, patience=None)
    )
    assert agreement() > max(0.8, start + 0.2)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_data_is_split_as_the_loop_splits_it_and_the_split_is_said(capsys):
    """Tensors handed to distill are all training data to the user: a validation share, no hidden test
    share, and one line saying so (as keiryo.loop.fit says it)."""
    torch.manual_seed(0)
    x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    teacher = build_model("mlp", in_features=6, hidden=[16], num_classes=3)
    student = build_model("mlp", in_features=6, hidden=[8], num_classes=3)
    distill(teacher, student, (x, y), train=TrainConfig(epochs=1, device="cpu", progress=True))
    out = capsys.readouterr().out
    assert "data: 200 samples → 170 train / 30 validation" in out
    assert out.count("data: 200 samples") == 1


def test_with_alpha_zero_distill_trains_exactly_as_train_on_labels():
    """The split, step budget, early stopping and kept epoch are the loop's own: with no teacher term
    (alpha 0) distill gives the very weights keiryo.train gives, so any gap between a distilled student
    and label training is the teacher's signal, not the pipeline (benchmarks/small_data.py)."""
    torch.manual_seed(0)
    x, y = torch.randn(120, 6), torch.randint(0, 2, (120,))
    teacher = build_model("mlp", in_features=6, hidden=[16], num_classes=2)
    torch.manual_seed(1)
    labels = build_model("mlp", in_features=6, hidden=[8], num_classes=2)
    student = copy.deepcopy(labels)
    config = quiet(min_steps=60, patience=3, seed=3)
    train(labels, (x, y), config=config)
    distill(teacher, student, (x, y), Distill(alpha=0.0), config)
    assert all(torch.equal(v, labels.state_dict()[k]) for k, v in student.state_dict().items())


def test_a_student_distilled_with_defaults_reaches_plain_label_training_on_breast_cancer():
    """Issue 14.6: distill's defaults on 398 samples reach the same student trained by the 10-line AdamW loop
    on labels (benchmarks/small_data.py, the same code; seeds 0-2 of its 5)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "small_data.py"
    spec = importlib.util.spec_from_file_location("small_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only contends
    try:
        accs = bench.run_distillation((0, 1, 2))
    finally:
        torch.set_num_threads(threads)
    mean = {way: sum(a) / len(a) for way, a in accs.items()}
    assert mean["student, keiryo.distill defaults"] >= mean["student, plain loop on labels"] - 1e-9, mean
