"""The fastest way to run a model that keeps its outputs: measured on this machine, never slower than float.

`deploy(model, example_inputs, calibration, DeployConfig(...), out)` builds every candidate that can run the
model here — PyTorch eager float with BatchNorm folded (always), channels-last, compiled (inductor with
freezing), int8 (torch.ao eager, PT2E + inductor), and each installed deployment runtime (ONNX Runtime,
OpenVINO with NNCF int8, ExecuTorch with XNNPACK: `keiryo.runtimes`) —, compares each one's outputs with the
float model's (cosine, and top-1 agreement for class scores: `Policy`'s tolerance), times those within
tolerance interleaved with float at each batch size asked, and keeps the fastest per batch size. Float is
timed in the same loop and a candidate must beat it by `min_speedup` to replace it, so the choice is never
slower than float in that run. When the winners differ by batch size, each one's artifact is written and
the report says which serves which. `out` receives the winners' artifacts (a keiryo model file or a
torch.export `.pt2`, `.onnx`, OpenVINO IR, `.pte`; each loaded back and checked), `report.md` and
`report.json`, all at once: a run that fails leaves an existing `out` as it was. Rendering: `deploy_report`;
files: `deploy_files`.
(This module is `deployment`, not `deploy`, so that `keiryo.deploy` is always the function.)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from keiryo import inputs, measuring
from keiryo.compress import qdata
from keiryo.compress.fold import fold_batchnorm
from keiryo.compress.qconfig import Policy
from keiryo.compress.quantize import quantize, report_of
from keiryo.deploy_files import Unwritable, write_folder
from keiryo.deploy_report import FLOAT, Candidate, DeployReport, progress_bar
from keiryo.devices import channels_last, compile_frozen
from keiryo.errors import (
    ConfigError,
    KeiryoError,
    MissingDependency,
    check_whole,
    is_finite,
    one_line,
)
from keiryo.metrics import agreement, batch_of, threads, time_models
from keiryo.runtimes import RUNTIME_CANDIDATES, build, require
from keiryo.runtimes.build import CANDIDATES as RUNTIME_KINDS
from keiryo.runtimes.build import RUNTIMES

# PyTorch candidates: name -> (precision, needs calibration data)
TORCH_CANDIDATES = {
    FLOAT: ("fp32", False),
    "torch-channels-last": ("fp32", False),
    "torch-compile": ("fp32", False),
    "torch-int8-dynamic": ("int8-dynamic", False),
    "torch-int8-static": ("int8-static", True),
    "torch-pt2e-int8": ("int8-static", True),
}
CANDIDATES = (*TORCH_CANDIDATES, *RUNTIME_CANDIDATES)


@dataclass
class DeployConfig:
    """What deploy measures and how it chooses.

    `batch_sizes`: the batch sizes served, each timed (the choice is per batch size). `candidates`: names
    from CANDIDATES to try (None: all; float is always tried). Tolerance as `Policy`: cosine ≥ `min_cosine`,
    top-1 agreement ≥ `min_top1` when outputs are class scores (`class_scores` None: from integer labels in
    the calibration data or the model's recorded classes). `min_speedup`: how much faster than float a
    candidate must be at a batch size to replace it there (timing noise on a shared CPU is a few percent).
    `samples`: calibration inputs quality is measured on. `runs`: timed calls per batch size (in blocks:
    `metrics.time_models`); `threads`: intra-op threads for every runtime (None: torch's current count).
    `also`: runtime candidates whose artifact is written whether or not they win (the demo's ExecuTorch
    `.pte`).
    """

    batch_sizes: tuple[int, ...] = (1, 64)
    candidates: tuple[str, ...] | None = None
    min_cosine: float = Policy.min_cosine
    min_top1: float = Policy.min_top1
    class_scores: bool | None = None
    min_speedup: float = 1.05
    samples: int = 256
    runs: int = 30
    threads: int | None = None
    also: tuple[str, ...] = ()
    progress: bool = True

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(sorted(set(self.batch_sizes)))
        if not self.batch_sizes:
            raise ConfigError("deploy needs at least one batch size")
        for b in self.batch_sizes:
            check_whole("batch size", b, 1)
        check_whole("runs", self.runs, 1)
        check_whole("samples", self.samples, 1)
        if self.threads is not None:
            check_whole("threads", self.threads, 1)
        for name in ("min_cosine", "min_top1", "min_speedup"):
            if not is_finite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        self.candidates = None if self.candidates is None else tuple(self.candidates)
        self.also = tuple(self.also)
        for names, allowed, what in (
            (self.candidates or (), CANDIDATES, "candidate"),
            (self.also, RUNTIME_CANDIDATES, "runtime candidate in also"),
        ):
            for name in names:
                if name not in allowed:
                    raise ConfigError(f"unknown {what} '{name}' (choose {', '.join(allowed)})")


def candidates_of(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Candidate names from families and names: a runtime ('torch', 'onnxruntime', 'openvino', 'executorch')
    stands for all of its candidates ('openvino' → openvino, openvino-bf16, openvino-int8), '<runtime>-fp32'
    for its float one alone, any other candidate name for itself; anything else is refused in one line."""
    families = {"torch": tuple(TORCH_CANDIDATES)} | {
        runtime: tuple(n for n, (r, _) in RUNTIME_KINDS.items() if r == runtime) for runtime in RUNTIMES
    }
    exact = {f"{family}-fp32": family for family in families} | {
        c: c for c in CANDIDATES if c not in families
    }
    out: list[str] = []
    for name in (n.strip() for n in names if n.strip()):
        if name not in families and name not in exact:
            raise ConfigError(
                f"unknown runtime or candidate '{name}' (choose {', '.join([*families, *exact])})"
            )
        out += families.get(name, (exact.get(name),))
    return tuple(dict.fromkeys(out))


def deploy(
    model: nn.Module,
    example_inputs: inputs.Example,
    calibration: object = None,
    config: DeployConfig | None = None,
    out: str | Path | None = None,
) -> DeployReport:
    """Measure every way to run `model` here and keep the fastest within tolerance at each batch size.

    `example_inputs` (a Tensor, a tuple of arguments or a dict of keyword arguments) fix the inputs' form;
    they are repeated to each batch size timed. `calibration` (inputs, (inputs, targets), a Dataset, a data
    name: as `quantize` takes) gives static int8 its ranges and is what quality is measured on (without it,
    the example inputs, and static int8 candidates are skipped). `out`: a folder for the winners' artifacts
    and the report (replaced whole at the end; None writes nothing).
    """
    config = config or DeployConfig()
    example = inputs.check_example(example_inputs)
    out = _check_out(out)
    cal, targets = (None, None) if calibration is None else qdata.calibration_data(calibration, like=example)
    quality_inputs = _quality_inputs(cal if cal is not None else example, config)
    model = model.eval()
    scores = config.class_scores if config.class_scores is not None else qdata.class_scores(model, targets)
    tolerance = f"cosine ≥ {config.min_cosine}" + (f", top-1 ≥ {config.min_top1}" if scores else "")
    with threads(config.threads) as n:
        built, results, messages = _build_all(model, example, cal, config, n)
        for name in list(built):
            _quality(name, built, results[name], (model, quality_inputs), config, scores)
        _time(built, results, example, config)
    chosen = _choose(results, config)
    report = DeployReport(list(results.values()), chosen, measuring.machine(), n, tolerance, messages)
    report.models = built
    if out is not None:
        _write(report, results, config, out, (model, example, quality_inputs))
    report.messages += report.choice_lines()
    return report


def _write(
    report: DeployReport, results: dict[str, Candidate], config: DeployConfig, out: Path, check: tuple
) -> None:
    """Write the winners' artifacts. A winner that cannot be written (torch.ao int8 of a model without a
    keiryo factory: its packed weights neither replay nor export) gives way to the next fastest at its
    batch sizes, and the report says so; float, or an artifact asked for in `also`, failing is an error."""
    while True:
        names = [*report.chosen.values(), *[n for n in config.also if n in report.models]]
        try:
            write_folder(report, names, out, check)
            return
        except Unwritable as exc:
            if exc.name == FLOAT or exc.name in config.also:
                raise
            c = results[exc.name]
            c.writable = False
            c.note = (c.note + "; " if c.note else "") + f"not written: {one_line(exc, 160)}"
            report.messages.append(f"{exc.name} was fastest but cannot be written: the next fastest serves")
            report.chosen = _choose(results, config)


def _check_out(out: str | Path | None) -> Path | None:
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"out '{out}' is a file; give a folder for the deployed artifacts and report")
    return None if out is None else Path(out)


def _quality_inputs(source: inputs.Example, config: DeployConfig) -> inputs.Example:
    """Up to `samples` inputs, cut to whole batches of the largest batch size when there are enough: a
    compiled candidate then compiles no shape it will not also be timed at."""
    n = min(inputs.batch_size(source), config.samples)
    big = max(config.batch_sizes)
    return inputs.take(source, 0, n - n % big if n >= big else n)


def _wanted(config: DeployConfig) -> list[str]:
    """Float first, then the candidates asked for (all by default) and those whose artifact is wanted."""
    return list(dict.fromkeys([FLOAT, *(config.candidates or CANDIDATES), *config.also]))


def _build_all(
    model: nn.Module, example: inputs.Example, cal: inputs.Example | None, config: DeployConfig, n: int
) -> tuple[dict[str, nn.Module], dict[str, Candidate], list[str]]:
    """Build every wanted candidate (a progress bar over them); a missing runtime is skipped in one line."""
    folded = fold_batchnorm(model, example)
    built: dict[str, nn.Module] = {}
    results: dict[str, Candidate] = {}
    messages: list[str] = []
    missing: set[str] = set()
    wanted = _wanted(config)
    with progress_bar(config.progress, len(wanted)) as step:
        for name in wanted:
            step(name)
            runtime, precision = _kind(name)
            results[name] = c = Candidate(name, runtime, precision)
            why = _unavailable(name, folded, cal, missing)
            if why:
                c.note = f"skipped: {why}"
                continue
            started = time.perf_counter()
            try:
                built[name] = _build_one(name, folded, example, cal, n)
            except MissingDependency as exc:
                missing.add(runtime)
                messages.append(f"skipped {runtime}: {one_line(exc)}")
                c.note = "skipped: not installed"
                continue
            except (KeiryoError, RuntimeError, ValueError, NotImplementedError, AssertionError) as exc:
                c.note = f"failed: {one_line(exc, 160)}"
                messages.append(f"{name} could not be built: {one_line(exc, 160)}")
                continue
            c.build_s = time.perf_counter() - started
            kept = report_of(built[name])
            if kept is not None and kept.kept_float:
                c.note = f"quantize kept float: {kept.message}"
                del built[name]
                continue
            c.bytes = measuring.file_bytes(built[name])
    return built, results, messages


def _kind(name: str) -> tuple[str, str]:
    return ("torch", TORCH_CANDIDATES[name][0]) if name in TORCH_CANDIDATES else RUNTIME_KINDS[name]


def _unavailable(name: str, folded: nn.Module, cal: inputs.Example | None, missing: set[str]) -> str:
    """Why a candidate is not built here ('' when it is)."""
    if name in RUNTIME_KINDS and RUNTIME_KINDS[name][0] in missing:
        return "not installed"
    if name in TORCH_CANDIDATES and TORCH_CANDIDATES[name][1] and cal is None:
        return "needs calibration data"
    if name == "torch-channels-last" and not any(isinstance(m, nn.Conv2d) for m in folded.modules()):
        return "no 2-D convolutions"
    return ""


def _build_one(
    name: str, folded: nn.Module, example: inputs.Example, cal: inputs.Example | None, n: int
) -> nn.Module:
    """One candidate, built from the BatchNorm-folded float model."""
    policy = Policy(runs=10, time_limit=5.0, batch_sizes=(1,))  # quantize's own pick among its kernels
    builders: dict[str, Callable[[], nn.Module]] = {
        FLOAT: lambda: folded,
        "torch-channels-last": lambda: channels_last(copy.deepcopy(folded)),
        "torch-compile": lambda: compile_frozen(folded),
        "torch-int8-dynamic": lambda: quantize(folded, "int8-dynamic", cal, example, policy),
        "torch-int8-static": lambda: quantize(folded, "int8-static", cal, example, _forced(policy, "fbgemm")),
        "torch-pt2e-int8": lambda: quantize(
            folded, "int8-static", cal, example, _forced(policy, "x86-inductor")
        ),
    }
    if name in builders:
        return builders[name]()
    require(RUNTIME_KINDS[name][0])
    return build(folded, example, name, calibration=cal, threads=n)


def _forced(policy: Policy, backend: str) -> Policy:
    return Policy(backend=backend, runs=policy.runs, time_limit=policy.time_limit, batch_sizes=(1,))


def _quality(
    name: str, built: dict[str, nn.Module], c: Candidate, check: tuple, config: DeployConfig, scores: bool
) -> None:
    """A candidate's outputs against the float model's (cosine, top-1 agreement): the tolerance gate."""
    reference, quality_inputs = check
    try:
        agree = _agreement(built[name], reference, quality_inputs, max(config.batch_sizes))
    except (KeiryoError, RuntimeError, ValueError) as exc:
        c.note = f"failed to run: {one_line(exc, 160)}"
        del built[name]
        return
    c.cosine, c.top1 = agree
    top1_ok = not scores or (c.top1 or 0.0) >= config.min_top1
    c.within_tolerance = name == FLOAT or (c.cosine >= config.min_cosine and top1_ok)
    if not c.within_tolerance:
        c.note = (c.note + "; " if c.note else "") + "outside tolerance"


def _agreement(
    model: nn.Module, reference: nn.Module, quality_inputs: inputs.Example, chunk: int
) -> tuple[float, float | None]:
    """Mean cosine and top-1 agreement over `quality_inputs`, run `chunk` samples at a time (the shapes
    the candidate is timed at), by `metrics.agreement`."""
    total = inputs.batch_size(quality_inputs)
    cosine, top1, seen = 0.0, 0.0, 0
    for start in range(0, total, chunk):
        part = inputs.take(quality_inputs, start, start + chunk)
        agree = agreement(model, reference, part)
        cosine += agree.cosine * agree.samples
        top1 = None if agree.top1 is None else (top1 or 0.0) + agree.top1 * agree.samples
        seen += agree.samples
    return cosine / seen, None if top1 is None else top1 / seen


RUNOFF_WITHIN = 1.15  # candidates this close to the fastest at a batch size are timed again, head to head


def _time(
    built: dict[str, nn.Module], results: dict[str, Candidate], example: inputs.Example, config: DeployConfig
) -> None:
    """p50 of every candidate within tolerance, side by side with float, at each batch size; then a runoff:
    those within RUNOFF_WITHIN of the fastest are timed again with float, twice as long, and ranked on that
    (two runtimes 10% apart at 40 µs swapped places between one timing and the next)."""
    timed = {name: built[name] for name, c in results.items() if c.within_tolerance and name in built}
    for b in config.batch_sizes:
        batch = batch_of(example, b)
        rounds = [time_models(timed, batch, runs=config.runs, warmup=min(5, config.runs))]
        close = RUNOFF_WITHIN * min(lat.p50_ms for lat in rounds[0].values())
        finalists = [n for n, lat in rounds[0].items() if lat.p50_ms <= close and n != FLOAT]
        if len(finalists) > 1:
            finals = {n: timed[n] for n in (FLOAT, *finalists)}
            rounds.append(time_models(finals, batch, runs=2 * config.runs, warmup=0))
            for name in finalists:
                results[name].runoff.append(b)
        for latency in rounds:  # each speed-up against float in the same timing
            for name, lat in latency.items():
                results[name].p50_ms[b] = lat.p50_ms
                results[name].speedup[b] = latency[FLOAT].p50_ms / lat.p50_ms


def _choose(results: dict[str, Candidate], config: DeployConfig) -> dict[int, str]:
    """Per batch size: the fastest within tolerance (and writable), if it beats float by `min_speedup`;
    else float."""
    chosen = {}
    for c in results.values():
        c.chosen_for = []
    for b in config.batch_sizes:
        best = min((c for c in results.values() if b in c.p50_ms and c.writable), key=lambda c: c.p50_ms[b])
        chosen[b] = best.name if best.speedup[b] >= config.min_speedup else FLOAT
        results[chosen[b]].chosen_for.append(b)
    return chosen
