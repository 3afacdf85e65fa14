from __future__ import annotations

import pytest
import torch
from torch import nn

from keiryo.export import ExportError, export
from keiryo.models import build_model

SMALL = {"mlp": {"hidden": [32]}, "cnn": {"width": 8, "blocks": 1}, "transformer": {"dim": 32, "depth": 1}}


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_onnx_export_runs_in_onnxruntime_and_matches(tmp_path, name):
    torch.manual_seed(0)
    model = build_model(name, **SMALL[name]).eval()
    result = export(model, torch.randn(4, 1, 8, 8), tmp_path / f"{name}.onnx", "onnx")
    assert result.max_error <= 1e-4
    assert result.path.exists() and result.bytes == result.path.stat().st_size
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert result.bytes >= weights  # the weights are inside the one file, not in a side file
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.onnx"]
    assert result.runtime_p50_ms > 0 and result.torch_p50_ms > 0


def test_onnx_int8_is_quantized_by_onnxruntime_smaller_and_close(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[256, 256]).eval()
    x = torch.randn(16, 1, 8, 8)
    full = export(model, x, tmp_path / "f.onnx", "onnx")
    int8 = export(model, x, tmp_path / "q.onnx", "onnx-int8")
    assert int8.format == "onnx-int8" and int8.bytes < 0.35 * full.bytes
    with torch.inference_mode():
        scale = float(model(x).abs().max())
    assert 0 < int8.max_error < 0.05 * scale  # int8 rounding, not a broken graph
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "q.onnx"]


def test_a_torch_int8_model_points_to_onnx_int8(tmp_path):
    from torch.ao.quantization import quantize_dynamic

    model = quantize_dynamic(build_model("mlp", hidden=[32]).eval(), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ExportError, match="onnx-int8") as info:
        export(model, torch.randn(4, 1, 8, 8), tmp_path / "q.onnx", "onnx")
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_onnx_file_has_a_dynamic_batch(tmp_path):
    import onnxruntime as ort

    model = build_model("mlp", **SMALL["mlp"]).eval()
    path = export(model, torch.randn(4, 1, 8, 8), tmp_path / "m.onnx").path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(17, 1, 8, 8)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert out.shape == (17, 10)
    assert torch.allclose(torch.from_numpy(out), model(x), atol=1e-5)


def test_torch_export_program_round_trips(tmp_path):
    model = build_model("cnn", **SMALL["cnn"]).eval()
    result = export(model, torch.randn(4, 1, 8, 8), tmp_path / "cnn.pt2", "torch-export")
    assert result.max_error <= 1e-5
    loaded = torch.export.load(str(result.path)).module()
    x = torch.randn(6, 1, 8, 8)
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_safetensors_holds_the_weights(tmp_path):
    from safetensors.torch import load_file

    model = build_model("mlp", **SMALL["mlp"])
    result = export(model, torch.randn(2, 1, 8, 8), tmp_path / "w.safetensors", "safetensors")
    loaded = load_file(str(result.path))
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_unknown_format_and_failed_export_are_clear_and_leave_no_file(tmp_path):
    model = build_model("mlp", **SMALL["mlp"])
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export(model, torch.randn(2, 1, 8, 8), tmp_path / "m.tflite", "tflite")

    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on a tensor's value: no static graph can hold it
                return x * 2
            return x

    with pytest.raises(ExportError, match="failed") as info:
        export(DataDependent(), torch.randn(2, 3), tmp_path / "bad.onnx", "onnx")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_reports_error_and_latency(tmp_path, capsys):
    from keiryo import artifacts
    from keiryo.cli import main

    model = artifacts.save(
        build_model("mlp", **SMALL["mlp"]), tmp_path / "m.pt", metadata={"input_shape": [64]}
    )
    assert main(["export", str(model), "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "max |exported − PyTorch|" in out and "latency at batch 64" in out
    assert (tmp_path / "m.onnx").exists()
    assert main(["export", str(model), "--out", str(tmp_path / "m.x"), "--format", "tflite"]) == 2
    assert "unknown export format" in capsys.readouterr().err
