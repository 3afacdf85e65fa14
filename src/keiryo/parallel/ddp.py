"""Synchronous data parallel: DDP (every worker holds the whole model) and FSDP2 (parameters, gradients and
optimizer state sharded over the workers).

Each function wraps any `nn.Module` after the process group is up and returns the `Worker` that tells
`keiryo.loop.fit` how to run: every worker takes its share of each batch, and the gradients are averaged over
all workers in backward (DDP all-reduces them, FSDP reduce-scatters them into each worker's shard).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from keiryo.devices import maybe_compile
from keiryo.loop import Worker


def apply_ddp(model: nn.Module, device: torch.device, compile: bool = False) -> Worker:
    """Replicate `model` on this worker's device and all-reduce its gradients in backward.

    The model stays what the loop optimizes, evaluates and checkpoints (plain parameter names); the DDP
    wrapper is only the training forward. Buffers (batch-norm statistics) come from rank 0 at each forward.
    """
    model.to(device)
    wrapped = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    return Worker(
        rank=rank,
        world_size=world,
        forward=maybe_compile(wrapped, compile),
        shard_data=True,
        shard_eval=True,
        min_batch=world,
    )


def apply_fsdp(model: nn.Module, device: torch.device, compile: bool = False) -> Worker:
    """Shard `model` in place with FSDP2 `fully_shard`: each top-level child with parameters, then the root.

    Order matters: children first, so each child's parameters are gathered just before it runs and freed
    after; the root call takes the rest (e.g. a bare classifier). Checkpoints are gathered to full tensors
    on rank 0, so they hold the same parameter names as a single-process run.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return Worker(
        rank=dist.get_rank(),
        world_size=world,
        forward=maybe_compile(model, compile),
        shard_data=True,
        shard_eval=False,  # every forward gathers parameters from all workers, so all run every batch
        min_batch=world,
        state_dicts=full_state_dicts,
        load_state_dicts=load_full_state_dicts,
    )


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The sharded model's and optimizer's full (unsharded) state on CPU; every worker must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def load_full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict
):
    """Load full state (from a checkpoint every worker read) into the sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_state_dict(
        model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options
    )


def full_model_state(model: nn.Module) -> dict:
    """The full model state on CPU, on every worker (gathered from the shards when the model is sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in state.items()}


def worker_memory(model: nn.Module, optimizer_name: str) -> dict:
    """Bytes this worker holds for parameters, gradients and optimizer state (its shards under FSDP).

    AdamW keeps two tensors per parameter (exp_avg, exp_avg_sq), SGD with momentum one; on CUDA the peak
    allocated memory is added.
    """
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(local(p).numel() * local(p).element_size() for p in params)
    grad_bytes = sum(
        local(p.grad).numel() * local(p.grad).element_size() for p in params if p.grad is not None
    )
    per_param = 2 if optimizer_name == "adamw" else 1
    memory = {"params": param_bytes, "grads": grad_bytes, "optimizer": per_param * param_bytes}
    device = next(model.parameters()).device
    if device.type == "cuda":
        memory["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    return memory
