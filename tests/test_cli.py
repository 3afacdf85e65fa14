from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from keiryo import artifacts, provenance
from keiryo.cli import main
from keiryo.models import build_model
from keiryo.runtimes import load_runtime


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_console_script_help_teaches():
    out = subprocess.run(["keiryo", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "bench", "demo"):
        assert command in out
    train_help = subprocess.run(
        ["keiryo", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "Example: keiryo train" in train_help


def test_train_then_bench(tmp_path, capsys):
    model = tmp_path / "mlp.pt"
    code, out, err = run(
        capsys, "train", "--model", "mlp", "--epochs", "2", "--no-progress", "--out", str(model)
    )
    assert code == 0, err
    assert "test accuracy" in out and model.exists()
    meta = provenance.metadata_of(artifacts.load(model))
    assert meta["input_shape"] == [1, 8, 8] and meta["test_accuracy"] > 0.8
    small = tmp_path / "small.pt"
    code, _, err = run(
        capsys, "train", "-m", "mlp", "-a", "hidden=[16]", "--epochs", "1", "--no-progress", "-o", str(small)
    )
    assert code == 0, err
    js = tmp_path / "bench.json"
    code, out, err = run(
        capsys, "bench", str(model), str(small), "--data", "digits", "--runs", "3", "--json", str(js)
    )
    assert code == 0, err
    assert "mlp" in out and "small" in out
    rows = json.loads(js.read_text())["models"]
    assert [r["name"] for r in rows] == ["mlp", "small"] and rows[1]["size_ratio"] < 0.5
    code, out, err = run(capsys, "bench", str(model), "--runs", "2", "--batch-sizes", "1")
    assert code == 0, err  # input shape taken from the file's metadata


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "nope.npz", "--no-progress"], "nope.npz"),
        (["train", "--model", "resnet9000", "--no-progress"], "resnet9000"),
        (["train", "--precision", "fp8", "--no-progress"], "precision"),
        (["train", "--model-arg", "width", "--no-progress"], "name=value"),
        (["bench", "missing.pt"], "missing.pt"),
        (["bench", "CORRUPT", "--runs", "1"], "corrupt"),
        (["bench", "GOOD", "--batch-sizes", "a,b"], "--batch-sizes"),
        (["train", "--epochs", "zero"], "--epochs"),
        (["frobnicate"], "frobnicate"),
        (["deploy", "missing.pt"], "missing.pt"),
        (["deploy", "GOOD", "--batch", "0,8"], "--batch"),
        (["deploy", "GOOD", "--runtimes", "tensorrt"], "tensorrt"),
        (["deploy", "GOOD", "--also", "torch"], "also"),
        (["deploy", "GOOD", "--out", "GOOD"], "--out"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    good = artifacts.save(
        build_model("mlp", in_features=64, hidden=[4], num_classes=10), tmp_path / "good.pt"
    )
    args = [str(corrupt) if a == "CORRUPT" else str(good) if a == "GOOD" else a for a in args]
    args = [str(tmp_path / a) if a.endswith(".npz") else a for a in args]
    code, out, err = run(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in out + err


def test_cli_exits_nonzero_as_a_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "keiryo", "bench", str(tmp_path / "none.pt")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_demo_runs_the_whole_recipe(tmp_path, capsys):
    code, out, err = run(capsys, "demo", "--out", str(tmp_path), "--quick", "--no-progress")
    assert code == 0, err
    assert "keiryo demo" in out and "report:" in out
    for step in ("teacher", "prune", "distill", "quantize"):
        assert (tmp_path / f"{step}.pt").exists(), step
    assert (tmp_path / "report.html").exists() and "deploy (" in out
    chosen = json.loads((tmp_path / "deploy" / "report.json").read_text())["chosen"]
    assert set(chosen) == {"1", "64"}
    pte = load_runtime(tmp_path / "deploy" / "executorch.pte")  # the .pte runs in ExecuTorch's runtime
    x = torch.randn(5, 1, 8, 8)
    distilled = artifacts.load(tmp_path / "distill.pt")
    torch.testing.assert_close(pte(x), distilled(x), atol=1e-3, rtol=1e-3)


def test_deploy_writes_the_choice_and_prints_the_table(tmp_path, capsys):
    model = artifacts.save(build_model("mlp", in_features=64, hidden=[16], num_classes=10), tmp_path / "m.pt")
    out = tmp_path / "deployed"
    args = ["deploy", str(model), "--data", "digits", "--out", str(out), "--batch", "1,8"]
    code, stdout, err = run(capsys, *args, "--runtimes", "onnxruntime-fp32", "--runs", "3", "--no-progress")
    assert code == 0, err
    assert "onnxruntime" in stdout and "batch 8:" in stdout and "report:" in stdout
    blob = json.loads((out / "report.json").read_text())
    assert {c["name"] for c in blob["candidates"]} == {"torch", "onnxruntime"}
    for b, name in blob["chosen"].items():
        chosen = next(c for c in blob["candidates"] if c["name"] == name)
        assert (out / chosen["artifact"]).is_file() and chosen["cosine"] > 0.99, b


def test_env_prints_versions(capsys):
    code, out, _ = run(capsys, "env")
    assert code == 0 and f"torch: {torch.__version__}" in out


def test_import_keiryo_is_cheap_and_names_load_on_first_use():
    code = (
        "import sys, keiryo\n"
        "assert 'torch' not in sys.modules, 'import keiryo imported torch'\n"
        "from keiryo.training import train\n"
        "from keiryo.parallel.config import DDP\n"
        "assert keiryo.train is train and keiryo.DDP is DDP and 'train' in dir(keiryo)\n"
        "try:\n    keiryo.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_hf_command_takes_a_decoder_folder(tmp_path, capsys):
    """A causal LM's folder (transformers' own model, not keiryo's text encoder) is measured on its texts."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "a", "mat"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on a mat\na cat\n")
    out = tmp_path / "llama.pt"
    code, stdout, err = run(
        capsys, "hf", str(folder), "--texts", str(texts), "--runs", "2", "--out", str(out)
    )
    assert code == 0, err
    assert "causal-lm, 2 texts" in stdout and out.exists()
    back = tmp_path / "back"  # and back to a folder transformers loads by itself
    code, stdout, err = run(capsys, "export", str(out), "--format", "hf", "--out", str(back))
    assert code == 0, err
    assert (back / "config.json").is_file() and "max |exported − PyTorch| (weights)" in stdout
    code, _, err = run(capsys, "hf", str(folder), "--out", str(out), "--data-out", str(tmp_path / "d.pt"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
