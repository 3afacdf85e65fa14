"""Quantization that is really faster: precision casts, int8/int4 post-training, static int8, and QAT.

`quantize(model, method, ...)` returns a quantized copy. With `backend="auto"` it builds every kernel that can
do `method` here, measures each against the float model on the example inputs (quality first, then speed,
timed interleaved), and keeps the fastest one within tolerance; for the speed methods (int8-dynamic,
int8-weight-only) it keeps float when nothing beats it. What was chosen and every alternative measured are in
`model.quantize_report` (a `QuantizeReport`). The kernels themselves are in `quant_backends.py`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from keiryo import provenance
from keiryo.compress import quant_backends as qb
from keiryo.compress import quant_static as qs
from keiryo.data import DataSplits, load_data, tensors_of
from keiryo.errors import ConfigError, ModelError, one_line
from keiryo.loop import TrainConfig
from keiryo.metrics import agreement, batch_of, time_models

CASTS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Every method and the backends that can run it here, in the order tried; "auto" measures them all.
BACKENDS = {
    "fp32": ("torch",),
    "fp16": ("torch",),
    "bf16": ("torch",),
    "int8-dynamic": ("fbgemm", "torchao", "torchao-compile"),
    "int8-weight-only": ("torchao", "torchao-compile"),
    "int4-weight-only": ("torchao", "torchao-compile"),
    "int8-static": ("fbgemm",),
    "qat": ("fbgemm",),
}
METHODS = tuple(BACKENDS)
# Methods that exist for speed: under backend="auto", the float model stays when no kernel beats it.
SPEED_METHODS = ("int8-dynamic", "int8-weight-only")
OBSERVERS = ("minmax", "histogram", "percentile")
GRANULARITIES = ("per-tensor", "per-channel")
REPORT_ATTR = "quantize_report"
# A kernel must be this much faster (geometric mean over the batch sizes timed) to replace float under auto:
# back-to-back timings on a shared CPU differ by a few percent, and a 1.03× "win" is noise, not a speed-up.
MIN_SPEEDUP = 1.1
MAX_CALIBRATION = 1024  # calibration inputs used (the first ones): ranges settle long before this


@dataclass
class Candidate:
    """One kernel that was built and measured against the float model."""

    backend: str
    granularity: str | None
    p50_ms: dict[int, float] = field(default_factory=dict)
    float_p50_ms: dict[int, float] = field(default_factory=dict)  # the float model, timed alongside
    speedup: dict[int, float] = field(default_factory=dict)  # float p50 / this p50, per batch size
    cosine: float | None = None
    top1: float | None = None
    passed: bool = False  # within the quality tolerance
    note: str = ""

    @property
    def score(self) -> float:
        """Geometric mean of the speed-ups over the batch sizes timed (1.0 when not timed)."""
        ups = list(self.speedup.values())
        return math.exp(sum(math.log(u) for u in ups) / len(ups)) if ups else 1.0


@dataclass
class QuantizeReport:
    """What `quantize` chose and why: the chosen kernel, every alternative measured, and the float timing."""

    method: str
    backend: str  # the chosen backend, or "float" when float was kept
    granularity: str | None
    layers: list[str]
    candidates: list[Candidate]
    kept_float: bool
    message: str


@dataclass
class LayerSensitivity:
    """How much quantizing one layer alone changes the model's outputs."""

    name: str
    kind: str
    params: int
    cosine: float
    top1: float | None
    sqnr_db: float  # signal-to-quantization-noise of the outputs: higher is better, ∞ if unchanged


