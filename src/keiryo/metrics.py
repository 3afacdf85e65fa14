"""Measurement: one definition of every figure keiryo reports, used by every step and every report.

Latency is the median (p50) and p90 of many timed forward passes after warm-up, under `inference_mode`, at a
fixed thread count. `compare` times several models interleaved in one process (every round visits them all,
in a new random order), so that noise from a shared machine falls on all of them alike and their ratios stay
meaningful. Before any figure, each model runs one sample of the example inputs and of the data, so that
inputs it cannot take fail as one ModelError that names both shapes.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from keiryo import artifacts
from keiryo.data import DataSplits, check_targets, describe, load_data, probe_model, tensors_of
from keiryo.errors import ConfigError, DataError, KeiryoError, ModelError


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


@dataclass
class Metrics:
    """Everything measured about one model."""

    name: str
    params: int
    nonzero_params: int
    bytes: int | None
    flops: int | None  # per sample
    latency: dict[int, Latency] = field(default_factory=dict)
    accuracy: float | None = None
    agreement: Agreement | None = None


@dataclass
class Report:
    """Several models measured side by side; the first row is the baseline that ratios refer to."""

    rows: list[Metrics]
    threads: int

    @property
    def baseline(self) -> Metrics:
        return self.rows[0]

    def speedup(self, row: Metrics, batch_size: int) -> float | None:
        """Baseline p50 / row p50 at a batch size: above 1 is faster, below 1 slower."""
        base, mine = self.baseline.latency.get(batch_size), row.latency.get(batch_size)
        return base.p50_ms / mine.p50_ms if base and mine else None

    def size_ratio(self, row: Metrics) -> float | None:
        """Row bytes / baseline bytes: below 1 is smaller."""
        if row.bytes is None or not self.baseline.bytes:
            return None
        return row.bytes / self.baseline.bytes


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
        weight_fn = getattr(module, "weight", None)
        if callable(weight_fn) and not isinstance(weight_fn, nn.Module):  # torch.ao packed modules
            with contextlib.suppress(Exception):
                yield weight_fn()


def file_bytes(model: nn.Module) -> int | None:
    """Bytes of the model saved as a keiryo file (or its state_dict when it has no factory)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        try:
            artifacts.save(model, path)
        except KeiryoError:
            torch.save(model.state_dict(), path)
        return path.stat().st_size


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


def count_flops(model: nn.Module, example_inputs: Tensor) -> int | None:
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
            model(example_inputs[:1])
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


def batch_of(example_inputs: Tensor, batch_size: int) -> Tensor:
    """`batch_size` rows taken from the example inputs, repeated as needed."""
    reps = -(-batch_size // len(example_inputs))
    return example_inputs.repeat(reps, *([1] * (example_inputs.dim() - 1)))[:batch_size].contiguous()


def time_models(
    models: Mapping[str, nn.Module], inputs: Tensor, *, runs: int = 50, warmup: int = 10
) -> dict[str, Latency]:
    """Median/p90 latency of each model on `inputs`, timed interleaved after warm-up.

    Each round visits the models in a new (seeded) random order, and each visit makes one untimed call before
    the timed one: a model is timed with its own weights in cache, as when it serves requests, and no model
    pays for always following a larger one (a fixed order biased small int8 models by 20% here).
    """
    if runs < 1:
        raise ConfigError(f"runs must be ≥ 1, got {runs}")
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    rng = random.Random(0)
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(inputs)
        for _ in range(runs):
            rng.shuffle(order)
            for name in order:
                model = models[name]
                model(inputs)
                start = time.perf_counter()
                model(inputs)
                times[name].append(time.perf_counter() - start)
    out = {}
    for name, samples in times.items():
        samples.sort()
        out[name] = Latency(
            batch_size=len(inputs),
            p50_ms=statistics.median(samples) * 1000,
            p90_ms=samples[min(len(samples) - 1, int(0.9 * len(samples)))] * 1000,
            runs=runs,
        )
    return out


def _outputs(model: nn.Module, inputs: Tensor, batch_size: int = 256) -> Tensor:
    with torch.inference_mode():
        return torch.cat(
            [model(inputs[i : i + batch_size]).float() for i in range(0, len(inputs), batch_size)]
        )


def agreement(model: nn.Module, reference: nn.Module, inputs: Tensor) -> Agreement:
    """Top-1 agreement, max/mean absolute error and cosine similarity of outputs against a reference."""
    mine, ref = _outputs(model, inputs), _outputs(reference, inputs)
    if mine.shape != ref.shape:
        raise ModelError(f"outputs differ in shape: {tuple(mine.shape)} vs reference {tuple(ref.shape)}")
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
    )


