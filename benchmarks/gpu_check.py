"""Each training strategy and precision, briefly, on CUDA: throughput and agreement with a CPU-trained model.

Run: python benchmarks/gpu_check.py [--epochs 2]

The reference cnn trains on digits for `--epochs` epochs on the CPU in fp32 (single process): that is the
reference. Then every (strategy, precision) trains the same seeded model on the GPU(s): single, ddp and fsdp
(over min(2, GPUs) workers) and pipeline (2 GPUs) in fp32, bf16 and fp16 (a grad scaler for fp16). Each row
gives samples/s (training split over the last epoch's time), test accuracy, and the top-1 agreement and max
output difference against the CPU reference on the test split, all evaluated on the CPU. Under 3 minutes on a
CUDA machine. Without CUDA it runs the CPU rows (single fp32/bf16, ddp over 2 CPU workers) and lists every
CUDA row as skipped, so the script itself is checked here.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from keiryo.data import load_data, tensors_of
from keiryo.errors import KeiryoError
from keiryo.loop import TrainConfig
from keiryo.metrics import accuracy, agreement
from keiryo.models import build_model, kwargs_for_data
from keiryo.parallel.config import strategy_of
from keiryo.training import train

STRATEGIES = ("single", "ddp", "fsdp", "pipeline")
PRECISIONS = ("fp32", "bf16", "fp16")


def fresh_model(splits):
    torch.manual_seed(0)
    return build_model("cnn", **kwargs_for_data("cnn", splits.input_shape, splits.num_classes))


def run(splits, epochs: int, device: str, strategy: str, workers: int, precision: str) -> dict:
    """Train one configuration; measure it on the CPU."""
    config = TrainConfig(epochs=epochs, batch_size=64, progress=False, device=device, precision=precision)
    chosen = strategy_of(strategy, workers)
    if strategy != "single":
        chosen = dataclasses.replace(chosen, timeout=60.0)
    started = time.perf_counter()
    result = train(fresh_model(splits), splits, chosen, config)
    model = result.model.cpu().float().eval()
    return {
        "model": model,
        "samples_s": len(splits.train) / result.history[-1].seconds,
        "accuracy": accuracy(model, splits.test),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    splits = load_data("digits")
    test_inputs, _ = tensors_of(splits.test)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    started = time.perf_counter()
    reference = run(splits, args.epochs, "cpu", "single", 1, "fp32")

    plan = []  # (device, strategy, workers, precision, reason to skip or None)
    for strategy in STRATEGIES:
        for precision in PRECISIONS:
            workers = 1 if strategy == "single" else (2 if strategy == "pipeline" else min(2, max(gpus, 1)))
            reason = None
            if gpus == 0:
                reason = "no CUDA here"
            elif workers > gpus:
                reason = f"needs {workers} GPUs, found {gpus}"
            elif strategy == "pipeline" and precision == "fp16":
                reason = "refused: the pipeline schedules have no loss scaling (use bf16)"
            plan.append(("cuda", strategy, workers, precision, reason))
    if gpus == 0:  # what runs here: the CPU path of the same code
        plan = [("cpu", "single", 1, "bf16", None), ("cpu", "ddp", 2, "fp32", None)] + plan

    header = "| device | strategy | workers | precision | samples/s | test acc | top-1 vs CPU | max |Δ| | s |"
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    ref_row = (
        f"| cpu (reference) | single | 1 | fp32 | {reference['samples_s']:,.0f} | {reference['accuracy']:.2%}"
    )
    lines.append(ref_row + f" | 100.00% | 0 | {reference['seconds']:.0f} |")
    print("\n".join(lines), flush=True)
    for device, strategy, workers, precision, reason in plan:
        if reason is None:
            try:
                got = run(splits, args.epochs, device, strategy, workers, precision)
            except KeiryoError as exc:
                reason = f"failed: {exc}"
        if reason is not None:
            line = f"| {device} | {strategy} | {workers} | {precision} | skipped: {reason} | | | | |"
        else:
            agree = agreement(got["model"], reference["model"], test_inputs)
            line = (
                f"| {device} | {strategy} | {workers} | {precision} | {got['samples_s']:,.0f} | "
                f"{got['accuracy']:.2%} | {agree.top1:.2%} | {agree.max_error:.3g} | {got['seconds']:.0f} |"
            )
        lines.append(line)
        print(line, flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f}s; CUDA devices: {gpus}")
    if gpus == 0:
        print("CUDA-only rows were skipped: there is no CUDA device on this machine.")


if __name__ == "__main__":
    main()
