"""Several models measured side by side, and one model measured alone: the figures every report shows.

`compare` times the models side by side in one process (blocks of calls, every round visits them all in a
new random order; see `metrics.time_models`), so that noise from a shared machine falls on all of them alike
and their ratios stay meaningful. Before any figure, each model runs one sample of the example inputs and
of the data, so that inputs it cannot take fail as one ModelError that names both shapes. The file size is
the model saved as a keiryo file (`artifacts.save`), which is why this sits above the file layer and
`metrics` does not.
"""

from __future__ import annotations

import contextlib
import platform
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from keiryo import artifacts, inputs
from keiryo.data import DataSplits, check_targets, describe, load_data, probe_model
from keiryo.errors import ConfigError, DataError, KeiryoError
from keiryo.inputs import Example
from keiryo.metrics import (
    Agreement,
    Latency,
    Timing,
    accuracy,
    agreement,
    batch_of,
    count_flops,
    count_parameters,
    labelled_batches,
    threads,
    time_models,
)
from keiryo.runtimes import Runner

AGREEMENT_SAMPLES = 1024  # agreement is measured on at most this many samples of the data


@dataclass
class Metrics:
    """Everything measured about one model."""

    name: str
    params: int | None  # None for a runtime's program (a Runner): its weights are not torch parameters
    nonzero_params: int | None
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


def file_bytes(model: nn.Module) -> int | None:
    """Bytes of the model saved as a keiryo file (or its state_dict when it has no factory); a runtime's
    program (`keiryo.runtimes.Runner`): its artifact's bytes."""
    if isinstance(model, Runner):
        return model.file_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        try:
            artifacts.save(model, path)
        except KeiryoError:
            torch.save(model.state_dict(), path)
        return path.stat().st_size


def compare(
    models: Mapping[str, nn.Module],
    example_inputs: Example,
    data: object = None,
    timing: Timing | None = None,
) -> Report:
    """Measure several models side by side; agreement and ratios are against the first one.

    `example_inputs` (a Tensor, a tuple of positional arguments or a dict of keyword arguments) are what the
    models are timed and FLOP-counted on. `data` (a DataSplits — its test split is used —, a Dataset of
    `(x, y)` pairs or of dicts with `labels`, a DataLoader, an (inputs, targets) pair or a built-in name)
    adds accuracy; agreement is measured on its inputs when given, else on `example_inputs`.
    """
    if not models:
        raise ConfigError("compare needs at least one model")
    timing = timing or Timing()
    example_inputs = inputs.check_example(example_inputs)
    eval_set, what = _eval_set(data)
    agree_inputs, targets = (
        _first_samples(eval_set, AGREEMENT_SAMPLES, what) if eval_set is not None else (example_inputs, None)
    )
    for model in models.values():  # one sample each, so that a misfit is a one-line error, not a torch trace
        probe_model(model, example_inputs, "the example inputs")
        outputs = probe_model(model, agree_inputs, what) if eval_set is not None else None
        if outputs is not None and targets is not None and not targets.is_floating_point():
            check_targets(outputs, targets, what)
    reference_name = next(iter(models))
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        with threads(timing.threads) as n:
            rows = {}
            for name, model in models.items():
                program = isinstance(model, Runner)  # params and FLOPs live in the runtime, unseen by torch
                total, nonzero = (None, None) if program else count_parameters(model)
                rows[name] = Metrics(
                    name=name,
                    params=total,
                    nonzero_params=nonzero,
                    bytes=file_bytes(model),
                    flops=None if program else count_flops(model, example_inputs),
                    accuracy=accuracy(model, eval_set, what=what) if eval_set is not None else None,
                    agreement=None
                    if name == reference_name
                    else agreement(model, models[reference_name], agree_inputs),
                )
            for b in timing.batch_sizes:
                batch = batch_of(example_inputs, b)
                for name, lat in time_models(models, batch, runs=timing.runs, warmup=timing.warmup).items():
                    rows[name].latency[b] = lat
    finally:
        for name, m in models.items():
            m.train(was_training[name])
    return Report(rows=list(rows.values()), threads=n)


def measure(
    model: nn.Module,
    example_inputs: Example,
    data: object = None,
    reference: nn.Module | None = None,
    timing: Timing | None = None,
) -> Metrics:
    """Measure one model (and its agreement with `reference` when given); arguments as in `compare`."""
    if reference is None:
        return compare({"model": model}, example_inputs, data, timing).rows[0]
    return compare({"reference": reference, "model": model}, example_inputs, data, timing).rows[1]


def _eval_set(data: object) -> tuple[Dataset | Iterable | None, str]:
    """The data accuracy is measured on, and how messages name it."""
    if data is None:
        return None, "the data you passed"
    if isinstance(data, tuple) and len(data) != 2:
        raise DataError(f"data: expected an (inputs, targets) pair, got {len(data)} items")
    if isinstance(data, (str, Path)):
        return load_data(data).test, f"data '{data}'"
    if isinstance(data, DataSplits):
        return data.test, describe(data)
    if isinstance(data, tuple):
        return TensorDataset(*data), "the data you passed"
    return data, "the data you passed"  # a Dataset or DataLoader


def _first_samples(data: Dataset | Iterable, limit: int, what: str) -> tuple[Example, Tensor | None]:
    """The inputs and targets of the first `limit` samples, joined into one example."""
    examples, targets, seen = [], [], 0
    for example, target in labelled_batches(data):
        examples.append(example)
        targets.append(target)
        seen += inputs.batch_size(example)
        if seen >= limit:
            break
    if not examples:
        raise DataError(f"{what} holds no samples")
    joined = inputs.take(inputs.concat(examples), 0, limit)
    return joined, None if any(t is None for t in targets) else torch.cat(targets)[:limit]


# the instruction-set extensions that decide which int8/bf16 kernels are fast (x86 and Arm names)
CPU_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "i8mm", "bf16", "sve",
)  # fmt: skip


def machine() -> str:
    """The CPU model and its flags that matter for kernels, e.g. 'AMD EPYC (avx2, fma)': every speed figure
    holds for one machine, so every report says which (nothing in keiryo assumes an instruction set)."""
    model, flags = platform.processor() or platform.machine() or "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    present = [f for f in CPU_FLAGS if f in flags]
    return f"{model} ({', '.join(present) or 'no AVX2/AVX-512/NEON flags listed'})"