def quantize(
    model: nn.Module,
    method: str = "int8-dynamic",
    calibration: object = None,
    example_inputs: Tensor | None = None,
    *,
    backend: str = "auto",
    granularity: str | None = None,
    symmetric: bool = True,
    skip: tuple[str, ...] | list[str] = (),
    group_size: int = 32,
    observer: str = "histogram",
    min_cosine: float = 0.99,
    min_top1: float = 0.98,
    class_scores: bool | None = None,
    qat: TrainConfig | None = None,
    compile: bool = True,
    runs: int = 30,
) -> nn.Module:
    """A quantized copy of `model` by `method` (see `METHODS`); the original is left as it was.

    `calibration`: data for int8-static (inputs, or anything `load_data` reads) and labelled training data
    for qat. `granularity` (per-tensor | per-channel) and `symmetric` set the int8 weight scheme; None tries
    both under auto. `skip`: layer names kept in float. `group_size`: int4 weights per scale. `observer`:
    minmax | histogram | percentile activation ranges for int8-static. Quality tolerance: output cosine
    ≥ `min_cosine`, and top-1 agreement ≥ `min_top1` when outputs are `class_scores` (None: known from
    labelled calibration data or the model's recorded num_classes) against the float model. `compile`:
    auto also tries torch.compile'd kernels (tens of seconds each to build). `runs`: timed runs per candidate.
    """
    _validate(model, method, backend, granularity, observer, group_size, calibration)
    layers = _layers(model, method, tuple(skip))
    cal_inputs = _calibration_inputs(calibration)[:MAX_CALIBRATION] if calibration is not None else None
    settings = Settings(symmetric, group_size, observer, cal_inputs, calibration, qat)
    built: dict[str, nn.Module] = {}
    candidates: dict[str, Candidate] = {}
    auto = [b for b in BACKENDS[method] if compile or not b.endswith("-compile")]
    for b in auto if backend == "auto" else (backend,):
        for g in _granularities(method, b, granularity, backend == "auto"):
            key = b if g is None else f"{b} {g}"
            candidates[key] = Candidate(backend=b, granularity=g)
            if not symmetric and b.startswith("torchao") and method.startswith("int8"):
                candidates[key].note = "skipped: torchao's int8 weights are symmetric only"
                continue
            try:
                built[key] = _apply(model, method, b, g, layers, settings)
            except (RuntimeError, AssertionError, NotImplementedError, ValueError) as exc:
                candidates[key].note = f"failed: {one_line(exc, 160)}"
    if not built:
        notes = "; ".join(f"{k}: {c.note}" for k, c in candidates.items())
        raise ModelError(f"no backend could quantize this model by {method} ({notes})")
    quality_inputs = cal_inputs[:1024] if cal_inputs is not None else example_inputs
    if class_scores is None:
        class_scores = _class_outputs(model, calibration)
    tolerance = (min_cosine, min_top1 if class_scores else None)
    _measure(model, method, built, candidates, quality_inputs, example_inputs, tolerance, runs)
    return _choose(model, method, layers, built, candidates, forced=backend != "auto")


@dataclass
class Settings:
    """The options every candidate of one `quantize` call shares."""

    symmetric: bool
    group_size: int
    observer: str
    cal_inputs: Tensor | None
    calibration: object
    qat: TrainConfig | None


def _measure(model, method, built, candidates, quality_inputs, example_inputs, tolerance, runs) -> None:
    """Fill each candidate's agreement with float, and the speed of those within tolerance (interleaved)."""
    min_cosine, min_top1 = tolerance
    for key, qmodel in built.items():
        c = candidates[key]
        if quality_inputs is None:
            c.passed, c.note = True, "quality not measured (no example inputs or calibration data)"
            continue
        agree = agreement(qmodel, model.eval(), quality_inputs)
        c.cosine, c.top1 = agree.cosine, agree.top1
        c.passed = agree.cosine >= min_cosine and (min_top1 is None or (agree.top1 or 0.0) >= min_top1)
        if method == "qat":  # retrained on purpose: agreement with the old float model is for information
            c.passed, c.note = True, "retrained with fake quantization; agreement is with the float model"
        elif not c.passed:
            top1 = f", top-1 ≥ {min_top1}" if min_top1 is not None else ""
            c.note = f"outside tolerance (cosine ≥ {min_cosine}{top1})"
    timed = {k: m for k, m in built.items() if candidates[k].passed}
    if example_inputs is None or not timed:
        return
    for size in sorted({1, len(example_inputs)}):
        lat = time_models({"float": model, **timed}, batch_of(example_inputs, size), runs=runs, warmup=5)
        for key in timed:
            candidates[key].float_p50_ms[size] = lat["float"].p50_ms
            candidates[key].p50_ms[size] = lat[key].p50_ms
            candidates[key].speedup[size] = lat["float"].p50_ms / lat[key].p50_ms