def accuracy(
    model: nn.Module, dataset: Dataset, batch_size: int = 256, *, what: str = "the data you passed"
) -> float | None:
    """Top-1 accuracy on a labelled data set (None for regression targets); labels the model has no output
    for are refused (`what` names the data in that message), not counted as misses."""
    inputs, targets = tensors_of(dataset)
    if targets.is_floating_point() or len(targets) == 0:
        return None
    outputs = _outputs(model, inputs, batch_size)
    check_targets(outputs, targets, what)
    return float((outputs.argmax(-1) == targets).float().mean())


def _eval_set(data: object) -> Dataset | None:
    if data is None:
        return None
    if isinstance(data, tuple) and len(data) != 2:
        raise DataError(f"data: expected an (inputs, targets) pair, got {len(data)} items")
    splits = data if isinstance(data, DataSplits) else None
    if splits is None and isinstance(data, (str, Path)):
        splits = load_data(data)
    if splits is not None:
        return splits.test
    if isinstance(data, tuple):
        return torch.utils.data.TensorDataset(*data)
    return data  # a Dataset


def compare(
    models: Mapping[str, nn.Module],
    example_inputs: Tensor,
    data: object = None,
    *,
    batch_sizes: tuple[int, ...] = (1, 64),
    runs: int = 50,
    warmup: int = 10,
    num_threads: int | None = None,
) -> Report:
    """Measure several models side by side; agreement and ratios are against the first one.

    `data` (a DataSplits — its test split is used —, a Dataset, an (inputs, targets) pair or a built-in name)
    adds accuracy; agreement is measured on its inputs when given, else on `example_inputs`.
    """
    if not models:
        raise ConfigError("compare needs at least one model")
    eval_set = _eval_set(data)
    what = describe(data) if isinstance(data, DataSplits) else "the data you passed"
    what = f"data '{data}'" if isinstance(data, (str, Path)) else what
    eval_x, eval_y = tensors_of(eval_set) if eval_set is not None else (example_inputs, None)
    agree_inputs = eval_x[:1024]
    for model in models.values():  # one sample each, so that a misfit is a one-line error, not a torch trace
        probe_model(model, example_inputs, "the example inputs")
        outputs = probe_model(model, eval_x, what) if eval_y is not None else None
        if outputs is not None and not eval_y.is_floating_point():
            check_targets(outputs, eval_y, what)
    reference_name = next(iter(models))
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    with threads(num_threads) as n:
        rows = {}
        for name, model in models.items():
            total, nonzero = count_parameters(model)
            rows[name] = Metrics(
                name=name,
                params=total,
                nonzero_params=nonzero,
                bytes=file_bytes(model),
                flops=count_flops(model, example_inputs),
                accuracy=accuracy(model, eval_set, what=what) if eval_set is not None else None,
                agreement=None
                if name == reference_name
                else agreement(model, models[reference_name], agree_inputs),
            )
        for b in batch_sizes:
            for name, lat in time_models(
                models, batch_of(example_inputs, b), runs=runs, warmup=warmup
            ).items():
                rows[name].latency[b] = lat
    for name, m in models.items():
        m.train(was_training[name])
    return Report(rows=list(rows.values()), threads=n)


def measure(
    model: nn.Module,
    example_inputs: Tensor,
    data: object = None,
    reference: nn.Module | None = None,
    **options,
) -> Metrics:
    """Measure one model (and its agreement with `reference` when given); options as in `compare`."""
    if reference is None:
        return compare({"model": model}, example_inputs, data, **options).rows[0]
    return compare({"reference": reference, "model": model}, example_inputs, data, **options).rows[1]
