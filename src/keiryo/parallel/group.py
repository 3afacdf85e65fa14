"""The process group of a parallel run: join it from the environment, leave it, and tell a torchrun job.

Local workers meet through a file in the run's own temp folder (`KEIRYO_STORE`), so no TCP store listens on
any interface; a torchrun job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) meets the usual env:// way.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

STORE_ENV = "KEIRYO_STORE"  # the rendezvous file of a local run


def under_torchrun() -> bool:
    """True when this process is one worker of a job started by torchrun (or any env:// launcher)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_worker(device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group from the environment (gloo on CPU, NCCL on CUDA); return this worker's device.

    On CUDA each worker takes the GPU numbered by its LOCAL_RANK, so one node can hold several workers.
    """
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    store_path = os.environ.get(STORE_ENV)
    if store_path:  # a local run: meet through a file, so that no TCP store listens anywhere
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.FileStore(store_path, world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return device


def teardown() -> None:
    """Leave the process group (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
