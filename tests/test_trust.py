"""Nothing a file says is trusted: recipes, model files, cached steps and Hugging Face folders run no code
unless the caller trusts it, write nowhere but their output folder, and cannot make keiryo allocate more than
KEIRYO_MAX_BYTES. Every refusal is one line (a KeiryoError; exit 2 from the CLI), and no code inside a file
ever runs: each evil file here writes a marker when it runs, and every test checks that the marker is absent.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import time
import zipfile

import pytest
import torch

from keiryo import artifacts, sparse
from keiryo.cli import main
from keiryo.errors import ArtifactError, ConfigError, KeiryoError, ModelError, ResourceError, TrustError
from keiryo.metrics import Timing
from keiryo.models import build_model
from keiryo.recipe import load_recipe
from keiryo.steps import run_recipe
from keiryo.yamlfile import MAX_BYTES as MAX_RECIPE_BYTES

TINY = "name: tiny\nsteps:\n  - train: {model: mlp, epochs: 1, model_args: {hidden: [8]}}\n"


@pytest.fixture
def marker(tmp_path):
    """The file that evil code writes when it runs; it must never exist after a refusal."""
    return tmp_path / "ran"


@pytest.fixture
def evil(tmp_path, marker):
    """A Python file that writes the marker when imported and when its factory is called."""
    path = tmp_path / "evil.py"
    path.write_text(
        f"open({str(marker)!r}, 'a').write('imported\\n')\n"
        "from keiryo.models import mlp\n\n"
        "def make(**kwargs):\n"
        f"    open({str(marker)!r}, 'a').write('called\\n')\n"
        "    return mlp(**(kwargs or {'in_features': 64, 'hidden': [8], 'num_classes': 10}))\n"
    )
    return path


@pytest.fixture
def quick(monkeypatch):
    """Recipe runs that time latency briefly and write no report files: these tests are about trust."""
    measuring = sys.modules["keiryo.measuring"]
    real = measuring.compare

    def brief(models, example_inputs, data=None, timing=None):
        return real(models, example_inputs, data, Timing(runs=2, warmup=1))

    monkeypatch.setattr(measuring, "compare", brief)
    monkeypatch.setattr(sys.modules["keiryo.report"], "write_reports", lambda *args, **kwargs: None)


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Exit code and stderr of an in-process `keiryo ...`; a refusal is one `error:` line, no traceback."""
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def _one_error_line(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err and "unexpected" not in err


# --- recipes: code ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "after_train"),
    [
        ("train: {{model: 'os:system', model_args: {{command: 'touch {marker}'}}}}", False),
        ("train: {{model: 'subprocess:run', model_args: {{args: ['touch', '{marker}']}}}}", False),
        ("train: {{model: '{evil}:make'}}", False),
        ("distill: {{student: '{evil}:make', epochs: 1}}", True),
    ],
)
def test_recipe_code_is_refused_before_anything_runs(tmp_path, capsys, marker, evil, step, after_train):
    first = "  - train: {model: mlp, epochs: 1}\n" if after_train else ""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nsteps:\n{first}  - " + step.format(marker=marker, evil=evil) + "\n")
    out = tmp_path / "out"
    with pytest.raises(TrustError, match="--trust-code") as info:
        run_recipe(recipe, out, progress=False)
    assert "\n" not in str(info.value) and f"line {3 + bool(first)}" in str(info.value)
    _one_error_line(*_cli(capsys, "run", str(recipe), "--out", str(out), "--no-progress"), "--trust-code")
    assert not marker.exists() and not out.exists()  # refused before the first step: nothing written


def test_unknown_names_are_model_errors_not_trust_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - train: {model: resnet, epochs: 1}\n")
    with pytest.raises(ModelError, match="unknown model 'resnet'"):
        run_recipe(recipe, tmp_path / "out", progress=False)


def test_trusted_recipe_runs_the_factory(tmp_path, marker, evil, quick):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nsteps:\n  - train: {{model: '{evil}:make', epochs: 1}}\n")
    _, outcomes = run_recipe(recipe, tmp_path / "out", progress=False, trust_code=True)
    assert marker.read_text() == "imported\ncalled\n" and outcomes[0].model_path.exists()


