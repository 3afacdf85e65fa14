"""`keiryo lm compress`, `keiryo lm eval` and `keiryo bench gguf:...` on a tiny Llama written as GGUF here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from test_lm import IDS, _logits, _model, _tokenizer, _write_gguf  # noqa: E402

import keiryo  # noqa: E402
from keiryo.cli import main  # noqa: E402
from keiryo.errors import ConfigError  # noqa: E402
from keiryo.lm import (
    job,  # noqa: E402
    load_causal_lm,  # noqa: E402
)
from keiryo.lm.compress import NAMES, chain_of  # noqa: E402
from keiryo.lm.load import decoder_layers  # noqa: E402
from keiryo.lm.measure import LMTable  # noqa: E402
from keiryo.lm.store import load_lm  # noqa: E402
from keiryo.steps import run_recipe  # noqa: E402

TEXT = (
    " ".join(f"the {w} of the {v}" for w in ("king", "queen", "fool", "duke") for v in ("court", "sea")) * 12
)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama GGUF file (byte-level tokenizer) and a text file."""
    folder = tmp_path_factory.mktemp("lm")
    model = _model("llama")
    _write_gguf(model, folder / "tiny.gguf")
    (folder / "text.txt").write_text(TEXT)
    return folder


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compress_to_gguf_then_eval_side_by_side(source, tmp_path, capsys):
    src = f"gguf:{source / 'tiny.gguf'}"
    code, out, err = run(capsys, "lm", "compress", src, "--method", "int8", "--out", tmp_path / "int8.gguf")
    assert code == 0, err
    assert (
        "int8.gguf" in out
        and (tmp_path / "int8.gguf").stat().st_size < 0.4 * (source / "tiny.gguf").stat().st_size
    )
    float_model, _ = load_causal_lm(src)
    back, _ = load_causal_lm(tmp_path / "int8.gguf")  # transformers reads the Q8_0 tensors keiryo wrote
    cosine = torch.nn.functional.cosine_similarity(
        _logits(back, IDS).flatten(), _logits(float_model, IDS).flatten(), 0
    )
    assert cosine > 0.999
    code, out, err = run(
        capsys, "lm", "compress", src, "--method", "gptq", "--text", source / "text.txt", "--windows", "4",
        "--length", "32", "--out", tmp_path / "gptq.pt",
    )  # fmt: skip
    assert code == 0, err
    model, tokenizer = load_lm(tmp_path / "gptq.pt")  # the keiryo file carries its tokenizer
    assert tokenizer("hi", add_special_tokens=False)["input_ids"] == [104, 105]
    report = tmp_path / "eval.json"
    code, out, err = run(
        capsys, "lm", "eval", src, tmp_path / "int8.gguf", tmp_path / "gptq.pt",
        "--text", source / "text.txt", "--context", "64", "--stride", "32", "--max-tokens", "400",
        "--prompt-tokens", "16", "--new-tokens", "2", "--batch-sizes", "1,2", "--rounds", "1",
        "--json", report,
    )  # fmt: skip
    assert code == 0, err
    assert "perplexity" in out and "context 64, stride 32" in out
    rows = json.loads(report.read_text())["models"]
    assert [r["name"] for r in rows] == ["tiny.gguf", "int8.gguf", "gptq.pt"]
    for row in rows:
        assert row["scored_tokens"] == 399 and row["perplexity"] > 1
        assert row["batch_2"]["decode_tokens_per_s"] > 0 and row["batch_1"]["prefill_ms"] > 0
        assert row["weight_bytes"] > 0 and row["peak_rss_bytes"] > 0
    assert rows[2]["file_bytes"] < 0.3 * rows[0]["file_bytes"]
    # int8 weights change the perplexity of random weights by little
    assert rows[1]["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=0.02)


def test_depth_removes_a_share_of_the_blocks_retrains_their_neighbours_and_saves_a_smaller_gguf(
    source, tmp_path, capsys
):
    src = f"gguf:{source / 'tiny.gguf'}"
    code, out, err = run(
        capsys, "lm", "compress", src, "--method", "depth", "--text", source / "text.txt", "--windows", "8",
        "--length", "32", "--precision", "bf16", "--out", tmp_path / "depth.gguf",
    )  # fmt: skip
    assert code == 0, err
    assert "retraining blocks 0-1 without" in out and "epoch   1/1" in out  # a quarter of 2 blocks: 1
    teacher, _ = load_causal_lm(src)
    back, _ = load_causal_lm(tmp_path / "depth.gguf")
    assert (teacher.config.num_hidden_layers, back.config.num_hidden_layers) == (2, 1)
    assert (tmp_path / "depth.gguf").stat().st_size < 0.8 * (source / "tiny.gguf").stat().st_size
    kept = decoder_layers(back)[0].self_attn.q_proj.weight
    for block in decoder_layers(teacher):  # the kept block was retrained (GGUF f32 round-trips exactly)
        assert not torch.equal(kept, block.self_attn.q_proj.weight)
    assert torch.isfinite(_logits(back, IDS)).all()


def test_width_then_int8_narrows_every_block_retrains_it_and_saves_it(source, tmp_path, capsys):
    src = f"gguf:{source / 'tiny.gguf'}"
    code, out, err = run(
        capsys, "lm", "compress", src, "--method", "width+int8", "--text", source / "text.txt",
        "--windows", "8", "--length", "32", "--precision", "bf16", "--out", tmp_path / "width.pt",
    )  # fmt: skip
    assert code == 0, err
    assert "retraining blocks 0-1: 2 blocks" in out and "width+int8: saved" in out
    teacher, _ = load_causal_lm(src)
    back, _ = load_lm(tmp_path / "width.pt")  # int8 matrices of the narrower blocks
    wide, narrow = teacher.config.intermediate_size, back.config.intermediate_size
    assert (wide, narrow) == (128, 64) and back.config.num_hidden_layers == 2  # 71 kept, moved to 64
    assert type(decoder_layers(back)[0].mlp.down_proj).__name__ == "Int8Linear"
    assert decoder_layers(back)[0].mlp.down_proj.in_features == narrow
    assert torch.isfinite(_logits(back, IDS)).all()


def test_a_run_says_nothing_on_stderr_about_the_libraries_it_imports(source, tmp_path):
    """transformers imports torchao, which on this torch build logs its CUDA-only extensions and its Enums:
    noise for a user, silenced (a fresh process: in this one torchao was imported long ago)."""
    args = [sys.executable, "-m", "keiryo", "lm", "compress", f"gguf:{source / 'tiny.gguf'}", "--method",
            "int8", "--out", str(tmp_path / "q.pt")]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "int8: saved" in proc.stdout and proc.stderr == ""


def test_compress_draws_each_method_s_default_calibration_and_passes_its_options(
    source, tmp_path, monkeypatch
):
    seen = {}

    def record(model, config, calibration, **_):
        seen.setdefault("calls", []).append((type(config).__name__, tuple(calibration.shape)))

    monkeypatch.setattr(job, "compress", record)
    text = source / "text.txt"
    for method, calls in (
        ("depth", [("Structured", (768, 256))]),
        ("gptq", [("WeightQuant", (16, 512))]),
        ("depth+gptq", [("Structured", (768, 256)), ("WeightQuant", (16, 512))]),  # in order, each its own
        ("width", [("Structured", (512, 256))]),
    ):
        seen.clear()
        args = ["lm", "compress", f"gguf:{source / 'tiny.gguf'}", "--method", method, "--text", str(text)]
        assert main([*args, "--out", str(tmp_path / f"{method}.pt")]) == 0
        assert seen["calls"] == calls, method
    ((_, config),) = chain_of("depth", 8.0, "bf16")
    assert config.layers == 8 and isinstance(config.layers, int) and config.reconstruct.precision == "bf16"
    assert NAMES["depth"].layers == 0.25 and NAMES["depth"].reconstruct.precision == "fp32"  # not changed
    assert chain_of("structured", 0.5, "fp32")[0][1].layers == 0.5
    depth, int8 = chain_of("depth+int8", 2.0, "bf16")
    assert depth[1].layers == 2 and depth[1].reconstruct.precision == "bf16" and int8[1] is NAMES["int8"]


@pytest.mark.parametrize(
    ("method", "shape"),
    [
        ("depth+int8", {"num_hidden_layers": 1, "intermediate_size": 128}),
        # the kept width (71 moved to 64) fills whole Q8_0 blocks of 32, so GGUF can take it
        ("width+int8", {"num_hidden_layers": 2, "intermediate_size": 64}),
    ],
)
def test_a_structured_method_then_int8_saves_the_smaller_model_quantized_as_gguf(
    source, tmp_path, capsys, method, shape
):
    src = f"gguf:{source / 'tiny.gguf'}"
    code, out, err = run(
        capsys, "lm", "compress", src, "--method", method, "--text", source / "text.txt",
        "--windows", "8", "--length", "32", "--out", tmp_path / "both.gguf",
    )  # fmt: skip
    assert code == 0, err
    assert "retraining blocks" in out and f"{method}: saved" in out
    back, _ = load_causal_lm(tmp_path / "both.gguf")  # Q8_0 matrices, read back by transformers
    assert {key: getattr(back.config, key) for key in shape} == shape
    assert (tmp_path / "both.gguf").stat().st_size < 0.4 * (source / "tiny.gguf").stat().st_size
    assert torch.isfinite(_logits(back, IDS)).all()


def test_bench_takes_language_models(source, capsys):
    code, out, err = run(
        capsys, "bench", f"gguf:{source / 'tiny.gguf'}", "--data", source / "text.txt", "--batch-sizes", "1",
        "--runs", "1",
    )  # fmt: skip
    assert code == 0, err
    assert "decode tok/s b1" in out and "perplexity on" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lm", "eval", "gguf:MISSING.gguf"], "does not exist"),
        (["lm", "eval", "gguf:CORRUPT"], "GGUF"),
        (["lm", "eval", "NOTALM"], "not a keiryo language model"),
        (["lm", "eval", "hf:NOTDECODER"], "cannot load a causal language model"),
        (["lm", "compress", "gguf:SRC", "--method", "int3", "--out", "OUT.pt"], "int3"),
        (["lm", "compress", "gguf:SRC", "--method", "gptq", "--out", "OUT.pt"], "--text"),
        (["lm", "compress", "hf:GPT2", "--method", "int8", "--out", "OUT.gguf"], "Llama-architecture"),
        (["lm", "compress", "gguf:SRC", "--method", "int8", "--float-type", "f8", "--out", "OUT.gguf"], "f8"),
        (["lm", "eval", "gguf:SRC", "--context", "8", "--stride", "16"], "--stride"),
        ("lm compress gguf:SRC --method int8 --layers 2 --out OUT.pt".split(), "layers is for"),
        ("lm compress gguf:SRC --method int8 --precision bf16 --out OUT.pt".split(), "depth"),
        ("lm compress gguf:SRC --method depth --layers 1.5 --out OUT.pt".split(), "share"),
        ("lm compress gguf:SRC --method depth --layers 2 --text TEXT --out OUT.pt".split(), "at most 1"),
        ("lm compress gguf:SRC --method depth --layers 0 --text TEXT --out OUT.pt".split(), "or ffn > 0"),
        ("lm compress gguf:SRC --method depth --layers nan --out OUT.pt".split(), "share"),
        ("lm compress gguf:SRC --method depth --precision fp16 --out OUT.pt".split(), "precision"),
        ("lm compress gguf:SRC --method int8+depth --out OUT.pt".split(), "can come before"),
        ("lm compress gguf:SRC --method int8+width --out OUT.pt".split(), "can come before"),
        ("lm compress gguf:SRC --method depth+int3 --out OUT.pt".split(), "int3"),
        # structured removes a quarter of the tiny model's 128 neurons: 96 is no multiple of int4's groups
        ("lm compress gguf:SRC --method structured+int4 --layers 0 --text TEXT --out OUT.pt".split(), "64"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_and_keeps_the_output(source, tmp_path, capsys, args, message):
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "notalm.pt")
    (tmp_path / "notdecoder").mkdir()
    (tmp_path / "notdecoder" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    _model("gpt2").save_pretrained(tmp_path / "gpt2")
    _tokenizer(tmp_path / "gpt2")
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    (tmp_path / "out.pt").write_bytes(b"keep me")
    names = {
        "MISSING.gguf": str(tmp_path / "missing.gguf"), "CORRUPT": str(tmp_path / "corrupt.gguf"),
        "NOTALM": str(tmp_path / "notalm.pt"), "NOTDECODER": str(tmp_path / "notdecoder"),
        "SRC": str(source / "tiny.gguf"), "GPT2": str(tmp_path / "gpt2"), "OUT.pt": str(tmp_path / "out.pt"),
        "OUT.gguf": str(out), "TEXT": str(source / "text.txt"),
    }  # fmt: skip
    resolved = []
    for arg in args:
        prefix, _, rest = arg.partition(":") if arg.startswith(("gguf:", "hf:")) else ("", "", arg)
        rest = names.get(rest, rest)
        resolved.append(f"{prefix}:{rest}" if prefix else rest)
    capsys.readouterr()  # what the setup printed (transformers' "Writing model shards" bar)
    code, _, err = run(capsys, *resolved)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert out.read_bytes() == b"keep me" and (tmp_path / "out.pt").read_bytes() == b"keep me"


# --- language-model recipes ---------------------------------------------------------------------------------


def _recipe(folder, steps: str, model: str | None = None) -> str:
    path = folder / "lm.yaml"
    head = f"name: tiny\nmodel: gguf:{model}\n" if model else "name: tiny\n"
    path.write_text(f"{head}data: {folder / 'text.txt'}\nsteps:\n{steps}")
    return str(path)


def test_a_language_model_recipe_compresses_reuses_unchanged_steps_and_reports_every_model(
    source, tmp_path, capsys
):
    (tmp_path / "text.txt").write_text(TEXT)
    steps = (
        "  - lm-compress: {name: q8, method: int8}\n"
        "  - lm-compress: {name: narrow, method: width, windows: 8, length: 32}\n"
        "  - lm-compress: {name: narrow8, from: narrow, method: int8}\n"
    )
    recipe, out = _recipe(tmp_path, steps, source / "tiny.gguf"), tmp_path / "out"
    code, printed, err = run(capsys, "run", recipe, "--out", out)
    assert code == 0, err
    assert "int8: saved" in printed and "width: saved" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    names = [m["name"] for m in metrics["models"]]
    assert names == ["tiny.gguf", "q8.pt", "narrow.pt", "narrow8.pt"]
    assert all(m["perplexity"] > 1 and m["batch_1"]["decode_tokens_per_s"] > 0 for m in metrics["models"])
    assert all(f"| {name} |" in (out / "report.md").read_text() for name in names)
    teacher, _ = load_causal_lm(f"gguf:{source / 'tiny.gguf'}")
    back, _ = load_lm(out / "narrow8.pt")  # `from: narrow`: the width model, then int8
    assert back.config.intermediate_size < teacher.config.intermediate_size
    assert type(decoder_layers(back)[0].mlp.down_proj).__name__ == "Int8Linear"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}
    code, printed, err = run(capsys, "run", recipe, "--out", out)
    assert code == 0, err
    assert printed.count("reused") == 3 and "saved" not in printed
    # a changed step runs again with the steps built on it; the others are reused
    _recipe(tmp_path, steps.replace("windows: 8", "windows: 6"), source / "tiny.gguf")
    code, printed, err = run(capsys, "run", recipe, "--out", out)
    assert code == 0, err
    assert "q8: reused" in printed and "narrow: reused" not in printed and "narrow8: reused" not in printed
    assert (out / "q8.pt").stat().st_mtime_ns == stamps["q8.pt"]
    assert (out / "narrow8.pt").stat().st_mtime_ns != stamps["narrow8.pt"]
    # a kept file that no longer loads is made again, not reported as an error
    (out / "q8.pt").write_bytes(b"not a model")
    code, printed, err = run(capsys, "run", recipe, "--out", out)
    assert code == 0, err
    assert "q8: reused" not in printed and "narrow: reused" in printed
    assert load_lm(out / "q8.pt")[0].config.num_hidden_layers == teacher.config.num_hidden_layers


@pytest.mark.parametrize(
    ("steps", "with_model", "message"),
    [
        ("  - lm-compress: {method: int9}\n", True, "line 5: step 'lm-compress': unknown language-model"),
        ("  - lm-compress: {method: int8+width}\n", True, "can come before"),
        ("  - lm-compress: {method: int8, layers: 2}\n", True, "layers is for"),
        ("  - lm-compress: {method: width, windows: 0}\n", True, "windows must be at least 1"),
        ("  - lm-compress: {method: int8, from: nope}\n", True, "'nope' is not an earlier step"),
        ("  - lm-compress: {windows: 8}\n", True, "needs a method"),
        ("  - lm-compress: {method: int8, epochs: 2}\n", True, "unknown field 'epochs'"),
        ("  - train: {epochs: 1}\n", True, "line 5: a language-model recipe's steps are lm-compress"),
        ("  - lm-compress: {method: int8}\n", False, "line 4: step 'lm-compress' needs the recipe's model"),
    ],
)
def test_a_bad_language_model_recipe_is_one_line_naming_its_line(
    source, tmp_path, capsys, steps, with_model, message
):
    (tmp_path / "text.txt").write_text(TEXT)
    recipe = _recipe(tmp_path, steps, source / "tiny.gguf" if with_model else None)
    code, printed, err = run(capsys, "run", recipe, "--out", tmp_path / "out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_keiryo_run_takes_a_language_model_recipe_and_returns_its_table(source, tmp_path, capsys):
    (tmp_path / "text.txt").write_text(TEXT)
    steps = (
        "  - lm-compress: {name: q8, method: int8}\n  - lm-compress: {name: q4, method: int4}\n"
        "  - lm-compress: {name: w, method: width, windows: 4, length: 32}\n"
    )
    recipe = _recipe(tmp_path, steps, source / "tiny.gguf")
    table = keiryo.run(recipe, tmp_path / "out", progress=False)
    assert isinstance(table, LMTable) and list(table.rows) == ["tiny.gguf", "q8.pt", "q4.pt", "w.pt"]
    base, q8, q4, _ = (table.rows[name] for name in table.rows)
    assert q4["weight_bytes"] < q8["weight_bytes"] < base["weight_bytes"]  # what the methods did, measured
    assert 1 < base["perplexity"].perplexity <= q8["perplexity"].perplexity * 1.05
    assert capsys.readouterr().out == ""  # progress=False: nothing printed
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["models"][2]["name"] == "q4.pt"
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.pt")}
    keiryo.run(recipe, tmp_path / "out", progress=False)  # unchanged steps are reused
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.pt")}
    with pytest.raises(ConfigError, match="keiryo run"):  # the vision runner's tuple is not for LM recipes
        run_recipe(recipe, tmp_path / "out")
