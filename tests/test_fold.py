"""BatchNorm folding: any model (traceable or not), outputs unchanged, only safe pairs folded, saved files
rebuild the folds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from keiryo import artifacts
from keiryo.compress.fold import batchnorm_pairs, fold_batchnorm
from keiryo.models import build_model


def _shuffled_statistics(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine weights (fresh ones fold to ~identity)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_keiryo_cnn_folds_every_batchnorm_and_outputs_stay_equal(tmp_path):
    model = _shuffled_statistics(build_model("cnn", in_channels=1, num_classes=10, width=16, blocks=2))
    x = torch.randn(8, 1, 8, 8)
    folded = fold_batchnorm(model, x)
    assert _batchnorms(model) == 5 and _batchnorms(folded) == 0
    with torch.no_grad():
        assert _relative_error(folded(x), model(x)) <= 1e-5
        loaded = artifacts.load(artifacts.save(folded, tmp_path / "folded.pt"))  # folds replayed at load
        assert _batchnorms(loaded) == 0 and torch.equal(loaded(x), folded(x))


def test_a_transformers_resnet_that_fx_cannot_trace_is_folded():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5, layer_type="basic"
    )
    model = _shuffled_statistics(transformers.ResNetForImageClassification(config))
    with pytest.raises(Exception):  # noqa: B017 - why folding cannot rely on torch.fx
        torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    folded = fold_batchnorm(model, x)
    assert _batchnorms(model) > 4 and _batchnorms(folded) == 0
    with torch.no_grad():
        assert _relative_error(folded(x).logits, model(x).logits) <= 1e-5


class _LinearBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


def test_batchnorm_after_a_linear_layer_is_folded():
    model = _shuffled_statistics(_LinearBatchNorm())
    x = torch.randn(8, 12)
    folded = fold_batchnorm(model, x)
    assert isinstance(folded.bn, nn.Identity) and folded.fc.bias is not None
    with torch.no_grad():
        assert _relative_error(folded(x), model(x)) <= 1e-5


class _Unsafe(nn.Module):
    """Pairs that must not fold: the conv output also feeds a residual, is changed in place before the
    BatchNorm, or the BatchNorm normalizes something else than the conv's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_shared = nn.BatchNorm2d(4)
        self.inplace = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_inplace = nn.BatchNorm2d(4)
        self.safe = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_safe = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared(x)
        x = self.bn_shared(y) + y  # the conv's output is read twice: folding would change the residual
        y = self.inplace(x)
        y.relu_()  # changed in place between the conv and its BatchNorm
        x = self.bn_inplace(y)
        return self.bn_safe(self.safe(x))


def test_only_pairs_nothing_else_reads_are_folded():
    model = _shuffled_statistics(_Unsafe())
    x = torch.randn(2, 4, 6, 6)
    assert batchnorm_pairs(model, x) == [["safe", "bn_safe"]]
    folded = fold_batchnorm(model, x)
    with torch.no_grad():
        assert _relative_error(folded(x), model(x)) <= 1e-5


def test_a_model_without_batchnorm_comes_back_unchanged_and_the_original_is_untouched():
    model = build_model("mlp", in_features=64, hidden=[16], num_classes=10).eval()
    x = torch.randn(4, 64)
    assert batchnorm_pairs(model, x) == []
    cnn = _shuffled_statistics(build_model("cnn", in_channels=1, num_classes=10, width=8, blocks=1))
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    fold_batchnorm(cnn.train(), torch.randn(4, 1, 8, 8))
    assert cnn.training and _batchnorms(cnn) == 3
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())


def test_each_module_keeps_its_own_train_or_eval_mode():
    inner = _shuffled_statistics(build_model("cnn", in_channels=1, num_classes=10, width=8, blocks=1))
    wrapper = nn.Sequential(inner)  # a wrapper in train mode (the default) around an eval model
    batchnorm_pairs(wrapper, torch.randn(2, 1, 8, 8))
    assert wrapper.training and not any(m.training for m in inner.modules())
