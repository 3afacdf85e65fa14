"""Device choice, precision and autocast, and torch.compile: one code path for CPU, CUDA and MPS."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from keiryo.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist here."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' asked for, but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device '{device}' asked for, but MPS is not available on this machine")
    return dev


def check_precision(precision: str) -> torch.dtype:
    """The autocast dtype for a precision name; fp32 means no autocast."""
    if precision not in _DTYPES:
        raise ConfigError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    return _DTYPES[precision]


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed-precision region for the forward pass; a no-op for fp32."""
    dtype = check_precision(precision)
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 on CUDA needs loss scaling so small gradients don't underflow; bf16 and CPU do not."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """Wrap with torch.compile when asked; the original module keeps the weights (shared)."""
    return torch.compile(model) if enabled else model


def move_batch(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to the device; pinned host memory lets CUDA copies overlap with compute."""
    if device.type == "cpu":
        return batch
    return batch.to(device, non_blocking=device.type == "cuda")


def describe() -> dict[str, str]:
    """What a bug report needs: versions, threads, accelerators."""
    info = {
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no",
        "mps": "yes" if torch.backends.mps.is_available() else "no",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    return info
