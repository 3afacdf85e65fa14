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


# --- CPU inference fast paths: measured, never assumed (figures: benchmarks/quantize.py) ----------------


class ChannelsLast(nn.Module):
    """Runs `model` with channels-last (NHWC) weights and 4-D inputs: oneDNN's preferred layout for
    convolutions, with no reorder per call. Outputs equal the original's up to float rounding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, *args: object, **kwargs: object) -> object:
        args = tuple(_nhwc(a) for a in args)
        kwargs = {k: _nhwc(v) for k, v in kwargs.items()}
        return self.model(*args, **kwargs)


def _nhwc(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


class Compiled(nn.Module):
    """`model` compiled by inductor for inference with freezing: weights become constants, so convolutions
    and Linear layers get prepacked oneDNN weights and fused epilogues. One compile per input shape
    (`dynamic=False`: static shapes run the fastest kernels); a new batch size's first call takes seconds.
    Gradients are off inside (freezing applies to inference only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        object.__setattr__(self, "_compiled", torch.compile(self.model, dynamic=False))  # not a submodule

    def forward(self, *args: object, **kwargs: object) -> object:
        with torch.no_grad(), frozen():
            return self._compiled(*args, **kwargs)


def frozen() -> contextlib.AbstractContextManager:
    """Inductor's freezing on while compiling: set around every call, since compiling happens at the first
    call of each input shape (the `options=` of torch.compile miss the quantization passes that need it)."""
    return torch._inductor.config.patch(freezing=True)


def channels_last(model: nn.Module) -> nn.Module:
    """`model` (eval) run in channels-last layout, when it has 2-D convolutions; else `model` itself."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return model
    return ChannelsLast(model.eval())


def compile_frozen(model: nn.Module) -> nn.Module:
    """`model` compiled with inductor and freezing for CPU inference (see `Compiled`); shares its weights."""
    return Compiled(model)
