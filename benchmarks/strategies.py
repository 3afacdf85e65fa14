"""Are keiryo's strategies interchangeable? The same model, data and epochs under every strategy.

Run: nice -n 10 python benchmarks/strategies.py [--workers 2] [--wine-epochs 30] [--digits-epochs 10]

For scikit-learn's wine (standardized; 30% held out for the test) and digits, an mlp trains with one
`TrainConfig` (AdamW, lr 3e-3, cosine, batch 32, the same epochs, no early stopping) under `single`, `ddp`,
`fsdp`, `pipeline` and every async mode of the parameter server, through `keiryo.train`. Test accuracy,
its difference to `single` (issue 14 asks for at most 2 points), the history's epoch lines and the wall time
of the whole call (worker start-up included; async shares one local Ray started beforehand) are printed and
written to benchmarks/out/strategies.md, headed by the CPU model and the command line.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from keiryo.data import DataSplits, load_data, split_tensors
from keiryo.loop import TrainConfig
from keiryo.metrics import accuracy
from keiryo.models import build_model
from keiryo.parallel.config import ASYNC_MODES, DDP, FSDP, Async, Pipeline, Single
from keiryo.parallel.ray_setup import ray_init
from keiryo.training import train

OUT = Path(__file__).parent / "out"


def wine() -> DataSplits:
    """scikit-learn's wine, standardized: 178 samples, 13 features, 3 classes."""
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    inputs = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    train_set, val, test = split_tensors(inputs, torch.tensor(y), seed=0, val_fraction=0.2, test_fraction=0.3)
    return DataSplits(train_set, val, test, num_classes=3, input_shape=(13,), name="wine")


def model_for(splits: DataSplits) -> torch.nn.Module:
    torch.manual_seed(0)
    features = int(torch.tensor(splits.input_shape).prod())
    return build_model("mlp", in_features=features, hidden=[64], num_classes=splits.num_classes)


def strategies(workers: int) -> list:
    return [
        Single(),
        DDP(workers=workers),
        FSDP(workers=workers),
        Pipeline(workers=workers),
        *(Async(workers=workers, mode=mode) for mode in ASYNC_MODES),
    ]


def name_of(strategy) -> str:
    return f"async ({strategy.mode})" if isinstance(strategy, Async) else strategy.kind


def run_one(splits: DataSplits, strategy, epochs: int) -> dict:
    config = TrainConfig(epochs=epochs, batch_size=32, patience=None, progress=False, device="cpu")
    started = time.perf_counter()
    result = train(model_for(splits), splits, strategy, config)
    seconds = time.perf_counter() - started
    return {"accuracy": accuracy(result.model, splits.test), "seconds": seconds, "lines": len(result.history)}


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--wine-epochs", type=int, default=30)
    parser.add_argument("--digits-epochs", type=int, default=10)
    args = parser.parse_args()
    command = shlex.join(["python", *sys.argv])
    lines = [
        "# Strategies side by side: same model, data and epochs",
        "",
        f"CPU: {cpu_model()} ({torch.get_num_threads()} threads). Command: `{command}`",
        "",
        f"mlp (one hidden layer of 64), AdamW lr 3e-3 with a cosine schedule, batch 32, no early stopping, "
        f"{args.workers} workers; wall time is the whole `keiryo.train` call, worker start-up included.",
    ]
    started_ray = ray_init(None)
    try:
        for data, splits, epochs in (
            ("wine", wine(), args.wine_epochs),
            ("digits", load_data("digits", seed=0), args.digits_epochs),
        ):
            lines += [
                "",
                f"## {data}: {len(splits.train)} train / {len(splits.test)} test samples, {epochs} epochs",
                "",
                "| strategy | test accuracy | vs single (points) | history lines | wall time (s) |",
                "|---|---|---|---|---|",
            ]
            reference = None
            for strategy in strategies(args.workers):
                found = run_one(splits, strategy, epochs)
                reference = found["accuracy"] if reference is None else reference
                delta = 100 * (found["accuracy"] - reference)
                lines.append(
                    f"| {name_of(strategy)} | {found['accuracy']:.2%} | {delta:+.1f} | {found['lines']} | "
                    f"{found['seconds']:.1f} |"
                )
                print(lines[-1], flush=True)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "strategies.md").write_text(text)


if __name__ == "__main__":
    main()
