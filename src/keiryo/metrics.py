"""Measurement: one definition of every figure keiryo reports (parameters, FLOPs, latency, agreement...).

Every function that calls a model takes an *example* as PyTorch passes inputs (`keiryo.inputs`): a Tensor, a
tuple of positional arguments or a dict of keyword arguments. Outputs that are tuples, dicts or Hugging Face
`ModelOutput`s are compared on `inputs.main_output` (logits, else last_hidden_state, ...), and the figures say
which field. Latency is the median (p50) and p90 of many timed forward passes after warm-up, under
`inference_mode`, at a fixed thread count, in blocks of consecutive calls, several models' blocks
interleaved (see `time_models`). This module knows no file format: a model's file size is measured a layer
up, in `keiryo.measuring`.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from keiryo import inputs
from keiryo.data import check_targets, collate
from keiryo.errors import ConfigError, DataError, ModelError
from keiryo.inputs import Example

IGNORE_LABEL = -100  # Hugging Face's "no label here" (padding tokens, special tokens)


@dataclass
class Timing:
    """How latency is measured: `runs` timed calls after `warmup` untimed ones, at each of `batch_sizes`, with
    `threads` intra-op threads (None: torch's current setting)."""

    runs: int = 50
    warmup: int = 10
    batch_sizes: tuple[int, ...] = (1, 64)
    threads: int | None = None

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(self.batch_sizes)
        if self.runs < 1 or self.warmup < 0:
            raise ConfigError(
                f"timing needs runs ≥ 1 and warmup ≥ 0, got runs={self.runs} warmup={self.warmup}"
            )
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"timing needs batch sizes ≥ 1, got {list(self.batch_sizes)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be ≥ 1, got {self.threads}")


@dataclass
class Latency:
    """Forward-pass time at one batch size."""

    batch_size: int
    p50_ms: float
    p90_ms: float
    runs: int

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch_size / (self.p50_ms / 1000.0)


@dataclass
class Agreement:
    """How closely a model's outputs follow a reference model's on the same inputs."""

    top1: float | None  # fraction of samples with the same arg-max (class outputs only)
    max_error: float
    mean_error: float
    cosine: float  # mean per-sample cosine similarity of the output vectors
    samples: int
    output: str = "output"  # the field compared: 'output', 'logits', 'last_hidden_state', 'output[0]'...


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) parameter counts; packed or quantized weights count by their logical elements."""
    total = nonzero = 0
    seen: set[int] = set()
    tensors = list(_weight_tensors(model))  # held alive: ids of freed temporaries (packed weights) get reused
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel()
        nonzero += _nonzero(tensor)
    return total, nonzero


def _nonzero(tensor: Tensor) -> int:
    """Non-zero logical elements; quantized tensors and torchao's tensor subclasses count dequantized."""
    if tensor.is_quantized or type(tensor) not in (Tensor, nn.Parameter):
        try:
            tensor = tensor.dequantize()
        except (NotImplementedError, RuntimeError, AttributeError):  # packed formats that cannot expand
            return tensor.numel()
    return int(torch.count_nonzero(tensor.detach()))


def _weight_tensors(model: nn.Module) -> Iterator[Tensor]:
    yield from model.parameters()
    for module in model.modules():
        for name in ("weight", "bias"):  # torch.ao packed modules return both from methods
            getter = getattr(module, name, None)
            if callable(getter) and not isinstance(getter, nn.Module):
                with contextlib.suppress(Exception):
                    tensor = getter()
                    if isinstance(tensor, Tensor):
                        yield tensor


def has_quantized_kernels(model: nn.Module) -> bool:
    """Whether the model runs quantized kernels: torch.ao quantized modules (keiryo's static int8 wraps them)
    or torchao's quantized weight tensors (tensor subclasses; other subclasses such as DTensor are not)."""
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        return True
    subclassed = [p for p in model.parameters() if type(p) not in (Tensor, nn.Parameter)]
    if not subclassed:
        return False
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return False
    return any(isinstance(p, TorchAOBaseTensor) for p in subclassed)


