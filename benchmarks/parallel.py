"""Samples/s of keiryo's parallel strategies on this machine, and keiryo's ddp against plain PyTorch DDP.

Run: python benchmarks/parallel.py [--epochs 4] [--rounds 3]

The reference cnn (width 64) trains on digits, batch 64, AdamW, one validation pass per epoch. Throughput is
the training split's samples over the median epoch time (the first epoch is warm-up and left out; an epoch
includes its validation pass, the same in every run). 1 worker uses the 2 threads; 2 workers 1 thread each.

The overhead check runs keiryo's ddp and a plain PyTorch DDP script (DistributedSampler, DDP, the same model,
optimizer, schedule, batches per worker and validation pass) alternately, `--rounds` times each, and compares
their median epoch times. Printed, and written to benchmarks/out/parallel.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

from keiryo.data import load_data
from keiryo.loop import TrainConfig
from keiryo.models import build_model, kwargs_for_data
from keiryo.parallel.launch import free_port
from keiryo.training import train

OUT = Path(__file__).parent / "out"
THREADS = 2
BATCH = 64
RUNS = [("single", 1), ("ddp", 1), ("ddp", 2), ("fsdp", 2), ("pipeline", 2)]


def model_for(splits):
    torch.manual_seed(0)
    return build_model("cnn", **kwargs_for_data("cnn", splits.input_shape, splits.num_classes))


def keiryo_epochs(strategy: str, workers: int, epochs: int) -> list[float]:
    """Seconds per epoch of one keiryo run."""
    splits = load_data("digits")
    config = TrainConfig(epochs=epochs, batch_size=BATCH, patience=None, progress=False, device="cpu")
    return [h.seconds for h in train(model_for(splits), splits, strategy, config, workers=workers).history]


def plain_ddp_worker(rank: int, world: int, port: int, epochs: int, out: str) -> None:
    """Plain PyTorch DDP doing keiryo's work: per-worker shards of each batch, AdamW + cosine, a val pass."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(THREADS // world)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    splits = load_data("digits")
    model = model_for(splits)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(splits.train, batch_size=BATCH // world, sampler=sampler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(loader) * epochs)
    val = DataLoader(Subset(splits.val, range(rank, len(splits.val), world)), batch_size=256)
    times = []
    for epoch in range(epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        model.train()
        for inputs, targets in loader:
            loss = F.cross_entropy(ddp(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        with torch.inference_mode():
            for inputs, targets in val:
                outputs = model(inputs)
                totals += torch.tensor(
                    [
                        float(F.cross_entropy(outputs, targets, reduction="sum")),
                        float((outputs.argmax(-1) == targets).sum()),
                        len(targets),
                    ],
                    dtype=torch.float64,
                )
        dist.all_reduce(totals)
        times.append(time.perf_counter() - started)
    if rank == 0:
        Path(out).write_text(" ".join(map(str, times)))
    dist.destroy_process_group()


def plain_ddp_epochs(workers: int, epochs: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.txt")
        mp.spawn(plain_ddp_worker, args=(workers, free_port(), epochs, out), nprocs=workers)
        return [float(t) for t in Path(out).read_text().split()]


def load() -> str:
    return (
        subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating keiryo/plain DDP runs each")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    n_train = len(load_data("digits").train)
    load_before = load()

    rows, base = [], None
    for strategy, workers in RUNS:
        epoch_s = statistics.median(keiryo_epochs(strategy, workers, args.epochs)[1:])
        rate = n_train / epoch_s
        base = base or rate
        rows.append(f"| {strategy} | {workers} | {epoch_s:.3f} | {rate:,.0f} | {rate / base:.2f}× |")
        print(rows[-1], flush=True)

    keiryo_s, plain_s, ratios = [], [], []
    for i in range(args.rounds):  # alternating, and in ABBA order, so a change of load hits both alike
        if i % 2 == 0:
            k_round = keiryo_epochs("ddp", 2, args.epochs)[1:]
            p_round = plain_ddp_epochs(2, args.epochs)[1:]
        else:
            p_round = plain_ddp_epochs(2, args.epochs)[1:]
            k_round = keiryo_epochs("ddp", 2, args.epochs)[1:]
        keiryo_s, plain_s = keiryo_s + k_round, plain_s + p_round
        ratios.append(statistics.median(k_round) / statistics.median(p_round))
        print(
            f"round: keiryo {statistics.median(k_round):.3f}s plain {statistics.median(p_round):.3f}s",
            flush=True,
        )
    k, p = statistics.median(keiryo_s), statistics.median(plain_s)
    overhead = statistics.median(ratios) - 1

    text = "\n".join(
        [
            "# Parallel training on this machine",
            "",
            f"cnn (width 64) on digits ({n_train} training samples), batch {BATCH}, {args.epochs} epochs "
            f"per run, median epoch after the first; {THREADS} threads shared by the workers.",
            f"Load average before: {load_before}; after: {load()}.",
            "",
            "| strategy | workers | epoch (s) | samples/s | vs single |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"## keiryo ddp against plain PyTorch DDP (2 workers, {args.rounds} interleaved rounds)",
            "",
            "| | median epoch (s) | epochs timed |",
            "|---|---|---|",
            f"| keiryo train --strategy ddp | {k:.3f} | {len(keiryo_s)} |",
            f"| plain DDP script | {p:.3f} | {len(plain_s)} |",
            "",
            f"Per-round ratios keiryo/plain: {', '.join(f'{r:.3f}' for r in ratios)}.",
            f"keiryo's overhead (median of the per-round ratios): {overhead:+.1%} (target ≤ +5%).",
            "",
        ]
    )
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "parallel.md").write_text(text)


if __name__ == "__main__":
    main()