def test_planted_cached_step_is_refused_and_corrupt_ones_rerun(tmp_path, capsys, marker, evil, quick):
    """A step file planted in the output folder (with the key of the step) is data, not code."""
    recipe, out = tmp_path / "tiny.yaml", tmp_path / "out"
    recipe.write_text(TINY)
    run_recipe(recipe, out, progress=False)
    good = (out / "train.pt").read_bytes()
    payload = torch.load(out / "train.pt", weights_only=True)
    payload["spec"]["factory"] = f"{evil}:make"
    torch.save(payload, out / "train.pt")
    with pytest.raises(TrustError, match="train.pt"):
        run_recipe(recipe, out, progress=False)
    _one_error_line(*_cli(capsys, "run", str(recipe), "--out", str(out), "--no-progress"), "--trust-code")
    assert not marker.exists()
    _, outcomes = run_recipe(recipe, out, progress=False, trust_code=True)  # the caller trusts it: it runs
    assert outcomes[0].cached and marker.read_text() == "imported\ncalled\n"

    (out / "train.pt").write_bytes(good[:300])  # a corrupt step file is not reused: the step runs again
    (out / "train.json").write_text(json.dumps({**json.loads((out / "train.json").read_text()), "info": 3}))
    _, outcomes = run_recipe(recipe, out, progress=False)
    assert not outcomes[0].cached and artifacts.load(out / "train.pt") is not None
    (out / "train.json").write_text("[not json")  # nor is a step whose record is not JSON
    _, outcomes = run_recipe(recipe, out, progress=False)
    assert not outcomes[0].cached and json.loads((out / "train.json").read_text())["kind"] == "train"


# --- recipes: output names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../x", "/tmp/x", ".hidden", "a/b", "a\\b", "..", "x..y", "-x", "metrics"]
)
@pytest.mark.parametrize("where", ["train", "export", "recipe"])
def test_recipe_names_are_plain_file_names(tmp_path, name, where):
    named = {where: {"name": name}}
    raw = {
        "name": name if where == "recipe" else "ok",
        "steps": [
            {"train": {**named.get("train", {}), "model": "mlp", "epochs": 1}},
            {"export": {**named.get("export", {}), "format": "onnx"}},
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(raw, indent=1))  # JSON is YAML; each step starts on its own line
    with pytest.raises(ConfigError, match="plain file name") as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message and "r.yaml" in message
    if where != "recipe":
        lines = [line.strip() for line in path.read_text().splitlines()]
        step_line = lines.index(json.dumps(where) + ": {")  # 0-based: the 1-based line of the "{" above it
        assert f"line {step_line}" in message
    with pytest.raises(ConfigError, match="plain file name"):
        load_recipe(raw)


def test_recipe_objects_are_checked_too(tmp_path):
    recipe = load_recipe({"name": "ok", "steps": [{"train": {"model": "mlp"}}]})
    recipe.steps[0].name = "../../escape"
    with pytest.raises(ConfigError, match="plain file name"):
        run_recipe(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refused_names_write_nothing_anywhere(tmp_path, capsys):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    recipe = work / "r.yaml"
    recipe.write_text("steps:\n  - train: {name: ../../escape, model: mlp, epochs: 1}\n")
    _one_error_line(*_cli(capsys, "run", str(recipe), "--out", str(work / "out")), "plain file name")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "a",
        "a/b",
        "a/b/r.yaml",
    ]


def test_default_names_are_plain(tmp_path):
    assert load_recipe({"steps": [{"train": {}}]}).name == "recipe"
    odd = tmp_path / "my recipe (v2).yaml"
    odd.write_text(TINY.replace("name: tiny\n", ""))
    assert load_recipe(odd).name == "my_recipe__v2_"


# --- recipes: bounded YAML ----------------------------------------------------------------------------------


def _laughs() -> str:
    text = "name: lol\nsteps:\n  - train:\n      model: mlp\n      model_args:\n"
    text += "        a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, 10):  # 9**10 = 3.5 billion strings once expanded
        text += f"        a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (_laughs(), "expands to more than 10000 values"),
        ("a: &a [*a]\nsteps: [*a]\n", "alias contains itself"),
        ("steps: " + "[" * 100_000 + "]" * 100_000 + "\n", "nests [ and { more than 64 deep"),
        ("steps:\n" + "- " * 5000 + "x\n", "nested too deeply"),
        ("#" * (MAX_RECIPE_BYTES + 1), "at most 1048576"),
        (b"steps: \xff\xfe\n", "not UTF-8"),
        ("steps:\n  - train: 5\n", "line 2: the options of step 'train' must be a mapping"),
    ],
    ids=["billion-laughs", "self-alias", "deep-brackets", "deep-dashes", "huge", "not-utf8", "scalar-step"],
)
def test_hostile_yaml_fails_fast_in_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "bomb.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")) as info:
        load_recipe(path)
    assert time.perf_counter() - started < 2.0
    assert "\n" not in str(info.value)
    _one_error_line(*_cli(capsys, "run", str(path), "--out", str(tmp_path / "out")), needle)


