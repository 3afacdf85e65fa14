"""Deployment runtimes (keiryo.runtimes): every candidate's program reproduces the PyTorch model, takes any
batch size, saves and loads back from its own artifact + JSON sidecar, and fails in one line on bad files or a
missing package. openvino/nncf are in the [dev] extra, executorch is a base dependency: nothing is skipped."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from multi_input import tiny_bert
from torch import nn

from keiryo import inputs
from keiryo.data import tensors_of
from keiryo.errors import ArtifactError, ConfigError, MissingDependency
from keiryo.export_check import ExportError
from keiryo.metrics import agreement, time_models
from keiryo.models import cnn
from keiryo.runtimes import RUNTIME_CANDIDATES, Runner, build, load_runtime
from keiryo.runtimes.openvino_runtime import has_bf16

INT8 = {c for c in RUNTIME_CANDIDATES if "int8" in c}
LOSSY = INT8 | {"openvino-bf16"}  # compared by cosine and top-1, not element by element


@pytest.fixture(scope="module")
def trained(digits):
    """keiryo's digits cnn (narrow), trained briefly: int8 must keep its predictions, not random ones."""
    torch.manual_seed(0)
    model = cnn(width=16, blocks=1)
    x, y = tensors_of(digits.train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: one thread is as fast, and robust on a busy machine
    try:
        for _ in range(150):
            rows = torch.randint(0, len(y), (64,))
            loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), x, tensors_of(digits.test)[0]


@pytest.mark.parametrize("candidate", RUNTIME_CANDIDATES)
def test_candidate_matches_pytorch_at_any_batch_and_round_trips(candidate, trained, tmp_path):
    model, train_x, test_x = trained
    if candidate == "openvino-bf16" and not has_bf16():  # this CPU: refused in one line, not emulated
        with pytest.raises(ExportError, match="no bf16 units"):
            build(model, train_x[:8], candidate)
        return
    runner = build(model, train_x[:8], candidate, calibration=train_x[:200])
    assert isinstance(runner, Runner) and runner.runtime == candidate.split("-")[0]
    with torch.inference_mode():
        for batch in (1, 5, 70):  # 70: beyond ExecuTorch's planned batch, run in chunks
            got, want = runner(test_x[:batch]), model(test_x[:batch])
            assert got.shape == want.shape
            if candidate not in LOSSY:
                assert (got - want).abs().max() <= 1e-4
        got, want = runner(test_x), model(test_x)
    if candidate in LOSSY:
        cosine = nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert cosine >= 0.99
        assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.97

    path = runner.save(tmp_path / f"model{runner.suffix}")
    files = [f for f in tmp_path.iterdir() if f.suffix != ".json"]
    assert runner.file_bytes() == sum(f.stat().st_size for f in files)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no staging left behind
    loaded = load_runtime(path)
    assert (loaded.runtime, loaded.precision) == (runner.runtime, runner.precision)
    with torch.inference_mode():
        assert torch.equal(loaded(test_x[:9]), runner(test_x[:9]))
    assert load_runtime(tmp_path / f"model{runner.suffix}.json").precision == runner.precision


def test_keiryo_measurements_take_a_runner(trained):
    model, train_x, test_x = trained
    runner = build(model, train_x[:4], "onnxruntime")
    latency = time_models({"torch": model, "ort": runner}, test_x[:16], runs=3, warmup=1)
    assert latency["ort"].p50_ms > 0 and latency["ort"].batch_size == 16
    agree = agreement(runner, model, test_x)
    assert agree.top1 == 1.0


@pytest.mark.parametrize("candidate", ["onnxruntime", "onnxruntime-int8-dynamic", "openvino", "executorch"])
def test_raw_transformers_model_with_dict_inputs(candidate, tmp_path):
    model = tiny_bert(vocab=50, hidden=32, layers=1, heads=4, positions=32)
    ids = torch.randint(0, 50, (4, 16))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[0, 10:] = 0
    example = {"input_ids": ids, "attention_mask": mask}
    runner = build(model, example, candidate)
    with torch.inference_mode():
        want = model(**example).last_hidden_state
        got = runner(**example)
        assert list(got) == ["last_hidden_state"]  # named as the model names it
        assert inputs.output_name(got) == "last_hidden_state"
        got = got["last_hidden_state"]
        one = runner(input_ids=ids[:1], attention_mask=mask[:1])["last_hidden_state"]
    if candidate == "onnxruntime-int8-dynamic":
        assert nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) >= 0.99
    else:
        assert (got - want).abs().max() <= 1e-4
    assert one.shape == (1, 16, 32)
    loaded = load_runtime(runner.save(tmp_path / f"bert{runner.suffix}"))
    with torch.inference_mode():
        assert torch.equal(loaded(**example)["last_hidden_state"], got)
        with pytest.raises(ConfigError, match="attention_mask"):
            loaded(input_ids=ids)


def test_bad_candidate_inputs_and_paths_are_one_line(trained, tmp_path):
    model, train_x, _ = trained
    with pytest.raises(ConfigError, match="unknown runtime candidate 'tensorrt'"):
        build(model, train_x[:2], "tensorrt")
    with pytest.raises(ExportError, match="example inputs"):
        build(model, "not a tensor", "onnxruntime")
    runner = build(model, train_x[:2], "onnxruntime")
    with pytest.raises(ConfigError, match=r"\.onnx file"):
        runner.save(tmp_path / "model.pte")
    with pytest.raises(ConfigError, match="rank 4"):
        runner(train_x[0])


@pytest.mark.parametrize("suffix", [".onnx", ".xml", ".pte"])
def test_corrupt_or_missing_artifacts_are_one_line_errors(suffix, trained, tmp_path):
    model, train_x, _ = trained
    candidate = {".onnx": "onnxruntime", ".xml": "openvino", ".pte": "executorch"}[suffix]
    path = build(model, train_x[:2], candidate).save(tmp_path / f"m{suffix}")
    sidecar = tmp_path / f"m{suffix}.json"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactError, match="corrupt or not a") as info:
        load_runtime(path)
    assert "\n" not in str(info.value)
    sidecar.write_text("{not json")
    with pytest.raises(ArtifactError, match="not a keiryo runtime sidecar"):
        load_runtime(path)
    sidecar.write_text(json.dumps({"format": "keiryo-runtime", "version": 99, "signature": {}}))
    with pytest.raises(ArtifactError, match="not a keiryo runtime sidecar"):
        load_runtime(path)
    sidecar.unlink()
    with pytest.raises(ArtifactError, match="does not exist"):
        load_runtime(path)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_runtime(tmp_path / "absent.onnx")


def test_a_missing_runtime_is_one_line_naming_the_pip_command(trained, monkeypatch):
    model, train_x, _ = trained
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(MissingDependency, match=r"pip install 'keiryo\[openvino\]'") as info:
        build(model, train_x[:2], "openvino-int8")
    assert "\n" not in str(info.value)
