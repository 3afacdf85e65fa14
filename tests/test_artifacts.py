from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from keiryo import artifacts, provenance
from keiryo.errors import ArtifactError, TrustError
from keiryo.models import build_model


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("mlp", {"in_features": 64, "hidden": [32, 16]}, (5, 1, 8, 8)),
        ("cnn", {"in_channels": 1, "width": 8}, (5, 1, 8, 8)),
        ("transformer", {"tokens": [8, 8], "dim": 32, "heads": 4}, (5, 1, 8, 8)),
    ],
)
def test_save_load_gives_identical_outputs(tmp_path, name, kwargs, shape):
    torch.manual_seed(0)
    model = build_model(name, **kwargs).eval()
    x = torch.randn(shape)
    path = artifacts.save(model, tmp_path / f"{name}.pt", metadata={"input_shape": list(shape[1:])})
    loaded = artifacts.load(path)
    assert type(loaded) is type(model)
    assert torch.equal(loaded(x), model(x))
    assert provenance.metadata_of(loaded)["input_shape"] == list(shape[1:])


def test_reshaped_layers_round_trip(tmp_path):
    """A model whose hidden width was cut (as structured pruning does) comes back with the new shapes."""
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[32], num_classes=10).eval()
    first, second = [m for m in model.modules() if isinstance(m, nn.Linear)]
    keep = torch.arange(0, 32, 2)
    first.weight = nn.Parameter(first.weight[keep].clone())
    first.bias = nn.Parameter(first.bias[keep].clone())
    first.out_features = 16
    second.weight = nn.Parameter(second.weight[:, keep].clone())
    second.in_features = 16
    x = torch.randn(4, 64)
    loaded = artifacts.load(artifacts.save(model, tmp_path / "pruned.pt"))
    lf, ls = [m for m in loaded.modules() if isinstance(m, nn.Linear)]
    assert lf.weight.shape == (16, 64) and lf.out_features == 16 and ls.in_features == 16
    assert torch.equal(loaded(x), model(x))


def test_load_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": artifacts.MODEL_FORMAT, "x": Evil()}, f)
    with pytest.raises(ArtifactError):
        artifacts.load(path)
    torch.save({"format": artifacts.MODEL_FORMAT, "payload": Evil()}, tmp_path / "evil2.pt")
    with pytest.raises(ArtifactError, match="refusing to unpickle"):
        artifacts.load(tmp_path / "evil2.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a model at all", "corrupt or not a PyTorch file"),
        (None, "not a keiryo model"),
        ("truncated", "corrupt or not a PyTorch file"),
    ],
)
def test_corrupt_or_foreign_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save(nn.Linear(2, 2).state_dict(), path)
    elif content == "truncated":
        good = artifacts.save(build_model("mlp", in_features=4, hidden=[4], num_classes=2), tmp_path / "g.pt")
        path.write_bytes(good.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ArtifactError, match=message) as info:
        artifacts.load(path)
    assert "\n" not in str(info.value) and "bad.pt" in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        artifacts.load(tmp_path / "nope.pt")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old contents")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        artifacts.save(build_model("mlp", in_features=4, hidden=[4], num_classes=2), path)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind


def test_user_factories_need_trust(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import torch\n\ndef tiny(width=3):\n    return torch.nn.Linear(2, width)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("mynets:tiny", trust_code=True, width=5)
    path = artifacts.save(model, tmp_path / "tiny.pt")
    with pytest.raises(TrustError, match="--trust-code"):
        artifacts.load(path)
    loaded = artifacts.load(path, trust_code=True)
    assert loaded.out_features == 5 and torch.equal(loaded.weight, model.weight)


def test_model_without_factory_needs_one(tmp_path):
    with pytest.raises(ArtifactError, match="factory"):
        artifacts.save(nn.Linear(2, 2), tmp_path / "x.pt")
    path = artifacts.save(
        nn.Linear(2, 2),
        tmp_path / "x.pt",
        factory="torch.nn:Linear",
        kwargs={"in_features": 2, "out_features": 2},
    )
    assert isinstance(artifacts.load(path, trust_code=True), nn.Linear)


def test_recorded_folds_and_pt2e_records_that_do_not_fit_are_one_line_errors(tmp_path):
    from keiryo.compress.fold import fold_batchnorm

    model = build_model("cnn", in_channels=1, num_classes=10, width=8, blocks=1).eval()
    path = artifacts.save(fold_batchnorm(model, torch.randn(2, 1, 8, 8)), tmp_path / "folded.pt")
    payload = torch.load(path, weights_only=True)
    payload["transforms"][0]["options"]["pairs"] = [["stem.9", "stem.1"]]  # a layer the factory lacks
    torch.save(payload, tmp_path / "bad-fold.pt")
    with pytest.raises(ArtifactError, match="bad-fold.pt"):
        artifacts.load(tmp_path / "bad-fold.pt")
    payload["transforms"] = [
        {
            "kind": "quantize",
            "options": {"method": "int8-static", "config": {}, "backend": "x86-inductor", "layers": []},
        }
    ]
    torch.save(payload, tmp_path / "bad-pt2e.pt")  # no recorded example shapes or ranges
    with pytest.raises(ArtifactError, match="bad-pt2e.pt"):
        artifacts.load(tmp_path / "bad-pt2e.pt")
