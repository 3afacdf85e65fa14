from __future__ import annotations

import pytest
import torch
from multi_input import tiny_bert
from torch import nn

from keiryo.export import SUFFIXES, ExportError, export
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


def _negated(model: nn.Module) -> nn.Module:
    """A copy whose float weights are negated: a different model with the same architecture."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.neg_()
    return other


@pytest.mark.parametrize("format", ["onnx", "onnx-int8", "torch-export", "safetensors"])
def test_the_check_reads_the_written_file_and_a_wrong_file_is_not_kept(tmp_path, monkeypatch, format):
    """Each writer is made to write another model's file: the check, which loads what was written into a
    fresh object, must catch it, and the file already at the target must stay as it was."""
    import safetensors.torch

    torch.manual_seed(0)
    model = build_model("mlp", hidden=[32]).eval()
    other, x = _negated(model), torch.randn(8, 1, 8, 8)
    if format.startswith("onnx"):
        real = torch.onnx.export
        monkeypatch.setattr(torch.onnx, "export", lambda m, args, path, **kw: real(other, args, path, **kw))
    elif format == "torch-export":
        real_save, batch = torch.export.save, torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.export.export(other, (x,), dynamic_shapes=({0: batch},))
        monkeypatch.setattr(torch.export, "save", lambda _, path: real_save(program, path))
    else:
        real_file = safetensors.torch.save_file
        monkeypatch.setattr(
            safetensors.torch, "save_file", lambda t, path: real_file({k: -v for k, v in t.items()}, path)
        )
    target = tmp_path / ("model" + SUFFIXES[format])
    target.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="written") as info:
        export(model, x, target, format)
    assert "\n" not in str(info.value)
    assert target.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the temporary folder is gone


def test_safetensors_is_checked_by_running_a_fresh_copy_of_the_architecture(tmp_path, monkeypatch):
    """The outputs come from a new copy loaded from the file, not from the model itself."""
    import copy

    model = build_model("cnn", **SMALL["cnn"]).eval()
    copies: list[nn.Module] = []
    real_deepcopy = copy.deepcopy

    def spy(obj, *args):
        result = real_deepcopy(obj, *args)
        if obj is model:
            copies.append(result)
        return result

    monkeypatch.setattr(copy, "deepcopy", spy)
    result = export(model, torch.randn(4, 1, 8, 8), tmp_path / "w.safetensors", "safetensors")
    assert result.max_error == 0.0 and len(copies) == 1 and copies[0] is not model


def test_int8_dynamic_to_safetensors_is_refused_in_one_line(tmp_path):
    """Packed int8 weights are not plain tensors: refused with the format that keeps them, never a tiny file
    of scales that claims success."""
    from keiryo.compress.qconfig import Policy
    from keiryo.compress.quantize import quantize

    model = build_model("mlp", hidden=[32]).eval()
    q = quantize(model, "int8-dynamic", policy=Policy(backend="fbgemm", runs=1, compile=False))
    with pytest.raises(ExportError, match="keiryo .pt") as info:
        export(q, torch.randn(4, 1, 8, 8), tmp_path / "q.safetensors", "safetensors")
    assert "\n" not in str(info.value) and "'fc0'" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_an_export_leaves_no_temporary_folder(tmp_path, monkeypatch):
    def interrupted(model, args, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half an onnx file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(KeyboardInterrupt):
        export(build_model("mlp", hidden=[8]), torch.randn(2, 1, 8, 8), target, "onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and target.read_bytes() == b"previous export"


def test_export_refuses_bad_targets_and_inputs_before_any_work(tmp_path):
    model = build_model("mlp", hidden=[8])
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ExportError, match="folder"):
        export(model, torch.randn(2, 1, 8, 8), tmp_path, "onnx")
    with pytest.raises(ExportError, match="is a file"):
        export(model, torch.randn(2, 1, 8, 8), tmp_path / "file.txt" / "m.onnx", "onnx")
    with pytest.raises(ExportError, match="example inputs"):
        export(model, torch.randn(0, 1, 8, 8), tmp_path / "m.onnx", "onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_a_raw_bert_with_ids_and_mask_exports_to_onnx_and_runs_close_to_torch(tmp_path, form):
    """A transformers BertModel (small config, no download) takes (ids, mask) or a dict of them: the ONNX file
    has both inputs by name, a dynamic batch, and reproduces the main output (last_hidden_state)."""
    import onnxruntime as ort

    bert = tiny_bert(vocab=50, hidden=32, layers=1, heads=4, positions=32)
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    example = (ids, mask) if form == "tuple" else {"input_ids": ids, "attention_mask": mask}
    result = export(bert, example, tmp_path / "bert.onnx", "onnx")
    assert result.output == "last_hidden_state" and result.max_error <= 1e-4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    ids5, mask5 = torch.randint(0, 50, (5, 7)), torch.ones(5, 7, dtype=torch.long)
    got = session.run(None, {"input_ids": ids5.numpy(), "attention_mask": mask5.numpy()})[0]
    with torch.no_grad():
        want = bert(input_ids=ids5, attention_mask=mask5).last_hidden_state
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_a_two_input_model_exports_as_a_program_and_safetensors(tmp_path):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

        def forward(self, x, y):
            return {"logits": self.a(x) + self.b(y), "extra": x.sum(1)}

    model = TwoInputs().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 2)
    program = export(model, (x, y), tmp_path / "m.pt2", "torch-export")
    assert program.output == "logits" and program.max_error <= 1e-5
    loaded = torch.export.load(str(program.path)).module()
    x6, y6 = torch.randn(6, 4), torch.randn(6, 2)
    torch.testing.assert_close(loaded(x6, y6)["logits"], model(x6, y6)["logits"])
    weights = export(model, {"x": x, "y": y}, tmp_path / "m.safetensors", "safetensors")
    assert weights.output == "logits" and weights.max_error == 0.0