def count_flops(model: nn.Module, example_inputs: Example) -> int | None:
    """FLOPs of one forward pass on one sample, by torch.utils.flop_counter (None if it can't trace).

    A compiled model is counted through its eager forward: calling compiled code under the counter's dispatch
    mode recompiles it, and the recompiled graphs ran 2x slower than before in every later call.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile(model) wraps; model.compile() does not
    if has_quantized_kernels(model):  # invisible to the counter: their FLOPs are unknown, not zero
        return None
    compiled, model._compiled_call_impl = getattr(model, "_compiled_call_impl", None), None
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            inputs.call(model, inputs.take(example_inputs, 0, 1))
        return int(counter.get_total_flops())
    except Exception:  # quantized kernels the counter does not know; report "unknown", not a wrong number
        return None
    finally:
        model._compiled_call_impl = compiled


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[int]:
    """Run with a fixed intra-op thread count, restored afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ConfigError(f"threads must be ≥ 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def batch_of(example_inputs: Example, batch_size: int) -> Example:
    """The example at exactly `batch_size` samples (repeated as needed), every tensor contiguous: the inputs
    a model is timed on, so that no model pays for strided reads of a view."""
    return inputs.map_tensors(inputs.resize_batch(example_inputs, batch_size), lambda t: t.contiguous())


SETTLE_S = 0.050  # untimed calls before each block, for at least this long (and at least 2 calls)
BLOCKS = 5  # rounds of blocks: each model's timed calls are split over this many visits


def time_models(
    models: Mapping[str, nn.Module],
    example_inputs: Example,
    *,
    runs: int = 50,
    warmup: int = 10,
    blocks: int = BLOCKS,
) -> dict[str, Latency]:
    """Median/p90 latency of each model on `example_inputs`: `runs` timed calls each, after warm-up.

    A model is timed as it serves a stream of requests: in blocks of consecutive calls. The `runs` calls are
    split over `blocks` rounds, and each round visits the models in a new (seeded) random order, so that drift
    of a shared machine falls on all of them alike. Each visit first makes untimed calls for SETTLE_S (at
    least two): the previous model's spinning thread pool (OpenMP, ONNX Runtime, XNNPACK) goes quiet and this
    model's weights are in cache. Timed one call at a time right after another runtime, ONNX Runtime's int8
    cnn ran 1.6x slower at batch 64 on 2 cores (PyTorch's threads still spinning) and 3x slower at batch 1
    among ten runtimes; ExecuTorch's int8 MLP ran at 50-165 µs instead of 32 µs for 10 ms after an ONNX
    Runtime session had run (its worker thread spins on), and at 32-41 µs after 50 ms.
    """
    if runs < 1:
        raise ConfigError(f"runs must be ≥ 1, got {runs}")
    args, kwargs = inputs.args_kwargs(example_inputs)
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    rng = random.Random(0)
    rounds = max(1, min(blocks, runs))
    per_block = [runs // rounds + (1 if i < runs % rounds else 0) for i in range(rounds)]
    clock = time.perf_counter
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(*args, **kwargs)
        for count in per_block:
            rng.shuffle(order)
            for name in order:
                model = models[name]
                settled, calls = clock() + SETTLE_S, 0
                while calls < 2 or clock() < settled:
                    model(*args, **kwargs)
                    calls += 1
                for _ in range(count):
                    start = clock()
                    model(*args, **kwargs)
                    times[name].append(clock() - start)
    out = {}
    for name, samples in times.items():
        samples.sort()
        out[name] = Latency(
            batch_size=inputs.batch_size(example_inputs),
            p50_ms=statistics.median(samples) * 1000,
            p90_ms=samples[min(len(samples) - 1, int(0.9 * len(samples)))] * 1000,
            runs=runs,
        )
    return out


def _outputs(model: nn.Module, example_inputs: Example, batch_size: int = 256) -> tuple[Tensor, str]:
    """The model's main output on every sample (float, run `batch_size` samples at a time) and its name."""
    parts, name = [], "output"
    with torch.inference_mode():
        for start in range(0, inputs.batch_size(example_inputs), batch_size):
            out = inputs.call(model, inputs.take(example_inputs, start, start + batch_size))
            name = inputs.output_name(out)
            parts.append(inputs.main_output(out).float())
    return torch.cat(parts), name


def agreement(model: nn.Module, reference: nn.Module, example_inputs: Example) -> Agreement:
    """Top-1 agreement, max/mean absolute error and cosine similarity of the main outputs against a
    reference's; `output` names the field compared (the reference's, 'a vs b' when they differ)."""
    (mine, my_name), (ref, ref_name) = _outputs(model, example_inputs), _outputs(reference, example_inputs)
    if mine.shape != ref.shape:
        raise ModelError(
            f"outputs differ in shape: {my_name} {tuple(mine.shape)} "
            f"vs reference {ref_name} {tuple(ref.shape)}"
        )
    diff = (mine - ref).abs()
    top1 = None
    if mine.dim() == 2 and mine.shape[1] > 1:
        top1 = float((mine.argmax(1) == ref.argmax(1)).float().mean())
    cosine = F.cosine_similarity(mine.reshape(len(mine), -1), ref.reshape(len(ref), -1), dim=1, eps=1e-12)
    return Agreement(
        top1=top1,
        max_error=float(diff.max()),
        mean_error=float(diff.mean()),
        cosine=float(cosine.mean()),
        samples=len(mine),
        output=ref_name if my_name == ref_name else f"{my_name} vs {ref_name}",
    )


def labelled_batches(
    data: Dataset | Iterable, batch_size: int = 256
) -> Iterator[tuple[Example, Tensor | None]]:
    """(inputs, targets) batches of a data set, in order: a TensorDataset (the last tensor is the targets when
    there are two or more), a Dataset of `(x, y)` pairs or of dicts with a `labels` key (Hugging Face style),
    or a DataLoader / iterable already yielding such batches. Targets are None for unlabelled samples."""
    if isinstance(data, TensorDataset):
        example, targets = inputs.split_batch(data.tensors)
        for start in range(0, len(data), batch_size):
            yield (
                inputs.take(example, start, start + batch_size),
                None if targets is None else targets[start : start + batch_size],
            )
        return
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=batch_size, collate_fn=collate)
    for batch in data:
        example, targets = inputs.split_batch(batch)
        yield example, None if targets is None else torch.as_tensor(targets)


def accuracy(
    model: nn.Module, dataset: Dataset | Iterable, batch_size: int = 256, *, what: str = "the data you passed"
) -> float | None:
    """Top-1 accuracy on labelled data (see `labelled_batches`; None for unlabelled data or regression
    targets); per-token labels count every labelled position (Hugging Face's -100 marks none). Labels the
    model has no output for are refused (`what` names the data in that message), not counted as misses."""
    correct = counted = 0
    with torch.inference_mode():
        for example, targets in labelled_batches(dataset, batch_size):
            if targets is None or targets.is_floating_point():
                return None
            raw = inputs.call(model, example)
            out = inputs.main_output(raw)
            check_targets(out, targets, what)
            if out.shape[:-1] != targets.shape:
                raise DataError(
                    f"{what} has labels of shape {tuple(targets.shape)} but the model's "
                    f"{inputs.output_name(raw)} has shape {tuple(out.shape)}; "
                    "pass one label per sample (or per position) of its outputs"
                )
            labelled = targets != IGNORE_LABEL
            correct += int(((out.argmax(-1) == targets) & labelled).sum())
            counted += int(labelled.sum())
    return correct / counted if counted else None
