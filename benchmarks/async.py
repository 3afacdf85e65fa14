"""Asynchronous vs synchronous data parallel with one slow worker, on the Ray parameter server.

Run: python benchmarks/async.py [--target 0.93] [--time-limit 90]

4 workers train an mlp on digits; worker 3 is 4× slower per iteration. Each mode (sync barrier, pure async,
bounded staleness S=4, DC-ASGD) runs until the validation accuracy reaches the target. Printed, and written to
benchmarks/out/async.md with the plot benchmarks/out/async.png (validation accuracy against wall time):
time to target, updates/s, staleness, final test accuracy, and the ratios of async to sync.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from keiryo.data import load_data
from keiryo.loop import TrainConfig
from keiryo.metrics import accuracy
from keiryo.models import build_model
from keiryo.parallel.async_ps import train_async
from keiryo.parallel.config import Async
from keiryo.parallel.ray_setup import ray_init

OUT = Path(__file__).parent / "out"
MODES = {"sync": {}, "async": {}, "bounded": {"staleness_bound": 4}, "dcasgd": {}}


def time_to(timeline: list[dict], target: float) -> float | None:
    """First wall time at which validation accuracy reached the target."""
    return next((t["seconds"] for t in timeline if (t["val_accuracy"] or 0) >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=float, default=0.93, help="validation accuracy to reach")
    parser.add_argument("--time-limit", type=float, default=90.0, help="seconds per mode at most")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (on the server)")
    args = parser.parse_args()
    import ray

    ray_init(None)  # a local Ray of this run's own, on 127.0.0.1, quiet
    splits = load_data("digits")
    training = TrainConfig(batch_size=32, lr=args.lr, schedule="constant", patience=None, progress=False)
    results = {}
    for mode, extra in MODES.items():
        torch.manual_seed(0)
        model = build_model("mlp", in_features=64, hidden=[64], num_classes=10)
        strategy = Async(
            workers=4,
            mode=mode,
            slowdown=[1.0, 1.0, 1.0, 4.0],
            max_updates=100_000,
            target_accuracy=args.target,
            time_limit=args.time_limit,
            eval_every=0.25,
            **extra,
        )
        result = train_async(model, splits, strategy, training)
        seconds = result.timeline[-1]["seconds"]
        results[mode] = {
            "to_target": time_to(result.timeline, args.target),
            "updates_per_s": result.stats["version"] / seconds,
            "gradients_per_s": sum(result.stats["pushes"].values()) / seconds,
            "staleness": (result.stats["staleness_mean"], result.stats["staleness_max"]),
            "test_accuracy": accuracy(result.model, splits.test),
            "pushes": result.stats["pushes"],
            "timeline": result.timeline,
        }
        r = results[mode]
        print(f"{mode}: {r['to_target']} s to target, {r['updates_per_s']:.0f} updates/s")
    ray.shutdown()

    lines = [
        f"4 workers (worker 3 is 4× slower), mlp on digits, AdamW lr {args.lr} (constant) on the server, "
        "batch 32 per gradient; "
        f"target: validation accuracy ≥ {args.target:.0%}.",
        "",
        "| mode | time to target (s) | updates/s | gradients/s | staleness mean / max | test accuracy "
        "| pushes per worker |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        t = f"{r['to_target']:.1f}" if r["to_target"] is not None else "not reached"
        pushes = " / ".join(str(r["pushes"].get(w, 0)) for w in range(4))
        lines.append(
            f"| {mode} | {t} | {r['updates_per_s']:.0f} | {r['gradients_per_s']:.0f} | "
            f"{r['staleness'][0]:.1f} / {r['staleness'][1]} | {r['test_accuracy']:.2%} | {pushes} |"
        )
    sync, asyn = results["sync"], results["async"]
    if sync["to_target"] and asyn["to_target"]:
        lines += [
            "",
            f"async / sync wall time to target: **{asyn['to_target'] / sync['to_target']:.2f}×**; "
            f"async / sync updates/s: **{asyn['updates_per_s'] / sync['updates_per_s']:.2f}×**.",
        ]
    lines += ["", "![validation accuracy against wall time](out/async.png)"]
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "async.md").write_text(text)
    _plot(results, args.target, OUT / "async.png")


def _plot(results: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, r in results.items():
        xs = [t["seconds"] for t in r["timeline"]]
        ys = [t["val_accuracy"] for t in r["timeline"]]
        ax.plot(xs, ys, label=mode, marker=".", markersize=3)
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"target {target:.0%}")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("4 workers, one 4× slower: sync barrier vs asynchronous parameter server")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
