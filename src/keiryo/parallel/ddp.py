"""Synchronous data parallel: DDP (every worker holds the whole model) and FSDP2 (parameters, gradients and
optimizer state sharded over the workers).

Each function wraps any `nn.Module` after the process group is up and returns the `Worker` that tells
`keiryo.loop.fit` how to run: every worker takes its share of each batch, and the gradients are averaged over
all workers in backward (DDP all-reduces them, FSDP reduce-scatters them into each worker's shard).
DDP's gradients can be compressed for the all-reduce with the communication hooks PyTorch ships (fp16/bf16
casts, PowerSGD), and every bucket's all-reduce is counted in bytes (`GradTraffic`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from keiryo.devices import maybe_compile
from keiryo.loop import Worker
from keiryo.parallel.config import grad_compression_of

POWERSGD_START = 10  # plain all-reduce steps before PowerSGD starts (PyTorch: compressing from the very
# first steps can steer training onto a worse path; it suggests ~10% of the run, 10 suits short runs)


@dataclass
class GradTraffic:
    """The gradient bytes this worker hands to all-reduce, counted bucket by bucket by its DDP hook.

    `sent`: bytes of the tensors the hook all-reduces (the fp16/bf16 copies; PowerSGD's P and Q factors plus
    the vectors it leaves uncompressed); `dense`: bytes a plain fp32 all-reduce of the same buckets would
    take. A ring all-reduce moves 2(N-1)/N of these over each worker's link. `last_*`: the last whole step
    (PowerSGD's steady state after its plain warm-up steps).
    """

    compression: str | None = None
    steps: int = 0
    sent: int = 0
    dense: int = 0
    last_sent: int = 0
    last_dense: int = 0
    _step_sent: int = 0
    _step_dense: int = 0

    def add(self, sent: int, dense: int, last_bucket: bool) -> None:
        """Count one bucket's all-reduce; the step ends with its last bucket."""
        self._step_sent += sent
        self._step_dense += dense
        if last_bucket:
            self.steps += 1
            self.sent += self._step_sent
            self.dense += self._step_dense
            self.last_sent, self.last_dense = self._step_sent, self._step_dense
            self._step_sent = self._step_dense = 0

    def summary(self) -> dict:
        """Plain numbers for a result or a log line: steps, bytes per step (mean and last), dense bytes."""
        steps = max(self.steps, 1)
        return {
            "compression": self.compression,
            "steps": self.steps,
            "bytes_per_step": self.sent // steps,
            "last_step_bytes": self.last_sent,
            "dense_bytes_per_step": self.dense // steps,
        }


def register_compression(
    wrapped: nn.parallel.DistributedDataParallel,
    compression: str | None,
    traffic: GradTraffic,
    powersgd_start: int = POWERSGD_START,
) -> None:
    """Register the communication hook for `compression` (None: plain all-reduce) on a DDP model, wrapped so
    that it counts each bucket's bytes into `traffic`.

    None uses PyTorch's `allreduce_hook` (what DDP does without a hook, in Python) so that plain and
    compressed runs are counted the same way. fp16/bf16 all-reduce a cast copy (2 bytes per element) and
    cast back; PowerSGD all-reduces its factors (its own count of elements after compression) once past
    its `powersgd_start` plain warm-up steps (at least 2: its error feedback needs them).

    On gloo, PowerSGD's chained all-reduces (each issued from a callback when the one before finishes)
    start in a different order on different workers once a model has two buckets, and gloo aborts on the
    mismatch (PyTorch tests this hook on NCCL only); so on gloo each bucket's chain is waited for before the
    backward goes on, and PowerSGD's communication does not overlap the backward there.
    """
    spec = grad_compression_of(compression)
    traffic.compression = compression
    kind, rank = spec if spec else (None, 0)
    if kind != "powersgd":
        hooks: dict[str | None, Callable] = {
            None: default_hooks.allreduce_hook,
            "fp16": default_hooks.fp16_compress_hook,
            "bf16": default_hooks.bf16_compress_hook,
        }
        hook, element = hooks[kind], (2 if kind else None)

        # unannotated: DDP compares a hook's annotations with the real types, and here they are strings
        def counted(state, bucket):  # type: ignore[no-untyped-def]
            buffer = bucket.buffer()
            dense = buffer.numel() * buffer.element_size()
            traffic.add(buffer.numel() * element if element else dense, dense, bucket.is_last())
            return hook(state, bucket)

        wrapped.register_comm_hook(None, counted)
        return
    in_order = dist.get_backend() == "gloo"
    state = powerSGD_hook.PowerSGDState(
        process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=powersgd_start
    )

    def counted_powersgd(state, bucket):  # type: ignore[no-untyped-def]
        buffer = bucket.buffer()
        dense = buffer.numel() * buffer.element_size()
        plain = state.iter < state.start_powerSGD_iter
        before = state.total_numel_after_compression
        future = powerSGD_hook.powerSGD_hook(state, bucket)
        if in_order:
            future.wait()
        compressed = (state.total_numel_after_compression - before) * buffer.element_size()
        traffic.add(dense if plain else compressed, dense, bucket.is_last())
        return future

    wrapped.register_comm_hook(state, counted_powersgd)


def apply_ddp(
    model: nn.Module,
    device: torch.device,
    compile: bool = False,
    grad_compression: str | None = None,
    traffic: GradTraffic | None = None,
) -> Worker:
    """Replicate `model` on this worker's device and all-reduce its gradients in backward, compressed as
    `grad_compression` says and counted into `traffic` (see `register_compression`).

    The model stays what the loop optimizes, evaluates and checkpoints (plain parameter names); the DDP
    wrapper is only the training forward. Buffers (batch-norm statistics) come from rank 0 at each forward.
    """
    model.to(device)
    wrapped = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    register_compression(wrapped, grad_compression, traffic if traffic is not None else GradTraffic())
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
