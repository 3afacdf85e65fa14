"""The process group of a parallel run: join it from the environment, leave it, and tell a torchrun job.

Local workers meet through a file in the run's own temp folder (`KEIRYO_STORE`), so no TCP store listens on
any interface; a torchrun job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) meets at its agent's store,
under keys of its own restart attempt; another env:// launcher meets the usual way.
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
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store_path = os.environ.get(STORE_ENV)
    if store_path:  # a local run: meet through a file, so that no TCP store listens anywhere
        store = dist.FileStore(store_path, world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.PrefixStore(_attempt_prefix(), _agent_store(world, timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return device


def _agent_store(world: int, timeout: timedelta) -> dist.Store:
    """A client of the TCP store torchrun's agent hosts at MASTER_ADDR:MASTER_PORT."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return dist.TCPStore(host, port, world, is_master=False, timeout=timeout)


def _attempt_prefix() -> str:
    """The agent's store outlives the workers it restarts, and PyTorch no longer keys it by attempt
    (pytorch/pytorch#135712): restarted workers read the dead ones' gloo/NCCL addresses and fail to connect.
    Each attempt gets its own keys. The restart count agrees on one node; across nodes it agrees when every
    agent restarted after the failure (if not, run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    return f"keiryo/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def teardown() -> None:
    """Leave the process group (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
