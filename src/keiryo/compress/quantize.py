"""Quantization that is really faster: precision casts, int8/int4 post-training, static int8, and QAT.

`quantize(model, Int8Static(observer="minmax"), calibration, example_inputs, Policy(...))` returns a
quantized copy; a method name ("int8-static") stands for its config with defaults (`qconfig.py`). Under
`Policy(backend="auto")` it builds every kernel that can run the method here, times each beside the float
model (BatchNorms folded, `fold.py`) at each batch size served, and keeps the fastest within tolerance, or
float when none is faster (`qchoose.py`); `report_of(model)` says what was chosen and why.
What each config does is one handler below (`HANDLERS`), on the kernels of `quant_backends.py` and
`quant_static.py` (and `quant_pt2e.py` for int8-static's x86-inductor backend). The same handler
rebuilds a saved model's layers at load (`replay`), given no data: scales and zero points then come from
the file. Inputs may be a Tensor, a tuple of positional arguments or a
dict of keyword arguments (`keiryo.inputs`); outputs are compared on their main tensor (logits, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from keiryo import inputs, provenance
from keiryo.compress import fold, qdata
from keiryo.compress import quant_backends as qb
from keiryo.compress import quant_pt2e as qp
from keiryo.compress import quant_static as qs
from keiryo.compress.qchoose import REPORT_ATTR, Candidate, QuantizeReport, choose, measure
from keiryo.compress.qconfig import (
    CASTS,
    QAT,
    Bf16,
    Fp16,
    Fp32,
    Int4WeightOnly,
    Int8Dynamic,
    Int8Static,
    Int8WeightOnly,
    Policy,
    QuantConfig,
    check_options,
    config_from,
)
from keiryo.errors import ConfigError, KeiryoError, ModelError, one_line
from keiryo.lm.calibrate import linearize
from keiryo.loop import fit
from keiryo.metrics import agreement

# Methods whose candidates also store embedding tables as int8 (per-row scales); the quality check covers it.
INT8_EMBEDDINGS = ("int8-dynamic", "int8-weight-only", "int8-static")
# torch.compile'd kernels take tens of seconds to build: under Policy(compile=None) only models this large
# (parameters) try them, where a faster kernel can repay that; a 2M-parameter model is quantized in seconds.
COMPILE_MIN_PARAMS = 10_000_000


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
    method: str | QuantConfig = "int8-dynamic",
    calibration: object = None,
    example_inputs: inputs.Example | None = None,
    policy: Policy | None = None,
) -> nn.Module:
    """A quantized copy of `model` by `method` (a config such as `Int8Static(observer="minmax")`, or its
    name); the original is left as it was.

    `calibration`: inputs for int8-static's ranges (a tensor, a dict, (inputs, targets), a Dataset or
    DataLoader of tuples/dicts, or a data name), labelled training data for QAT; when given, quality is
    measured on it. `example_inputs`: a Tensor, a tuple of arguments or a dict of keyword arguments, for
    timing (and quality without calibration). `policy`: backend, layers kept float, tolerance, timing effort.
    """
    policy = policy or Policy()
    config = check_options(method, policy, has_calibration=calibration is not None)
    _check_model(model, config)
    example = inputs.check_example(example_inputs) if example_inputs is not None else None
    layers = _layers(model, config, policy.skip)
    data = qdata.labelled(calibration) if isinstance(config, QAT) else None
    cal, targets = (None, None) if calibration is None else qdata.calibration_data(calibration, like=example)
    seen = cal if cal is not None else example
    folds = fold.batchnorm_pairs(model, seen) if seen is not None else []
    reference = _folded(model, folds)  # the float model every candidate is timed against: BatchNorms folded
    tables = qb.embedding_tables(model, policy.skip) if config.kind in INT8_EMBEDDINGS else []
    derived = {"folded": folds, "embeddings": tables}
    built: dict[str, nn.Module] = {}
    candidates: dict[str, Candidate] = {}
    for backend, concrete in _candidates(model, config, policy):
        granularity = getattr(concrete, "granularity", None)
        key = backend + (f" {granularity}" if granularity else "")
        candidates[key] = Candidate(backend=backend, granularity=granularity)
        if not getattr(concrete, "symmetric", True) and backend.startswith("torchao"):
            candidates[key].note = "skipped: torchao's int8 weights are symmetric only"
            continue
        try:
            built[key] = build(model, concrete, backend, layers, data if data is not None else cal, derived)
        except (RuntimeError, AssertionError, NotImplementedError, ValueError) as exc:
            candidates[key].note = f"failed: {one_line(exc, 160)}"
    if not built:
        notes = "; ".join(f"{k}: {c.note}" for k, c in candidates.items())
        raise ModelError(f"no backend could quantize this model by {config.kind} ({notes})")
    quality_inputs = cal if cal is not None else example
    scores = policy.class_scores if policy.class_scores is not None else qdata.class_scores(model, targets)
    output = measure(
        reference, built, candidates, (quality_inputs, scores, isinstance(config, QAT)), example, policy
    )
    chosen = choose(reference, config.kind, layers, built, candidates, policy)
    report_of(chosen).output = output
    return chosen


def choose_backend(
    model: nn.Module,
    method: str | QuantConfig,
    example_inputs: inputs.Example,
    calibration: object = None,
    policy: Policy | None = None,
) -> QuantizeReport:
    """Measure every backend for `method` here and return the report only (what `quantize` would choose)."""
    return report_of(quantize(model, method, calibration, example_inputs, policy))


def report_of(model: nn.Module) -> QuantizeReport | None:
    """The QuantizeReport that `quantize` attached to its result (None for other models)."""
    return getattr(model, REPORT_ATTR, None)


# --- one handler per config: builds a candidate from data, or rebuilds a saved one without ------------------


def _cast(model: nn.Module, config: QuantConfig, plan: dict, data: object) -> None:
    qb.cast_precision(model, CASTS[config.kind])


def _int8_dynamic(model: nn.Module, config: Int8Dynamic, plan: dict, data: object) -> None:
    if plan["backend"] == "fbgemm":
        qb.fbgemm_dynamic(model, plan["layers"], config.granularity == "per-channel", config.symmetric)
    else:
        _torchao(model, config, plan, data)


def _torchao(model: nn.Module, config: QuantConfig, plan: dict, data: object) -> None:
    """torchao tensors on the Linear layers its kernel takes; int4 packs the others (convolutions...)."""
    group_size = getattr(config, "group_size", 32)
    if plan["kernel_layers"]:
        per_channel = getattr(config, "granularity", None) == "per-channel"
        tao = qb.torchao_config(config.kind, per_channel, group_size)
        qb.torchao_linear(model, plan["kernel_layers"], tao, bf16=isinstance(config, Int4WeightOnly))
    for name in plan["packed_layers"]:
        qb.replace_module(model, name, qb.PackedInt4(model.get_submodule(name), group_size))
    if plan["backend"] == "torchao-compile":
        model.compile()  # in place: the state_dict keeps its keys (no `_orig_mod.`)


def _static(model: nn.Module, config: Int8Static, plan: dict, data: object) -> nn.Module | None:
    """Calibrate activation ranges on `data` (None: empty layers the file fills); x86-inductor: PT2E."""
    if plan["backend"] == "x86-inductor":
        return _pt2e(model, plan, data)
    if data is None:
        qs.rebuild_static(model, plan["layers"])
        return None
    per_channel = config.granularity == "per-channel"
    qs.calibrate_static(model, plan["layers"], data, config.observer, per_channel, config.symmetric)
    return None


def _pt2e(model: nn.Module, plan: dict, data: object) -> nn.Module:
    """The whole model as a PT2E int8 program (x86 quantizer; the plan's layers are not used): calibrated on
    `data`, or rebuilt from what the plan recorded (activation ranges, input shapes) when loading."""
    if data is None:
        return qp.rebuild(model, plan["pt2e"])
    program, plan["pt2e"] = qp.quantize_pt2e(model, data, reduce_range=not torch.cpu._is_vnni_supported())
    return program


def _qat(model: nn.Module, config: QAT, plan: dict, data: object) -> None:
    """Train with fake quantization on `data` (labelled splits), convert to static int8."""
    if data is None:
        qs.rebuild_static(model, plan["layers"])
        return
    qs.prepare_qat(model, plan["layers"], config.granularity == "per-channel", config.symmetric)
    fit(model, data, config.train)
    model.eval()
    qs.convert_qat(model, plan["layers"])


# A handler changes the model in place, or returns the module that replaces it (x86-inductor's program).
Handler = Callable[[nn.Module, QuantConfig, dict, object], nn.Module | None]
HANDLERS: dict[type, Handler] = {
    Fp32: _cast,
    Fp16: _cast,
    Bf16: _cast,
    Int8Dynamic: _int8_dynamic,
    Int8WeightOnly: _torchao,
    Int4WeightOnly: _torchao,
    Int8Static: _static,
    QAT: _qat,
}


def build(
    model: nn.Module,
    config: QuantConfig,
    backend: str,
    layers: list[str],
    data: object,
    derived: dict | None = None,
) -> nn.Module:
    """A deep copy of `model` quantized by one (config, backend), after what `derived` names: BatchNorms to
    fold ("folded", from `fold.batchnorm_pairs`) and embedding tables to store as int8 ("embeddings").
    Records how to rebuild it (before any module changes class): the config's kind and `asdict`, the
    backend, the layers and what was derived (those, int4 kernel/packed layers, whether GPT-2's Conv1D
    layers became Linear, a PT2E program's activation ranges)."""
    out = copy.deepcopy(model).eval()
    out.__dict__.pop(REPORT_ATTR, None)
    plan = {"method": config.kind, "config": dataclasses.asdict(config), "backend": backend}
    plan["layers"] = list(layers)
    plan["folded"] = [list(pair) for pair in (derived or {}).get("folded", [])]
    plan["embeddings"] = list((derived or {}).get("embeddings", []))
    if backend.startswith("torchao"):
        group_size = getattr(config, "group_size", 32)
        fits = [
            not isinstance(config, Int4WeightOnly) or qb.int4_kernel_fits(out.get_submodule(n), group_size)
            for n in layers
        ]
        plan["kernel_layers"] = [n for n, ok in zip(layers, fits, strict=True) if ok]
        plan["packed_layers"] = [n for n, ok in zip(layers, fits, strict=True) if not ok]
    plan["linearize"] = any(qb.is_conv1d(out.get_submodule(n)) for n in layers)
    provenance.record_transform(out, "quantize", **plan)
    result = _apply(out, config, plan, data)
    if result is not out:  # a new module (PT2E program): it carries the provenance, with what was derived
        getattr(out, provenance.TRANSFORMS_ATTR)[-1]["options"] = plan
        result.__dict__.update({k: v for k, v in vars(out).items() if k.startswith("_keiryo")})
    return result


def _apply(model: nn.Module, config: QuantConfig, plan: dict, data: object) -> nn.Module:
    """Recorded BatchNorm folds and int8 embedding tables first, GPT-2's Conv1D layers become Linear when
    the plan says so, then the config's handler runs; returns the model, or the module that replaced it."""
    fold.apply_folds(model, plan.get("folded") or [])
    qb.int8_embeddings(model, plan.get("embeddings") or [])
    if plan.get("linearize"):
        linearize(model)
    return HANDLERS[type(config)](model, config, plan, data) or model


def replay(model: nn.Module, **plan: object) -> nn.Module:
    """Rebuild a recorded quantization on a freshly built float model, in place (or return the module that
    replaces it: a PT2E program); weights are loaded after.

    Called by `keiryo.load` with what `build` recorded. Static scales and zero points come from the
    state_dict, not from calibration.
    """
    try:
        config = config_from(str(plan["method"]), dict(plan["config"]))
        backend = plan["backend"]
    except (KeyError, TypeError, ValueError, KeiryoError) as exc:
        raise ModelError(
            f"model file records a quantization this keiryo cannot rebuild ({one_line(exc)})"
        ) from exc
    if backend not in config.backends:
        raise ModelError(
            f"model file records quantization '{config.kind}' by '{backend}', which this keiryo lacks"
        )
    model.eval()
    return _apply(model, config, plan, None)


# --- per-layer sensitivity ----------------------------------------------------------------------------------


def sensitivity(
    model: nn.Module,
    method: str | QuantConfig = "int8-dynamic",
    example_inputs: inputs.Example | None = None,
    calibration: object = None,
    backend: str | None = None,
) -> list[LayerSensitivity]:
    """The error each layer adds when it alone is quantized, worst first: the layers worth skipping
    (`Policy(skip=...)`). Backend: the first eager one for the method, unless named."""
    config = check_options(method, Policy(backend=backend or "auto"), has_calibration=calibration is not None)
    if isinstance(config, QAT):
        raise ConfigError("sensitivity trains nothing; use method='int8-static' to rank layers for qat")
    if config.kind in CASTS:
        raise ConfigError(
            f"sensitivity ranks int8/int4 layers; '{config.kind}' casts the whole model at once"
        )
    _check_model(model, config)
    backend = backend or config.backends[0]
    cal = qdata.calibration_data(calibration)[0] if calibration is not None else None
    x = inputs.take(cal, 0, 512) if cal is not None else example_inputs
    if x is None:
        raise ConfigError("sensitivity needs example_inputs or calibration data to measure outputs on")
    x = inputs.check_example(x)
    config = next(c for b, c in _concrete(config, backend, auto=False))
    reference = _outputs(model.eval(), x)
    results = []
    folds = fold.batchnorm_pairs(model, x)
    for name in _layers(model, config, ()):
        quantized = build(model, config, backend, [name], cal, {"folded": folds})
        agree = agreement(quantized, model, x)
        noise = (_outputs(quantized, x) - reference).norm()
        sqnr = float(20 * torch.log10(reference.norm() / noise)) if noise > 0 else math.inf
        layer = model.get_submodule(name)
        params = sum(p.numel() for p in layer.parameters())
        results.append(LayerSensitivity(name, type(layer).__name__, params, agree.cosine, agree.top1, sqnr))
    return sorted(results, key=lambda r: r.sqnr_db)


# --- checks and helpers -------------------------------------------------------------------------------------


def _check_model(model: nn.Module, config: QuantConfig) -> None:
    """Raise a one-line error for a model `config` cannot quantize here."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize needs a torch.nn.Module, got a {type(model).__name__}")
    done = [
        t.get("options", {}).get("method", t.get("kind"))
        for t in getattr(model, provenance.TRANSFORMS_ATTR, [])
        if t.get("kind") != "fold_batchnorm"  # folding keeps float: the folded model quantizes like any
    ]
    if done:
        raise ConfigError(
            f"this model was already quantized ({', '.join(map(str, done))}); "
            "quantize the float model instead"
        )
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if devices - {"cpu"} and config.kind not in CASTS:
        where = ", ".join(sorted(devices - {"cpu"}))
        raise ConfigError(
            f"method '{config.kind}' is not supported on {where} by this keiryo (there: {', '.join(CASTS)}; "
            "move the model to the CPU for the int8/int4 methods)"
        )


def _layers(model: nn.Module, config: QuantConfig, skip: tuple[str, ...]) -> list[str]:
    """The layers `config` quantizes (none for casts, which change every parameter); raise if none."""
    known = dict(model.named_modules())
    for name in skip:
        if name not in known or not name:
            listed = ", ".join(qb.target_layers(model, qb.LINEAR + qb.CONV)) or "none"
            raise ConfigError(f"cannot skip layer {name!r}: the model has no such layer (layers: {listed})")
    if config.kind in CASTS:
        return []
    kinds = qb.LINEAR if isinstance(config, (Int8Dynamic, Int8WeightOnly)) else qb.LINEAR + qb.CONV
    layers = qb.target_layers(model, kinds, skip)
    if not layers:
        what = "Linear" if kinds == qb.LINEAR else "Linear or Conv1d/Conv2d"
        skipped = f" after skipping {', '.join(skip)}" if skip else ""
        raise ModelError(f"model has no {what} layers for {config.kind} to quantize{skipped}")
    return layers


def _candidates(model: nn.Module, config: QuantConfig, policy: Policy) -> Iterator[tuple[str, QuantConfig]]:
    """(backend, config with a concrete granularity) for every kernel to build: the one asked for, or under
    auto every backend for the method (compiled ones only where they can pay off, see COMPILE_MIN_PARAMS)."""
    if policy.backend != "auto":
        yield from _concrete(config, policy.backend, auto=False)
        return
    compiled = policy.compile
    if compiled is None:
        compiled = sum(p.numel() for p in model.parameters()) >= COMPILE_MIN_PARAMS
    for backend in config.backends:
        if backend == "x86-inductor" and policy.skip:
            continue  # the whole program or nothing: layers kept float are for fbgemm
        if compiled or not (backend.endswith("-compile") or backend == "x86-inductor"):
            yield from _concrete(config, backend, auto=True)


def _concrete(config: QuantConfig, backend: str, auto: bool) -> Iterator[tuple[str, QuantConfig]]:
    """The weight granularities to try: the one asked for, else both under auto where fbgemm offers both
    (QAT and the other kernels: per-channel; fbgemm named explicitly: per-tensor)."""
    if not hasattr(config, "granularity"):
        yield backend, config
        return
    if config.granularity is not None:
        choices = [config.granularity]
    elif auto and backend == "fbgemm" and not isinstance(config, QAT):
        choices = ["per-tensor", "per-channel"]
    else:
        choices = ["per-channel" if backend != "fbgemm" or isinstance(config, QAT) else "per-tensor"]
    for granularity in choices:
        yield backend, dataclasses.replace(config, granularity=granularity)


def _folded(model: nn.Module, folds: list[list[str]]) -> nn.Module:
    """An eval copy of the float model with `folds` applied (recorded, so a kept float model saves)."""
    out = copy.deepcopy(model).eval()
    out.__dict__.pop(REPORT_ATTR, None)
    if folds:
        provenance.record_transform(out, "fold_batchnorm", pairs=[list(p) for p in folds])
        fold.apply_folds(out, folds)
    return out


def _outputs(model: nn.Module, example: inputs.Example) -> torch.Tensor:
    with torch.inference_mode():
        return inputs.forward(model, example).float()