def test_plain_anchors_still_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - train: &t {model: mlp, epochs: 1}\n  - train: {name: again, model: mlp}\n")
    assert [s.name for s in load_recipe(path).steps] == ["train", "again"]


# --- model files --------------------------------------------------------------------------------------------


def _tampered(tmp_path, change) -> str:
    """A small mlp's model file, with `change(payload)` applied to what it records."""
    model = build_model("mlp", in_features=64, hidden=[8], num_classes=10)
    path = artifacts.save(model, tmp_path / "m.pt", metadata={"input_shape": [1, 8, 8]})
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)
    return str(path)


def _sparse_bomb(p):
    p["state_dict"]["fc0.weight"] = {
        "format": sparse.SPARSE_FORMAT,
        "shape": [10**6, 10**6],
        "mask": torch.zeros(4, dtype=torch.uint8),
        "values": torch.zeros(0),
    }


def _del(key):
    return lambda p: p.pop(key)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(payload):
        target = payload
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "error", "needle"),
    [
        (_del("spec"), ArtifactError, "no valid 'spec'"),
        (_set("spec", "factory", 3), ArtifactError, "no valid 'spec'"),
        (_set("spec", "kwargs", "hidden", [10**6, 10**6]), ResourceError, "TiB"),
        (_set("spec", "kwargs", "hidden", "x"), KeiryoError, "hidden must be a list"),
        (
            _set("structure", "fc0", "shapes", "weight", [10**6, 10**6]),
            ResourceError,
            "recorded layer shapes",
        ),
        (_set("structure", "fc0", "shapes", "weight", ["8", 64]), ArtifactError, "not a list of at most 8"),
        (_set("structure", "nope", {"class": "X", "attrs": {}, "shapes": {}}), ArtifactError, "'nope'"),
        (_set("structure", [1]), ArtifactError, "no valid 'structure'"),
        (_set("metadata", "input_shape", [10**9, 10**9]), ResourceError, "recorded shape"),
        (_set("metadata", "input_shape", "1x8x8"), ArtifactError, "records input shape"),
        (_set("metadata", [1]), ArtifactError, "malformed 'metadata'"),
        (_set("state_dict", "fc0.weight", torch.zeros(3, 3)), ArtifactError, "'fc0.weight' has shape [3, 3]"),
        (lambda p: p["state_dict"].pop("fc0.bias"), ArtifactError, "'fc0.bias' is missing"),
        (_set("state_dict", "extra", torch.zeros(1)), ArtifactError, "'extra' belongs to no layer"),
        (_set("state_dict", "fc0.weight", "weights"), ArtifactError, "does not match"),
        (_sparse_bomb, ResourceError, "sparse"),
        (_set("transforms", [{"kind": "exec"}]), ArtifactError, "malformed 'transforms'"),
        (_set("transforms", [{"kind": "exec", "options": {}}]), ArtifactError, "cannot replay"),
        (_set("transforms", [{"kind": "quantize", "options": {"x": 1}}]), KeiryoError, "m.pt"),
        (_set("spec", "factory", "os:system"), TrustError, "--trust-code"),
    ],
)
def test_bad_model_files_are_one_line_errors(tmp_path, capsys, change, error, needle):
    path = _tampered(tmp_path, change)
    with pytest.raises(error, match=needle.replace("[", r"\[")) as info:
        artifacts.load(path)
    assert "\n" not in str(info.value) and "m.pt" in str(info.value)
    _one_error_line(*_cli(capsys, "bench", path, "--runs", "1"), "m.pt")


def test_model_file_factories_run_only_when_trusted(tmp_path, marker, evil):
    path = _tampered(tmp_path, _set("spec", "factory", f"{evil}:make"))
    with pytest.raises(TrustError, match="evil.py:make"):
        artifacts.load(path)
    assert not marker.exists()
    assert artifacts.load(path, trust_code=True)(torch.rand(2, 64)).shape == (2, 10)
    assert marker.read_text() == "imported\ncalled\n"


def test_recorded_attributes_cannot_replace_methods_or_layers(tmp_path):
    def change(payload):
        payload["structure"]["fc0"]["attrs"].update(forward="x", in_features=64, out_features="8")
        payload["structure"][""]["attrs"]["fc0"] = 3

    model = artifacts.load(_tampered(tmp_path, change))
    assert callable(model.fc0.forward) and model.fc0.out_features == 8
    assert model(torch.rand(2, 64)).shape == (2, 10)


