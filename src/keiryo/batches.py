"""Which samples each worker trains on, batch by batch, and how a batch reaches the device.

An epoch's order depends only on (seed, epoch), so a resumed run sees the same batches; data parallel workers
each take a contiguous share of every batch, so together they see exactly the batches one worker would.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from keiryo import devices
from keiryo.data import make_loader
from keiryo.errors import DataError
from keiryo.inputs import Example, map_tensors, split_batch


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, min_batch: int = 1) -> list[list[int]]:
    """The epoch's batches of sample indices in `make_loader`'s seeded order (the same on every worker); a
    last batch smaller than `min_batch` is left out (so that every worker gets samples)."""
    order = torch.tensor(list(make_loader(range(n), 1, shuffle=True, seed=seed, epoch=epoch).sampler))
    batches = [b.tolist() for b in order.split(batch_size)]
    return [b for b in batches if len(b) >= min_batch]


def worker_loader(
    dataset: Dataset, batches: list[list[int]], rank: int, world_size: int, device: torch.device
) -> DataLoader:
    """A loader over `batches`, of which this worker takes its share (`world_size` 1: every sample).

    Pinned memory lets CUDA copies overlap with compute.
    """
    if world_size > 1:
        batches = [torch.tensor(b).tensor_split(world_size)[rank].tolist() for b in batches]
    return DataLoader(dataset, batch_sampler=batches, num_workers=0, pin_memory=device.type == "cuda")


def on_device(batch: object, device: torch.device) -> tuple[Example, Tensor]:
    """A loader batch as (inputs, targets) on `device`: `(x, y)` pairs or dicts with a `labels` key."""
    inputs, targets = split_batch(batch)
    if targets is None:
        raise DataError("training data needs targets: (inputs, targets) samples or dicts with a 'labels' key")
    return map_tensors(inputs, lambda t: devices.move_batch(t, device)), devices.move_batch(targets, device)


def reduce_device(device: torch.device) -> torch.device:
    """Where sums over workers run: NCCL sums CUDA tensors, gloo CPU ones."""
    return device if device.type == "cuda" else torch.device("cpu")