def _choose(model, method, layers, built, candidates, *, forced: bool) -> nn.Module:
    """The fastest candidate within tolerance, with its report attached (or float, for a speed method).

    `forced`: the caller named the backend, so its kernel is returned whatever it measured.
    """
    may_keep_float = method in SPEED_METHODS and not forced
    passing = [k for k in built if candidates[k].passed]
    best = max(passing, key=lambda k: candidates[k].score) if passing else None
    if best is None and may_keep_float:
        return _kept_float(model, method, layers, candidates, "no kernel stays within tolerance")
    if best is None:
        best = max(built, key=lambda k: candidates[k].cosine or 0.0)
        message = f"{best}: no kernel met the tolerance; this is the closest to float (see candidates)"
    elif candidates[best].speedup and candidates[best].score < MIN_SPEEDUP and may_keep_float:
        why = f"no int8 kernel is ≥ {MIN_SPEEDUP}× faster than float here"
        return _kept_float(model, method, layers, candidates, why)
    else:
        ups = ", ".join(f"{u:.2f}× at batch {b}" for b, u in candidates[best].speedup.items())
        message = f"{best}" + (f": {ups} vs float" if ups else " (speed not measured: no example inputs)")
        if candidates[best].speedup and candidates[best].score <= 1.0:
            message += " (slower than float; kept because this method or backend was asked for)"
    c = candidates[best]
    report = QuantizeReport(
        method, c.backend, c.granularity, layers, list(candidates.values()), False, message
    )
    setattr(built[best], REPORT_ATTR, report)
    return built[best]


def _kept_float(model, method, layers, candidates, why) -> nn.Module:
    kept = copy.deepcopy(model).eval()
    message = f"kept float: {why} on this machine (every alternative measured is listed)"
    setattr(
        kept,
        REPORT_ATTR,
        QuantizeReport(method, "float", None, layers, list(candidates.values()), True, message),
    )
    return kept


def choose_backend(model: nn.Module, method: str, example_inputs: Tensor, **options) -> QuantizeReport:
    """Measure every backend for `method` here and return the report only (what `quantize` would choose)."""
    return getattr(quantize(model, method, example_inputs=example_inputs, **options), REPORT_ATTR)


def report_of(model: nn.Module) -> QuantizeReport | None:
    """The QuantizeReport that `quantize` attached to its result (None for other models)."""
    return getattr(model, REPORT_ATTR, None)


# --- building one candidate ---------------------------------------------------------------------------------


def _apply(model, method, backend, granularity, layers, settings: Settings) -> nn.Module:
    """A quantized deep copy of `model` by one (method, backend, granularity); records how to rebuild it."""
    out = copy.deepcopy(model).eval()
    out.__dict__.pop(REPORT_ATTR, None)
    per_channel = granularity == "per-channel"
    options = dict(method=method, backend=backend, layers=list(layers), per_channel=per_channel)
    options["symmetric"] = settings.symmetric
    if method in ("int8-static", "qat"):
        train_data = _labelled(settings.calibration) if method == "qat" else None
        qat = settings.qat or TrainConfig(epochs=3, lr=5e-4, device="cpu", progress=False)
        observer = settings.observer
        qs.quantize_static(
            out, options, per_channel, settings.symmetric, observer, settings.cal_inputs, train_data, qat
        )
        return out
    if method not in CASTS and backend.startswith("torchao"):
        # Linear layers get torchao tensors; int4 also packs the layers its kernel cannot take (convs...)
        fits = [method != "int4-weight-only" or qb.int4_kernel_fits(out.get_submodule(n), settings.group_size)
                for n in layers]  # fmt: skip
        kernel = [n for n, ok in zip(layers, fits, strict=True) if ok]
        packed = [n for n, ok in zip(layers, fits, strict=True) if not ok]
        options.update(group_size=settings.group_size, kernel_layers=kernel, packed_layers=packed)
    provenance.record_transform(out, "quantize", **options)  # before any module changes class
    _transform(out, options)
    return out


def _transform(model: nn.Module, options: dict) -> None:
    """Change `model` in place as `options` (a recorded transform) says; at load, the weights come after."""
    method, backend, layers, per_channel = (
        options[k] for k in ("method", "backend", "layers", "per_channel")
    )
    if method in CASTS:
        qb.cast_precision(model, CASTS[method])
    elif method == "int8-dynamic" and backend == "fbgemm":
        qb.fbgemm_dynamic(model, layers, per_channel, options["symmetric"])
    elif method in ("int8-static", "qat"):
        qs.rebuild_static(model, options.get("folded", []), layers)
    else:
        group_size, kernel, packed = options["group_size"], options["kernel_layers"], options["packed_layers"]
        if kernel:
            config = qb.torchao_config(method, per_channel, group_size)
            qb.torchao_linear(model, kernel, config, bf16=method == "int4-weight-only")
        for name in packed:
            qb.replace_module(model, name, qb.PackedInt4(model.get_submodule(name), group_size))
        if backend == "torchao-compile":
            model.compile()  # in place: the state_dict keeps its keys (no `_orig_mod.`)


