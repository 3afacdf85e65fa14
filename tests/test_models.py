"""Tests for keiryo.models: the built-in models' shapes and structure, factories by string, specs, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keiryo import models
from keiryo.errors import ModelError, ResourceError, TrustError
from keiryo.models import BUILTIN, SPEC_ATTR, Attention, build_model, kwargs_for_data, spec_of

DIGITS = torch.rand(5, 1, 8, 8)

FACTORY_FILE = """
from torch import nn

def tiny(width=4):
    return nn.Linear(3, width)

def not_a_model():
    return 42

NOT_CALLABLE = 3
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(FACTORY_FILE)
    return path


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtins_map_digits_to_ten_logits(name):
    model = build_model(name).eval()
    assert model(DIGITS).shape == (5, 10)
    if name != "cnn":  # flat rows work too; the cnn needs images
        assert model(DIGITS.reshape(5, 64)).shape == (5, 10)


def test_builtin_table_and_resolve():
    assert BUILTIN == {"mlp": models.mlp, "cnn": models.cnn, "transformer": models.transformer}
    assert models.resolve_factory("cnn") is models.cnn
    assert models.resolve_factory("torch.nn:Identity", trust_code=True) is nn.Identity
    with pytest.raises(TrustError, match="--trust-code"):
        models.resolve_factory("torch.nn:Identity")


def test_mlp_parameter_count_is_exact():
    default = models.mlp()
    expected = (64 * 256 + 256) + (256 * 128 + 128) + (128 * 10 + 10)
    assert sum(p.numel() for p in default.parameters()) == expected == 50826
    small = models.mlp(in_features=10, hidden=[7, 5], num_classes=3, dropout=0.5)
    assert sum(p.numel() for p in small.parameters()) == (10 * 7 + 7) + (7 * 5 + 5) + (5 * 3 + 3)
    linears = [m for m in small.modules() if isinstance(m, nn.Linear)]
    assert linears[-1] is small.classifier and small.classifier.out_features == 3
    assert isinstance(small[0], nn.Flatten)
    assert sum(isinstance(m, nn.Dropout) for m in small.modules()) == 2
    assert not any(isinstance(m, nn.Dropout) for m in default.modules())


def test_cnn_has_batchnorm_and_identity_skips():
    model = models.cnn(width=8, blocks=3).eval()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1 + 2 * 3
    assert sum(p.numel() for p in model.fc.parameters()) == 8 * 10 + 10
    block = model.blocks[0]
    with torch.no_grad():  # silence the residual branch: what is left must be relu(x + 0)
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(block(x), F.relu(x))
    assert not torch.allclose(model.blocks[1](x), F.relu(x))  # an intact block does change its input


def _keep_heads(attn: Attention, keep: list[int]) -> None:
    """Shrink `attn` to the heads in `keep`, as structural head pruning does."""
    dim, head_dim = attn.proj.out_features, attn.qkv.out_features // 3 // attn.num_heads
    per_head = [torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep]
    cols = torch.cat(per_head)
    rows = torch.cat([cols + part * dim for part in range(3)])  # qkv rows are laid out (3, heads, head_dim)
    qkv, proj = nn.Linear(dim, len(rows)), nn.Linear(len(cols), dim)
    with torch.no_grad():
        qkv.weight.copy_(attn.qkv.weight[rows])
        qkv.bias.copy_(attn.qkv.bias[rows])
        proj.weight.copy_(attn.proj.weight[:, cols])
        proj.bias.copy_(attn.proj.bias)
    attn.qkv, attn.proj, attn.num_heads = qkv, proj, len(keep)


def test_transformer_still_works_after_heads_are_pruned():
    model = models.transformer(heads=4, dim=64).eval()
    attn = model.blocks[0].attn
    x = torch.randn(3, 8, 64)
    with torch.no_grad():  # reference: the full module with heads 1 and 3 silenced at the output projection
        silenced = Attention(64, 4)
        silenced.load_state_dict(attn.state_dict())
        silenced.proj.weight[:, 16:32] = 0
        silenced.proj.weight[:, 48:64] = 0
        expected = silenced(x)
    for block in model.blocks:
        _keep_heads(block.attn, [0, 2])
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 32
    torch.testing.assert_close(attn(x), expected)
    assert model(DIGITS).shape == (5, 10)


