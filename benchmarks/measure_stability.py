"""How much can a keiryo latency figure be trusted? Repeat `compare` on the same models and report the spread.

Run: python benchmarks/measure_stability.py [--repeats 10] [--runs 50]

It prints (and writes to benchmarks/out/measure_stability.md):
- the spread (min, median, max, coefficient of variation) of p50 latency over repeated `compare` calls, for
  each model alone and for their ratio: ratios from interleaved timing should vary less than raw latencies;
- the wall time of one `compare` call (the cost of measuring) and the timer's floor (an identity module).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from keiryo.data import example_inputs, load_data
from keiryo.measuring import compare
from keiryo.metrics import Timing, time_models
from keiryo.models import build_model, kwargs_for_data

OUT = Path(__file__).parent / "out" / "measure_stability.md"


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max and the coefficient of variation (std / mean) of a list."""
    mean = statistics.fmean(values)
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "cv": statistics.pstdev(values) / mean if mean else float("nan"),
    }


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--repeats", type=int, default=10, help="compare() calls")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per compare() call and batch size")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    splits = load_data("digits")
    shape = (splits.input_shape, splits.num_classes)
    models = {name: build_model(name, **kwargs_for_data(name, *shape)).eval() for name in ("cnn", "mlp")}
    x = example_inputs(splits, 64)

    samples: dict[str, list[float]] = {f"{n} p50 b{b} (ms)": [] for b in (1, 64) for n in models}
    samples.update({f"cnn/mlp ratio b{b}": [] for b in (1, 64)})
    walls = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        rep = compare(models, x, timing=Timing(runs=args.runs, warmup=10, batch_sizes=(1, 64), threads=2))
        walls.append(time.perf_counter() - start)
        cnn, mlp = rep.rows
        for b in (1, 64):
            samples[f"cnn p50 b{b} (ms)"].append(cnn.latency[b].p50_ms)
            samples[f"mlp p50 b{b} (ms)"].append(mlp.latency[b].p50_ms)
            samples[f"cnn/mlp ratio b{b}"].append(cnn.latency[b].p50_ms / mlp.latency[b].p50_ms)

    floor = time_models({"identity": nn.Identity()}, x, runs=1000, warmup=50)["identity"].p50_ms * 1000

    lines = [
        f"Repeated `compare` on cnn and mlp (digits, 2 threads): {args.repeats} calls × {args.runs} runs.",
        "",
        "| figure | min | median | max | CV |",
        "|---|---|---|---|---|",
    ]
    for name, values in samples.items():
        s = spread(values)
        lines.append(f"| {name} | {s['min']:.3f} | {s['median']:.3f} | {s['max']:.3f} | {s['cv']:.1%} |")
    w = spread(walls)
    lines += [
        "",
        f"One `compare` call (2 models; params, bytes, FLOPs, latency at b1 and b64): {w['median']:.2f} s.",
        f"Timer floor (identity module, p50): {floor:.2f} µs.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)


if __name__ == "__main__":
    main()
