"""Quantization methods as small configs, and the policy that chooses a kernel for one.

One dataclass per method, as torchao's `quantize_(model, Int8DynamicActivationInt8WeightConfig())`: its
fields are the options that method has, checked when it is made. The method names the CLI and recipes use
stay as aliases: `method_of("int8-static")` is `Int8Static()`. A saved model's provenance and a recipe step
are a config's `kind` and `dataclasses.asdict`; `config_from(kind, fields)` makes the config back.
`Policy` says how `quantize` chooses among the kernels that can run a method: which backend, which layers
stay float, the quality tolerance, and how much time measuring may take.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from keiryo.compress.quant_backends import INT4_GROUP_SIZES
from keiryo.errors import ConfigError
from keiryo.loop import TrainConfig

GRANULARITIES = ("per-tensor", "per-channel")
OBSERVERS = ("minmax", "histogram", "percentile")


def _check_granularity(granularity: str | None) -> None:
    if granularity is not None and granularity not in GRANULARITIES:
        raise ConfigError(f"unknown granularity '{granularity}' (known: {', '.join(GRANULARITIES)})")


@dataclass(frozen=True)
class Fp32:
    """Cast every floating parameter to float32 (the casts below share its fields and backend)."""

    kind: ClassVar[str] = "fp32"
    backends: ClassVar[tuple[str, ...]] = ("torch",)


@dataclass(frozen=True)
class Fp16(Fp32):
    """Cast to float16; float32 inputs and outputs still work."""

    kind: ClassVar[str] = "fp16"


@dataclass(frozen=True)
class Bf16(Fp32):
    """Cast to bfloat16; float32 inputs and outputs still work."""

    kind: ClassVar[str] = "bf16"


@dataclass(frozen=True)
class Int8Dynamic:
    """Linear layers: int8 weights, activations quantized per batch. `granularity` None tries both under
    auto; `symmetric=False` gives affine weights (torch.ao's kernel only: torchao's are symmetric)."""

    granularity: str | None = None
    symmetric: bool = True
    kind: ClassVar[str] = "int8-dynamic"
    backends: ClassVar[tuple[str, ...]] = ("fbgemm", "torchao", "torchao-compile")

    def __post_init__(self) -> None:
        _check_granularity(self.granularity)


@dataclass(frozen=True)
class Int8WeightOnly:
    """Linear layers: int8 weights (symmetric), float activations."""

    granularity: str | None = None
    kind: ClassVar[str] = "int8-weight-only"
    backends: ClassVar[tuple[str, ...]] = ("torchao", "torchao-compile")

    def __post_init__(self) -> None:
        _check_granularity(self.granularity)


@dataclass(frozen=True)
class Int4WeightOnly:
    """int4 weights, one scale per `group_size` weights: Linear layers on torch's CPU int4 kernel, the rest
    (convolutions, odd shapes) packed two per byte and expanded at each call."""

    group_size: int = 32
    kind: ClassVar[str] = "int4-weight-only"
    backends: ClassVar[tuple[str, ...]] = ("torchao", "torchao-compile")

    def __post_init__(self) -> None:
        if self.group_size not in INT4_GROUP_SIZES:
            raise ConfigError(
                f"group_size {self.group_size} is not supported (choose one of {INT4_GROUP_SIZES})"
            )


@dataclass(frozen=True)
class Int8Static:
    """Linear and Conv layers: int8 weights and activations, activation ranges calibrated on data by
    `observer` (minmax | histogram | percentile). BatchNorms after convolutions are folded first.
    Backends: "fbgemm" (torch.ao's eager int8 layers, any model) and "x86-inductor" (PT2E: the whole model
    exported, quantized by torchao's X86InductorQuantizer with its own histogram observers and per-channel
    weights, then compiled so quantize/dequantize fuse into oneDNN int8 kernels; needs torch.export)."""

    observer: str = "histogram"
    granularity: str | None = None
    symmetric: bool = True
    kind: ClassVar[str] = "int8-static"
    backends: ClassVar[tuple[str, ...]] = ("fbgemm", "x86-inductor")

    def __post_init__(self) -> None:
        _check_granularity(self.granularity)
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer '{self.observer}' (known: {', '.join(OBSERVERS)})")


def _qat_training() -> TrainConfig:
    return TrainConfig(epochs=3, lr=5e-4, device="cpu", progress=False)


@dataclass(frozen=True)
class QAT:
    """Quantization-aware training: `train` the model with int8 fake quantization, then convert to static
    int8 with the ranges it learned (per-channel weights unless `granularity` says otherwise)."""

    train: TrainConfig = field(default_factory=_qat_training)
    granularity: str | None = None
    symmetric: bool = True
    kind: ClassVar[str] = "qat"
    backends: ClassVar[tuple[str, ...]] = ("fbgemm",)

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"QAT(train=...) takes a TrainConfig, got a {type(self.train).__name__}")
        _check_granularity(self.granularity)


QuantConfig = Fp32 | Fp16 | Bf16 | Int8Dynamic | Int8WeightOnly | Int4WeightOnly | Int8Static | QAT
CONFIGS: dict[str, type] = {
    c.kind: c for c in (Fp32, Fp16, Bf16, Int8Dynamic, Int8WeightOnly, Int4WeightOnly, Int8Static, QAT)
}
METHODS = tuple(CONFIGS)
CASTS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def method_of(method: str | QuantConfig, **options: Any) -> QuantConfig:
    """The config for a method name (`"int8-static"` -> `Int8Static()`), with `options` set on it; a config
    passes through (with `options` replaced). Options the method does not have are refused in one line."""
    if isinstance(method, str):
        if method not in CONFIGS:
            raise ConfigError(f"unknown quantization method '{method}' (known: {', '.join(METHODS)})")
        kind = CONFIGS[method]
    elif type(method) in CONFIGS.values():
        kind = type(method)
    else:
        raise ConfigError(
            f"method must be a name ({', '.join(METHODS)}) or a quantization config, "
            f"got {type(method).__name__}"
        )
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(options) - known)
    if unknown:
        has = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"{kind.kind} has no option {', '.join(unknown)} (its options: {has})")
    return kind(**options) if isinstance(method, str) else dataclasses.replace(method, **options)


def config_from(kind: str, fields: dict[str, Any]) -> QuantConfig:
    """The config recorded as (`kind`, `dataclasses.asdict(config)`): a saved model's or a recipe step's."""
    if kind == "qat" and isinstance(fields.get("train"), dict):
        fields = {**fields, "train": TrainConfig(**fields["train"])}
    try:
        return method_of(kind, **fields)
    except TypeError as exc:
        raise ConfigError(f"quantization '{kind}' recorded with options it cannot take: {exc}") from exc


@dataclass
class Policy:
    """How `quantize` chooses a kernel for a method.

    `backend`: "auto" builds every kernel that can run the method here, times each beside the float model
    (BatchNorms folded) at every size in `batch_sizes`, and keeps the fastest within tolerance; when none is
    ≥ 1.1× faster than float overall and at least as fast at each batch size, it keeps float and says so. A
    backend name forces that kernel (a forced kernel outside the tolerance is returned, and says so).
    `skip`: layer names kept in float. Tolerance: output cosine ≥
    `min_cosine`, and top-1 agreement ≥ `min_top1` when outputs are `class_scores` (None: known from labelled
    calibration data or the model's recorded classes). `compile`: also try torch.compile'd kernels (tens of
    seconds each to build; None: only for models of ≥ 10M parameters, where they can pay off). `runs`: timed
    runs per candidate and batch size, fewer when they would take more than `time_limit` seconds in all.
    `batch_sizes`: the batch sizes served, each timed (the example inputs repeated or cut to that size).
    """

    backend: str = "auto"
    skip: tuple[str, ...] = ()
    min_cosine: float = 0.99
    min_top1: float = 0.98
    class_scores: bool | None = None
    compile: bool | None = None
    runs: int = 30
    time_limit: float = 10.0
    batch_sizes: tuple[int, ...] = (1, 64)

    def __post_init__(self) -> None:
        self.skip = tuple(self.skip)
        self.batch_sizes = tuple(self.batch_sizes)
        if not self.batch_sizes or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.batch_sizes
        ):
            raise ConfigError(f"batch_sizes must be whole numbers ≥ 1, got {self.batch_sizes!r}")
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or self.runs < 1:
            raise ConfigError(f"runs must be a whole number ≥ 1, got {self.runs!r}")
        for name in ("min_cosine", "min_top1", "time_limit"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if self.time_limit <= 0:
            raise ConfigError(f"time_limit must be > 0 seconds, got {self.time_limit}")


def check_options(
    method: str | QuantConfig, policy: Policy | None = None, *, has_calibration: bool = True
) -> QuantConfig:
    """The method's config, or a one-line ConfigError for what `quantize` cannot run (the model aside),
    before any work."""
    config = method_of(method)
    backend = (policy or Policy()).backend
    if backend != "auto" and backend not in config.backends:
        raise ConfigError(
            f"backend '{backend}' cannot run {config.kind} (available: auto, {', '.join(config.backends)})"
        )
    if backend == "x86-inductor" and (policy or Policy()).skip:
        raise ConfigError(
            "backend 'x86-inductor' quantizes the whole exported program: it cannot skip layers"
        )
    if isinstance(config, Int4WeightOnly) and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise ConfigError("int4-weight-only needs torch's CPU int4 kernel, which this torch build lacks")
    if isinstance(config, (Int8Static, QAT)) and not has_calibration:
        qat = isinstance(config, QAT)
        need = "labelled training data" if qat else "calibration data (a few hundred inputs)"
        raise ConfigError(f"method '{config.kind}' needs {need}: pass calibration= (CLI: --calibration DATA)")
    return config