def replay(model: nn.Module, **options) -> None:
    """Rebuild a recorded quantization on a freshly built float model, in place; weights are loaded after.

    Called by `keiryo.load`. Static scales and zero points come from the state_dict, not from calibration.
    """
    method, backend = options["method"], options["backend"]
    if method not in BACKENDS or backend not in BACKENDS[method]:
        raise ModelError(
            f"model file records quantization '{method}' by '{backend}', which this keiryo lacks"
        )
    model.eval()
    _transform(model, options)


# --- per-layer sensitivity ----------------------------------------------------------------------------------


def sensitivity(
    model: nn.Module,
    method: str = "int8-dynamic",
    example_inputs: Tensor | None = None,
    calibration: object = None,
    *,
    backend: str | None = None,
    granularity: str | None = None,
    **options,
) -> list[LayerSensitivity]:
    """The error each layer adds when it alone is quantized, worst first: the layers worth `skip`ping.

    `options`: symmetric, group_size, observer, as in `quantize`. Backend: the first eager one for `method`.
    """
    if method == "qat":
        raise ConfigError("sensitivity trains nothing; use method='int8-static' to rank layers for qat")
    if method in CASTS:
        raise ConfigError(f"sensitivity ranks int8/int4 layers; '{method}' casts the whole model at once")
    _validate(
        model, method, backend or "auto", granularity, options.get("observer", "histogram"), 32, calibration
    )
    backend = backend or BACKENDS[method][0]
    inputs = _calibration_inputs(calibration)[:512] if calibration is not None else example_inputs
    if inputs is None:
        raise ConfigError("sensitivity needs example_inputs or calibration data to measure outputs on")
    cal_inputs = _calibration_inputs(calibration)[:MAX_CALIBRATION] if calibration is not None else None
    settings = Settings(
        options.get("symmetric", True), options.get("group_size", 32), options.get("observer", "histogram"),
        cal_inputs, calibration, None,
    )  # fmt: skip
    granularity = granularity or _granularities(method, backend, None, False)[0]
    reference = _outputs(model.eval(), inputs)
    results = []
    for name in _layers(model, method, ()):
        quantized = _apply(model, method, backend, granularity, [name], settings)
        agree = agreement(quantized, model, inputs)
        noise = (_outputs(quantized, inputs) - reference).norm()
        sqnr = float(20 * torch.log10(reference.norm() / noise)) if noise > 0 else math.inf
        layer = model.get_submodule(name)
        params = sum(p.numel() for p in layer.parameters())
        results.append(LayerSensitivity(name, type(layer).__name__, params, agree.cosine, agree.top1, sqnr))
    return sorted(results, key=lambda r: r.sqnr_db)


# --- checks and helpers -------------------------------------------------------------------------------------


def check_options(
    method: str,
    backend: str = "auto",
    granularity: str | None = None,
    observer: str = "histogram",
    group_size: int = 32,
    *,
    has_calibration: bool = True,
) -> None:
    """Reject, in one line and before any work, options `quantize` cannot run with (the model aside)."""
    if method not in BACKENDS:
        raise ConfigError(f"unknown quantization method '{method}' (known: {', '.join(METHODS)})")
    if backend != "auto" and backend not in BACKENDS[method]:
        raise ConfigError(
            f"backend '{backend}' cannot run {method} (available: auto, {', '.join(BACKENDS[method])})"
        )
    if granularity is not None and granularity not in GRANULARITIES:
        raise ConfigError(f"unknown granularity '{granularity}' (known: {', '.join(GRANULARITIES)})")
    if observer not in OBSERVERS:
        raise ConfigError(f"unknown observer '{observer}' (known: {', '.join(OBSERVERS)})")
    if method == "int4-weight-only" and group_size not in qb.INT4_GROUP_SIZES:
        raise ConfigError(f"group_size {group_size} is not supported (choose one of {qb.INT4_GROUP_SIZES})")
    if method == "int4-weight-only" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise ConfigError("int4-weight-only needs torch's CPU int4 kernel, which this torch build lacks")
    if method in ("int8-static", "qat") and not has_calibration:
        need = "labelled training data" if method == "qat" else "calibration data (a few hundred inputs)"
        raise ConfigError(f"method '{method}' needs {need}: pass calibration= (CLI: --calibration DATA)")