def test_build_from_file_records_absolute_path(factory_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrustError, match="trust_code=True"):
        build_model("my_models.py:tiny", width=5)
    model = build_model("my_models.py:tiny", trust_code=True, width=5)
    assert isinstance(model, nn.Linear) and model.out_features == 5
    spec = spec_of(model)
    assert spec == {"factory": f"{factory_file.resolve()}:tiny", "kwargs": {"width": 5}}
    again = build_model(spec["factory"], trust_code=True, **spec["kwargs"])  # rebuilds from anywhere
    assert type(again) is type(model) and again.weight.shape == model.weight.shape


def test_build_from_module_path(tmp_path, monkeypatch):
    (tmp_path / "keiryo_test_factories.py").write_text(FACTORY_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("keiryo_test_factories:tiny", trust_code=True, width=2)
    assert model.out_features == 2
    assert spec_of(model) == {"factory": "keiryo_test_factories:tiny", "kwargs": {"width": 2}}
    assert isinstance(build_model("torch.nn:Identity", trust_code=True), nn.Identity)


def test_spec_is_attached_and_json_serialisable():
    model = build_model("mlp", hidden=(32, 16), dropout=0.1)
    spec = spec_of(model)
    assert spec == {"factory": "mlp", "kwargs": {"hidden": [32, 16], "dropout": 0.1}}
    assert json.loads(json.dumps(getattr(model, SPEC_ATTR))) == spec
    rebuilt = build_model(spec["factory"], **spec["kwargs"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    spec["kwargs"]["hidden"] = [1]  # a copy: the model's record is unchanged
    assert spec_of(model)["kwargs"]["hidden"] == [32, 16]
    assert spec_of(nn.Linear(2, 2)) is None


def test_numpy_scalars_become_plain_json():
    np = pytest.importorskip("numpy")
    model = build_model("mlp", in_features=np.int64(16), hidden=[np.int32(8)])
    assert json.dumps(spec_of(model)) == '{"factory": "mlp", "kwargs": {"in_features": 16, "hidden": [8]}}'


BAD_FILE_IMPORT = "raise RuntimeError('boom\\nsecond line')\n"


@pytest.mark.parametrize(
    ("spec", "kwargs", "needle"),
    [
        ("resnet", {}, "cnn, mlp, transformer"),
        ("no_such_module_kq:f", {}, "no_such_module_kq"),
        ("missing.py:f", {}, "missing.py"),
        ("my_models.py", {}, "my_models.py:function"),
        ("{file}:nope", {}, "'nope'"),
        ("{file}:NOT_CALLABLE", {}, "not a function"),
        ("{file}:not_a_model", {}, "not a torch.nn.Module"),
        ("{file}:tiny", {"widht": 3}, "widht"),
        ("{bad}:f", {}, "boom"),
        ("mlp", {"hidden": torch.zeros(2)}, "hidden"),
        ("mlp", {"hidden": 5}, "hidden"),
        ("mlp", {"dropout": 1.5}, "dropout"),
        ("cnn", {"width": 0}, "width"),
        ("transformer", {"dim": 30, "heads": 4}, "multiple of heads"),
        ("transformer", {"depth": 2.5}, "depth"),
        ("transformer", {"tokens": [8]}, "tokens must be"),
        ("bad spec:x-y", {}, "package.module:function"),
    ],
)
def test_errors_are_one_line_model_errors(spec, kwargs, needle, factory_file, tmp_path):
    bad = tmp_path / "bad_factories.py"
    bad.write_text(BAD_FILE_IMPORT)
    spec = spec.format(file=factory_file, bad=bad)
    with pytest.raises(ModelError) as info:
        build_model(spec, trust_code=True, **kwargs)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "spec", ["os:system", "subprocess:run", "builtins:exec", "{file}:tiny", "pkg.mod:fn", "missing.py:f"]
)
def test_code_is_refused_without_trust_before_import(spec, factory_file, tmp_path):
    """Nothing is imported: a module that would write a marker on import never runs."""
    marker = tmp_path / "imported"
    evil = tmp_path / "evil_on_import.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef tiny():\n    return None\n")
    for one in (spec.format(file=factory_file), f"{evil}:tiny"):
        with pytest.raises(TrustError, match="--trust-code") as info:
            build_model(one, command=f"touch {marker}")
        assert "\n" not in str(info.value) and one in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("mlp", {}),
        ("mlp", {"in_features": 11, "hidden": [3, 5, 7], "num_classes": 2}),
        ("mlp", {"hidden": []}),
        ("cnn", {}),
        ("cnn", {"in_channels": 3, "width": 5, "blocks": 3, "num_classes": 4}),
        ("transformer", {}),
        ("transformer", {"tokens": [3, 5], "dim": 12, "depth": 3, "heads": 3, "mlp_ratio": 3}),
    ],
)
def test_builtins_refuse_sizes_above_the_limit_before_allocating(name, kwargs, monkeypatch):
    """Each built-in counts its parameters and buffers (as float32) exactly: at the limit it builds, one
    byte less not."""
    model = build_model(name, **kwargs)
    nbytes = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    monkeypatch.setenv("KEIRYO_MAX_BYTES", str(nbytes))
    build_model(name, **kwargs)
    monkeypatch.setenv("KEIRYO_MAX_BYTES", str(nbytes - 1))
    with pytest.raises(ResourceError, match="KEIRYO_MAX_BYTES"):
        build_model(name, **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("mlp", {"hidden": [10**6, 10**6]}, "TiB"),
        ("cnn", {"width": 10**6}, "TiB"),
        ("transformer", {"dim": 2**16, "heads": 1, "depth": 50}, "TiB"),
        ("mlp", {"hidden": [1] * 5000}, "at most 1000"),
        ("transformer", {"depth": 10**9}, "at most 1000"),
    ],
)
def test_memory_bombs_fail_fast_in_one_line(name, kwargs, needle):
    with pytest.raises((ResourceError, ModelError), match=needle) as info:
        build_model(name, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "shape", "classes", "expected"),
    [
        ("mlp", (1, 8, 8), 10, {"in_features": 64, "num_classes": 10}),
        ("mlp", (20,), None, {"in_features": 20, "num_classes": 1}),
        ("cnn", (3, 12, 12), 4, {"in_channels": 3, "num_classes": 4}),
        ("transformer", (1, 8, 8), 10, {"tokens": [8, 8], "num_classes": 10}),
        ("transformer", (6, 5), 3, {"tokens": [6, 5], "num_classes": 3}),
        ("transformer", (20,), None, {"tokens": [1, 20], "num_classes": 1}),
    ],
)
def test_kwargs_for_data_sizes_a_working_model(name, shape, classes, expected):
    kwargs = kwargs_for_data(name, shape, classes)
    assert kwargs == expected
    model = build_model(name, **kwargs).eval()
    assert model(torch.rand(2, *shape)).shape == (2, classes or 1)


def test_kwargs_for_data_rejects_what_cannot_fit():
    with pytest.raises(ModelError, match="channels, height, width"):
        kwargs_for_data("cnn", (64,), 10)
    with pytest.raises(ModelError, match="built-in"):
        kwargs_for_data("pkg.mod:fn", (64,), 10)


def test_cnn_learns_digits_in_three_epochs():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    digits = load_digits()
    inputs = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    targets = torch.tensor(digits.target)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    train, test = order[: int(0.7 * len(order))], order[int(0.85 * len(order)) :]
    torch.manual_seed(0)
    model = build_model("cnn")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for epoch in range(3):
        model.train()
        shuffled = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))]
        for batch in shuffled.split(64):
            loss = F.cross_entropy(model(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(inputs[test]).argmax(1) == targets[test]).float().mean().item()
    assert accuracy >= 0.90