def test_files_are_sized_before_they_are_read(tmp_path, monkeypatch):
    path = _tampered(tmp_path, lambda p: None)
    monkeypatch.setenv("KEIRYO_MAX_BYTES", "1K")
    with pytest.raises(ResourceError, match="m.pt"):
        artifacts.load(path)
    monkeypatch.setenv("KEIRYO_MAX_BYTES", "1M")  # a 1 KiB file whose record unpacks to 2 MiB
    bomb = tmp_path / "zip.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zip/data.pkl", b"\0" * (2 << 20))
    assert bomb.stat().st_size < 10_000
    with pytest.raises(ResourceError, match="unpacked"):
        artifacts.load(bomb)


def test_input_shape_of_checks_the_batch(tmp_path, monkeypatch):
    model = artifacts.load(_tampered(tmp_path, lambda p: None))
    assert artifacts.input_shape_of(model) == (1, 8, 8)
    assert artifacts.input_shape_of({}) is None
    monkeypatch.setenv("KEIRYO_MAX_BYTES", str(4 * 64 * 64))
    assert artifacts.input_shape_of(model, batch=64) == (1, 8, 8)
    with pytest.raises(ResourceError, match="a batch of 65"):
        artifacts.input_shape_of(model, batch=65)


# --- Hugging Face folders -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf") / "bert"
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    return path


@pytest.fixture
def folder(hf_dir, tmp_path):
    """A fresh copy of the tiny BERT folder, to break."""
    return shutil.copytree(hf_dir, tmp_path / "bert")


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_hf_remote_code_is_refused_before_transformers_even_if_trusted(folder, marker, monkeypatch, where):
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    auto_map = {"AutoModel": "evil.Model", "AutoConfig": "evil.Config", "AutoTokenizer": ["evil.T", None]}
    if where == "config.json":
        _edit_config(folder, auto_map=auto_map)
    else:
        (folder / where).write_text(json.dumps({"auto_map": auto_map}))

    def no_transformers():
        raise AssertionError("transformers was called")

    monkeypatch.setattr("keiryo.hf_files.transformers_module", no_transformers)
    for trust in (False, True):
        with pytest.raises(TrustError, match=f"auto_map in {where}.*not even with --trust-code") as info:
            build_model(f"hf:{folder}", trust_code=trust)
        assert "\n" not in str(info.value)
    assert not marker.exists()


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_header(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:8] + b"{garbage" + data[16:])


def _truncated(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _pickled_bin(folder, marker):
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({**state, "x": _Evil(marker)}, f)


def _pickled_zip_bin(folder, marker):
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "x": _Evil(marker)}, folder / "pytorch_model.bin")


@pytest.mark.parametrize(
    ("breaks", "error", "needle"),
    [
        (
            lambda f, m: (f / "config.json").write_text("{not json"),
            ArtifactError,
            "config.json' is not valid",
        ),
        (lambda f, m: (f / "config.json").write_text("[1, 2]"), ArtifactError, "not a JSON object"),
        (lambda f, m: _edit_config(f, model_type="nope"), ArtifactError, "config.json"),
        (lambda f, m: _bad_header(f), ArtifactError, "model.safetensors' are not a valid safetensors"),
        (lambda f, m: _truncated(f), ArtifactError, "lies outside the file"),
        (_pickled_zip_bin, ArtifactError, "pytorch_model.bin' hold pickled Python objects"),
        (_pickled_bin, ArtifactError, "pytorch_model.bin"),
        (
            lambda f, m: _edit_config(f, hidden_size=2**16, intermediate_size=2**18, num_hidden_layers=20),
            ResourceError,
            "TiB",
        ),
    ],
)
def test_broken_hf_folders_are_one_line_errors(folder, marker, capsys, tmp_path, breaks, error, needle):
    breaks(folder, marker)
    with pytest.raises(error, match=needle) as info:
        build_model(f"hf:{folder}")
    assert "\n" not in str(info.value)
    _one_error_line(*_cli(capsys, "hf", str(folder), "--out", str(tmp_path / "x.pt")), needle)
    assert not marker.exists()


def test_hf_bin_weights_of_plain_tensors_still_load(folder):
    from safetensors.torch import load_file

    reference = build_model(f"hf:{folder}")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    again = build_model(f"hf:{folder}")
    tokens = torch.stack([torch.randint(5, 30, (3, 6)), torch.ones(3, 6, dtype=torch.long)], dim=1)
    torch.testing.assert_close(again(tokens), reference(tokens))