def _validate(model, method, backend, granularity, observer, group_size, calibration) -> None:
    """Raise a one-line error for anything `quantize` cannot do here."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize needs a torch.nn.Module, got a {type(model).__name__}")
    check_options(method, backend, granularity, observer, group_size, has_calibration=calibration is not None)
    done = [
        t.get("options", {}).get("method", t.get("kind"))
        for t in getattr(model, provenance.TRANSFORMS_ATTR, [])
    ]
    if done:
        raise ConfigError(
            f"this model was already quantized ({', '.join(map(str, done))}); "
            "quantize the float model instead"
        )
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if devices - {"cpu"} and method not in CASTS:
        where = ", ".join(sorted(devices - {"cpu"}))
        raise ConfigError(
            f"method '{method}' is not supported on {where} by this keiryo (there: {', '.join(CASTS)}; "
            "move the model to the CPU for the int8/int4 methods)"
        )


def _layers(model: nn.Module, method: str, skip: tuple[str, ...]) -> list[str]:
    """The layers `method` quantizes (all floating parameters for casts); raise if there are none."""
    known = dict(model.named_modules())
    for name in skip:
        if name not in known or not name:
            listed = ", ".join(qb.target_layers(model, qb.LINEAR + qb.CONV)) or "none"
            raise ConfigError(f"cannot skip layer {name!r}: the model has no such layer (layers: {listed})")
    if method in CASTS:
        return []
    kinds = qb.LINEAR if method in ("int8-dynamic", "int8-weight-only") else qb.LINEAR + qb.CONV
    layers = qb.target_layers(model, kinds, skip)
    if not layers:
        what = "Linear" if kinds == qb.LINEAR else "Linear or Conv1d/Conv2d"
        skipped = f" after skipping {', '.join(skip)}" if skip else ""
        raise ModelError(f"model has no {what} layers for {method} to quantize{skipped}")
    return layers


def _granularities(method: str, backend: str, asked: str | None, auto: bool) -> list[str | None]:
    """Weight granularities to try: the one asked for, else both under auto where the kernel offers both."""
    if method in CASTS or method == "int4-weight-only":
        return [None]
    if asked is not None:
        return [asked]
    if auto and backend == "fbgemm" and method != "qat":
        return ["per-tensor", "per-channel"]
    return ["per-channel"] if backend != "fbgemm" or method == "qat" else ["per-tensor"]


def _calibration_inputs(calibration: object) -> Tensor:
    """The inputs of calibration data: a tensor, an (inputs, targets) pair, a data set, splits or a name."""
    if isinstance(calibration, Tensor):
        return calibration.float()
    if isinstance(calibration, tuple):
        return calibration[0].float()
    if isinstance(calibration, DataSplits):
        return tensors_of(calibration.train)[0]
    if isinstance(calibration, (str, Path)):
        return tensors_of(load_data(calibration).train)[0]
    if isinstance(calibration, DataLoader):
        return torch.cat([batch[0] if isinstance(batch, (list, tuple)) else batch for batch in calibration])
    if isinstance(calibration, Dataset):
        return tensors_of(calibration)[0]
    raise ConfigError(
        "calibration must be a tensor, (inputs, targets), a Dataset or a data name, "
        f"got {type(calibration).__name__}"
    )


def _class_outputs(model: nn.Module, calibration: object) -> bool:
    """Whether the outputs are class scores: labelled calibration data says so, or the model's metadata."""
    if isinstance(calibration, DataSplits):
        return calibration.num_classes is not None
    if isinstance(calibration, tuple) and len(calibration) == 2:
        return not calibration[1].is_floating_point()
    if isinstance(calibration, (str, Path)):
        return load_data(calibration).num_classes is not None
    return bool(provenance.metadata_of(model).get("num_classes"))


def _labelled(calibration: object) -> DataSplits:
    """Training data for qat, as splits."""
    if isinstance(calibration, Tensor):
        raise ConfigError(
            "qat trains the model: pass labelled data (a data name, (inputs, targets) or a Dataset)"
        )
    return calibration if isinstance(calibration, DataSplits) else load_data(calibration)


def _outputs(model: nn.Module, inputs: Tensor) -> Tensor:
    with torch.inference_mode():
        return model(inputs).float()
