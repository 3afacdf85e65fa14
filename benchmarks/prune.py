"""Does pruning make models smaller and faster, and what does it cost in accuracy? Measured on digits.

Run: python benchmarks/prune.py [--runs 50]

It prints (and writes to benchmarks/out/prune.md, with the curve as benchmarks/out/prune_curve.png):
1. the residual cnn, structured at channel ratio 0.5 (one-shot; fine-tuned; fine-tuned with the unpruned
   model as teacher; Taylor importance), plus the params/latency targets: parameters, latency, accuracy;
2. the transformer with half its heads and feed-forward width removed (forward shapes unchanged);
3. the mlp at 80% unstructured sparsity, fine-tuned: bytes on disk shrink, latency does not (dense kernels);
4. the cnn's accuracy and latency against the channel ratio 0.1 … 0.9 (each fine-tuned for 2 epochs);
5. Hugging Face decoders (GPT-2, Llama, Qwen2) of about 10M parameters: prune time, size, speed-up.
Latency is the median of `--runs` interleaved runs after warm-up on 2 threads; ratios are side by side.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from keiryo.compress.prune import prune, sparsity
from keiryo.compress.prune_config import Structured, Unstructured
from keiryo.data import example_inputs, load_data
from keiryo.loop import TrainConfig, fit
from keiryo.measuring import compare, file_bytes
from keiryo.metrics import Timing
from keiryo.models import Attention, build_model, kwargs_for_data
from keiryo.report import markdown

OUT = Path(__file__).parent / "out"
FINETUNE = 3  # epochs of fine-tuning after structured pruning


def trained(name: str, splits, epochs: int, **extra) -> torch.nn.Module:
    """A reference model trained from a fixed seed."""
    torch.manual_seed(0)
    model = build_model(name, **{**kwargs_for_data(name, splits.input_shape, splits.num_classes), **extra})
    fit(model, splits, TrainConfig(epochs=epochs, progress=False, device="cpu"))
    return model.eval()


def finetune(epochs: int) -> TrainConfig:
    """Fine-tuning after each pruning step: a few quiet epochs on the CPU at a low learning rate."""
    return TrainConfig(epochs=epochs, lr=1e-3, progress=False, device="cpu")


def check(text: str, ok: bool) -> str:
    return f"- {'met' if ok else 'NOT met'}: {text}"


def cnn_section(base, splits, x, runs: int) -> list[str]:
    variants = {
        "cnn": base,
        "0.5 one-shot": prune(base, 0.5, example_inputs=x),
        f"0.5 + {FINETUNE} ep": prune(base, 0.5, data=splits, finetune=finetune(FINETUNE)),
        f"0.5 + {FINETUNE} ep distilled": prune(
            base, 0.5, data=splits, finetune=finetune(FINETUNE), teacher=base
        ),
        f"0.5 taylor + {FINETUNE} ep": prune(
            base, Structured(0.5, importance="taylor"), data=splits, finetune=finetune(FINETUNE)
        ),
        "params 0.5 + 3 ep": prune(
            base, Structured(0.5, target="params"), data=splits, finetune=finetune(FINETUNE)
        ),
        "latency 0.5 + 3 ep": prune(
            base, Structured(0.5, target="latency"), data=splits, finetune=finetune(FINETUNE)
        ),
    }
    report = compare(variants, x, splits, Timing(runs=runs, threads=2))
    tuned = report.rows[2]
    best = max(report.rows[2:5], key=lambda r: r.accuracy)
    lost = (report.baseline.accuracy - best.accuracy) * 100
    lines = [
        "## 1. cnn (residual + batch-norm), structured pruning at channel ratio 0.5",
        "",
        "`prune(cnn, 0.5, data=splits, finetune=TrainConfig(epochs=3, lr=1e-3))`; 'params'/'latency' rows "
        "use `Structured(0.5, target=...)` "
        "(remove half the parameters / half the measured latency).",
        "",
        markdown(report),
        "",
        check(
            f"≥ 2× fewer parameters: {report.baseline.params / tuned.params:.2f}×",
            report.baseline.params >= 2 * tuned.params,
        ),
        check(
            f"≥ 1.6× lower latency at batch 64: {report.speedup(tuned, 64):.2f}×",
            report.speedup(tuned, 64) >= 1.6,
        ),
        check(
            f"≤ 1 point lost after fine-tuning (best of the fine-tuned 0.5 rows, '{best.name}'): "
            f"{lost:.2f} points",
            lost <= 1.0,
        ),
        "",
    ]
    return lines


def transformer_section(_, splits, x, runs: int) -> list[str]:
    base = trained("transformer", splits, epochs=15)
    pruned = prune(base, 0.5, data=splits, finetune=finetune(FINETUNE))
    report = compare(
        {"transformer": base, f"0.5 + {FINETUNE} ep": pruned}, x, splits, Timing(runs=runs, threads=2)
    )
    before = [(m.num_heads, m.qkv.out_features) for m in base.modules() if isinstance(m, Attention)]
    after = [(m.num_heads, m.qkv.out_features) for m in pruned.modules() if isinstance(m, Attention)]
    ffn = [
        (b.mlp.fc1.out_features, p.mlp.fc1.out_features)
        for b, p in zip(base.blocks, pruned.blocks, strict=True)
    ]
    same = base(x).shape == pruned(x).shape
    return [
        "## 2. transformer: attention heads and feed-forward width",
        "",
        markdown(report),
        "",
        f"- heads per block (heads, qkv outputs): {before} → {after}",
        f"- feed-forward width per block: {[f'{a} → {b}' for a, b in ffn]}; model width (LayerNorm) kept",
        check(f"forward shapes unchanged: {tuple(base(x).shape)} → {tuple(pruned(x).shape)}", same),
        f"- measured speed-up at batch 64: {report.speedup(report.rows[1], 64):.2f}×, "
        f"at batch 1: {report.speedup(report.rows[1], 1):.2f}×",
        "",
    ]


def mlp_section(_, splits, x, runs: int) -> list[str]:
    base = trained("mlp", splits, epochs=15)
    pruned = prune(base, Unstructured(0.8, global_pruning=True, steps=2), data=splits, finetune=finetune(3))
    report = compare({"mlp": base, "80% sparse": pruned}, x, splits, Timing(runs=runs, threads=2))
    lost = (report.baseline.accuracy - report.rows[1].accuracy) * 100
    size = file_bytes(pruned) / file_bytes(base)
    return [
        "## 3. mlp, unstructured 80% sparsity (global magnitude, 2 steps × 3 epochs of fine-tuning)",
        "",
        markdown(report),
        "",
        f"- sparsity of all parameters: {sparsity(pruned):.1%} (classifier and biases are kept dense)",
        check(f"≤ 1 point lost after fine-tuning: {lost:.2f} points", lost <= 1.0),
        check(f"file ≤ 0.35× of dense (values + packed bitmask): {size:.2f}×", size <= 0.35),
        f"- latency is not lower: {report.speedup(report.rows[1], 64):.2f}× at batch 64 — dense kernels "
        "multiply the zeros too; only structured pruning makes a model faster",
        "",
    ]


def curve_section(base, splits, x, runs: int) -> list[str]:
    ratios = [round(0.1 * i, 1) for i in range(1, 10)]
    models = {"cnn": base}
    for r in ratios:
        models[f"{r}"] = prune(base, r, data=splits, finetune=finetune(2))
    report = compare(models, x, splits, Timing(runs=runs, batch_sizes=(64,), threads=2))
    rows = ["| channel ratio | params | accuracy | p50 b64 | speed-up b64 |", "|---|---|---|---|---|"]
    points = []
    for ratio, row in zip([0.0, *ratios], report.rows, strict=True):
        speedup = report.speedup(row, 64)
        points.append((ratio, row.accuracy, speedup))
        rows.append(
            f"| {ratio:.1f} | {row.params:,} | {row.accuracy:.2%} | {row.latency[64].p50_ms:.3f} ms | "
            f"{speedup:.2f}× |"
        )
    _plot(points, OUT / "prune_curve.png")
    return [
        "## 4. cnn: accuracy and latency against the channel ratio (each fine-tuned 2 epochs)",
        "",
        *rows,
        "",
        "![accuracy and speed-up against the pruning ratio](prune_curve.png)",
        "",
    ]


def _plot(points: list[tuple[float, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios, accs, speedups = zip(*points, strict=True)
    fig, left = plt.subplots(figsize=(6, 3.6))
    left.plot(ratios, [a * 100 for a in accs], "o-", color="tab:blue")
    left.set_xlabel("channel pruning ratio")
    left.set_ylabel("test accuracy (%)", color="tab:blue")
    right = left.twinx()
    right.plot(ratios, speedups, "s--", color="tab:red")
    right.set_ylabel("speed-up at batch 64 (×)", color="tab:red")
    left.set_title("cnn on digits: structured pruning, 2 epochs of fine-tuning")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hf_section(_, __, ___, runs: int) -> list[str]:
    """Hugging Face decoders of about 10M parameters, from their configs (random weights, no download)."""
    import transformers

    common = dict(vocab_size=8000, max_position_embeddings=128, tie_word_embeddings=True)
    decoders = {
        "gpt2": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_embd=256, n_layer=8, n_head=8, n_positions=128, vocab_size=8000)
        ),
        "llama": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1024, **common,
            )
        ),
        "qwen2": transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1024, **common,
            )
        ),
    }  # fmt: skip
    ids = torch.randint(0, 8000, (8, 64), generator=torch.Generator().manual_seed(0))
    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = ["| family | params | pruned params | prune time | heads (kv) | speed-up b1 | speed-up b8 |"]
    rows.append("|---|---|---|---|---|---|---|")
    for name, model in decoders.items():
        torch.manual_seed(0)
        model.eval()
        started = time.perf_counter()
        pruned = prune(model, 0.5, example_inputs=tokens)
        seconds = time.perf_counter() - started
        report = compare(
            {name: model, "pruned": pruned}, tokens, timing=Timing(runs=runs, batch_sizes=(1, 8))
        )
        config = pruned.config
        kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
        heads = f"{config.num_attention_heads} ({kv_heads})"
        rows.append(
            f"| {name} | {report.rows[0].params:,} | {report.rows[1].params:,} | {seconds:.1f} s | {heads} | "
            f"{report.speedup(report.rows[1], 1):.2f}× | {report.speedup(report.rows[1], 8):.2f}× |"
        )
    return [
        "## 5. Hugging Face decoders: heads with their key/value groups and feed-forward width, ratio 0.5",
        "",
        "`prune(model, 0.5, example_inputs={'input_ids': ..., 'attention_mask': ...})` on 8-layer models of "
        "about 10M parameters (8 heads, 4 key/value groups for llama/qwen2); model width and tied embeddings "
        "kept; latency on 64 tokens.",
        "",
        *rows,
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model and batch size")
    args = parser.parse_args()
    torch.set_num_threads(2)
    splits = load_data("digits")
    x = example_inputs(splits, 64)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    lines = [
        "# Pruning on digits",
        "",
        "Command: `python benchmarks/prune.py`. Latency: median of interleaved runs after warm-up, "
        f"2 threads, CPU. 1-minute load average at the start: {load:.1f}.",
        "",
    ]
    cnn = trained("cnn", splits, epochs=8)  # sections 1 and 4 prune the same trained cnn
    for section in (cnn_section, transformer_section, mlp_section, curve_section, hf_section):
        part = section(cnn, splits, x, args.runs)
        print("\n".join(part), flush=True)
        lines += part
    lines.append(
        f"_{time.perf_counter() - started:.0f} s in all; load average at the end: {os.getloadavg()[0]:.1f}._"
    )
    text = "\n".join(lines) + "\n"
    print(lines[-1])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prune.md").write_text(text)


if __name__ == "__main__":
    main()
