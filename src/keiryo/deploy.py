"""The fastest way to run a model that keeps its outputs: measured on this machine, never slower than float.

`deploy(model, example_inputs, calibration, DeployConfig(...), out)` builds every candidate that can run the
model here — PyTorch eager float with BatchNorm folded (always), PyTorch int8 (keiryo.quantize), and each
installed deployment runtime (ONNX Runtime, OpenVINO with NNCF int8, ExecuTorch with XNNPACK: see
`keiryo.runtimes`) —, compares each one's outputs with the float model's (cosine, and top-1 agreement for
class scores: `Policy`'s tolerance), times those within tolerance interleaved with float at each batch size
asked, and keeps the fastest per batch size. Float is timed in the same loop, so the choice is never slower
than float in that run: a candidate must beat float by `min_speedup` to replace it. When the winners differ
by batch size, each one's artifact is written and the report says which serves which. The folder `out`
receives the winners' artifacts (a keiryo model file, `.onnx`, OpenVINO IR, `.pte`, each loaded back and
checked), `report.md` and `report.json`, all at once: a run that fails leaves an existing `out` as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from keiryo import artifacts, inputs, measuring
from keiryo.compress import qdata
from keiryo.compress.fold import fold_batchnorm
from keiryo.compress.qconfig import Policy
from keiryo.compress.quantize import quantize, report_of
from keiryo.errors import ConfigError, KeiryoError, ModelError, check_whole, is_finite, one_line
from keiryo.metrics import agreement, batch_of, threads, time_models
from keiryo.runtimes import RUNTIME_CANDIDATES, Runner, RuntimeMissing, build, load_runtime, require
from keiryo.runtimes.build import CANDIDATES as RUNTIME_PRECISIONS
from keiryo.runtimes.build import RUNTIMES

FLOAT = "torch"
# PyTorch candidates: name -> (precision, whether it needs calibration data)
TORCH_CANDIDATES = {
    FLOAT: ("fp32", False),
    "torch-int8-dynamic": ("int8-dynamic", False),
    "torch-int8-static": ("int8-static", True),
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
    `runs`: timed interleaved rounds per batch size; `threads`: intra-op threads for every runtime (None:
    torch's current count). `also`: runtime candidates whose artifact is written whether or not they win
    (the demo's ExecuTorch `.pte`).
    """

    batch_sizes: tuple[int, ...] = (1, 64)
    candidates: tuple[str, ...] | None = None
    min_cosine: float = Policy.min_cosine
    min_top1: float = Policy.min_top1
    class_scores: bool | None = None
    min_speedup: float = 1.05
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
        if self.threads is not None:
            check_whole("threads", self.threads, 1)
        for name in ("min_cosine", "min_top1", "min_speedup"):
            if not is_finite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        for names, what in ((self.candidates, "candidates"), (self.also, "also")):
            for name in names or ():
                allowed = CANDIDATES if what == "candidates" else RUNTIME_CANDIDATES
                if name not in allowed:
                    raise ConfigError(f"unknown candidate '{name}' in {what} (choose {', '.join(allowed)})")


@dataclass
class Candidate:
    """One way to run the model, as built and measured here."""

    name: str
    runtime: str
    precision: str
    cosine: float | None = None
    top1: float | None = None
    within_tolerance: bool = False
    p50_ms: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)  # float p50 / this p50, same run
    bytes: int | None = None
    build_s: float = 0.0
    chosen_for: list[int] = field(default_factory=list)  # the batch sizes it serves
    artifact: str | None = None  # file written in `out`
    note: str = ""


@dataclass
class DeployReport:
    """Every candidate measured, the choice per batch size, the artifacts written and the machine."""

    candidates: list[Candidate]
    chosen: dict[int, str]  # batch size -> candidate name
    cpu: str
    threads: int
    tolerance: str
    messages: list[str]
    out: str | None = None
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False)  # built candidates (not saved)

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)

    def model_for(self, batch_size: int) -> nn.Module:
        """The chosen model for a batch size timed (a PyTorch module or a runtime Runner)."""
        return self.models[self.chosen[batch_size]]

    def artifact_bytes(self) -> int | None:
        """Bytes of the chosen model at the largest batch size (its artifact's size)."""
        return self.candidate(self.chosen[max(self.chosen)]).bytes

    def to_json(self) -> str:
        blob = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "models"}
        blob["candidates"] = [asdict(c) for c in self.candidates]
        return json.dumps(blob, indent=2, default=str)

    def markdown(self) -> str:
        sizes = sorted(self.chosen)
        head = " | ".join(f"p50 b{b} (ms)" for b in sizes)
        lines = [
            "# keiryo deploy",
            "",
            f"CPU: {self.cpu}; {self.threads} threads for every runtime. Tolerance: {self.tolerance}.",
            "",
            *[f"- {m}" for m in self.messages],
            "",
            f"| candidate | runtime | precision | cosine | top-1 | in tolerance | {head} | file | chosen "
            "| note |",
            "|" + "---|" * (9 + len(sizes)),
        ]
        for c in self.candidates:
            times = " | ".join(_ms(c, b) for b in sizes)
            chosen = ", ".join(f"b{b}" for b in c.chosen_for) or "-"
            lines.append(
                f"| {c.name} | {c.runtime} | {c.precision} | {_num(c.cosine, 4)} | {_num(c.top1, 3)} | "
                f"{'yes' if c.within_tolerance else 'no'} | {times} | {_size(c.bytes)} | {chosen} | "
                f"{c.note} |"
            )
        return "\n".join(lines) + "\n"


def _ms(c: Candidate, b: int) -> str:
    if b not in c.p50_ms:
        return "-"
    return f"{c.p50_ms[b]:.3f} ({c.speedup[b]:.2f}×)"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


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
    the example inputs: int8-static candidates are then skipped). `out`: a folder for the winners'
    artifacts and the report (replaced whole at the end; None writes nothing).
    """
    config = config or DeployConfig()
    example = inputs.check_example(example_inputs)
    if out is not None:
        out = _check_out(Path(out))
    cal, targets = qdata.calibration_data(calibration) if calibration is not None else (None, None)
    quality_inputs = cal if cal is not None else example
    model = model.eval()
    scores = config.class_scores if config.class_scores is not None else qdata.class_scores(model, targets)
    tolerance = f"cosine ≥ {config.min_cosine}" + (f", top-1 ≥ {config.min_top1}" if scores else "")
    with threads(config.threads) as n:
        built, results, messages = _build_all(model, example, cal, config, n)
        _quality(model, built, results, quality_inputs, config, scores)
        _time(built, results, example, config)
    chosen = _choose(results, config)
    messages += _choice_lines(results, chosen)
    report = DeployReport(
        list(results.values()), chosen, measuring.machine(), n, tolerance, messages, models=built
    )
    if out is not None:
        _write(report, built, config, out, (model, quality_inputs))
    return report


def _check_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out '{out}' is a file; give a folder for the deployed artifacts and report")
    return out


def _wanted(config: DeployConfig) -> list[str]:
    """Float first, then the candidates asked for (all by default) and those whose artifact is wanted."""
    names = [FLOAT, *(config.candidates or CANDIDATES), *config.also]
    return list(dict.fromkeys(names))


def _build_all(
    model: nn.Module, example: inputs.Example, cal: inputs.Example | None, config: DeployConfig, n: int
) -> tuple[dict[str, nn.Module], dict[str, Candidate], list[str]]:
    """Build every wanted candidate (a progress bar over them); missing runtimes are skipped in one line."""
    folded = fold_batchnorm(model, example)
    built: dict[str, nn.Module] = {}
    results: dict[str, Candidate] = {}
    messages: list[str] = []
    missing: dict[str, str] = {}
    wanted = _wanted(config)
    with _bar(config.progress, len(wanted)) as step:
        for name in wanted:
            step(name)
            runtime, precision = _kind(name)
            results[name] = c = Candidate(name, runtime, precision)
            if runtime in missing:
                c.note = "skipped: not installed"
                continue
            if name in TORCH_CANDIDATES and TORCH_CANDIDATES[name][1] and cal is None:
                c.note = "skipped: needs calibration data"
                messages.append(f"skipped {name}: needs calibration data (pass calibration=)")
                continue
            started = time.perf_counter()
            try:
                built[name] = _build_one(name, folded, example, cal, n)
            except RuntimeMissing as exc:
                missing[runtime] = one_line(exc)
                messages.append(f"skipped {runtime}: {one_line(exc)}")
                c.note = "skipped: not installed"
                continue
            except (KeiryoError, RuntimeError, ValueError, NotImplementedError, AssertionError) as exc:
                c.note = f"failed: {one_line(exc, 160)}"
                messages.append(f"{name} could not be built: {one_line(exc, 160)}")
                continue
            c.build_s = time.perf_counter() - started
            if name in TORCH_CANDIDATES and name != FLOAT and report_of(built[name]).kept_float:
                c.note = f"quantize kept float ({report_of(built[name]).message})"
                del built[name]
                continue
            c.bytes = _bytes(built[name])
    return built, results, messages


def _bytes(model: nn.Module) -> int | None:
    return model.file_bytes() if isinstance(model, Runner) else measuring.file_bytes(model)


def _kind(name: str) -> tuple[str, str]:
    if name in TORCH_CANDIDATES:
        return "torch", TORCH_CANDIDATES[name][0]
    return RUNTIME_PRECISIONS[name]


def _build_one(
    name: str, folded: nn.Module, example: inputs.Example, cal: inputs.Example | None, n: int
) -> nn.Module:
    if name == FLOAT:
        return folded
    if name in TORCH_CANDIDATES:
        policy = Policy(runs=10, time_limit=5.0)
        return quantize(folded, TORCH_CANDIDATES[name][0], cal, example, policy)
    require(RUNTIME_PRECISIONS[name][0])
    return build(folded, example, name, calibration=cal, threads=n)


def _quality(
    model: nn.Module,
    built: dict[str, nn.Module],
    results: dict[str, Candidate],
    quality_inputs: inputs.Example,
    config: DeployConfig,
    scores: bool,
) -> None:
    """Each candidate's outputs against the float model's: cosine and top-1 agreement, the tolerance gate."""
    for name, c in results.items():
        if name not in built:
            continue
        try:
            agree = agreement(built[name], model, quality_inputs)
        except (KeiryoError, RuntimeError, ValueError) as exc:
            c.note = f"failed to run: {one_line(exc, 160)}"
            del built[name]
            continue
        c.cosine, c.top1 = agree.cosine, agree.top1
        top1_ok = not scores or (agree.top1 or 0.0) >= config.min_top1
        c.within_tolerance = name == FLOAT or (agree.cosine >= config.min_cosine and top1_ok)
        if not c.within_tolerance:
            c.note = (c.note + "; " if c.note else "") + "outside tolerance"


def _time(
    built: dict[str, nn.Module], results: dict[str, Candidate], example: inputs.Example, config: DeployConfig
) -> None:
    """p50 of every candidate within tolerance, interleaved with float, at each batch size."""
    timed = {name: built[name] for name, c in results.items() if c.within_tolerance and name in built}
    for b in config.batch_sizes:
        latency = time_models(timed, batch_of(example, b), runs=config.runs, warmup=min(5, config.runs))
        for name, lat in latency.items():
            c = results[name]
            c.p50_ms[b] = lat.p50_ms
        for name in timed:
            results[name].speedup[b] = results[FLOAT].p50_ms[b] / results[name].p50_ms[b]


def _choose(results: dict[str, Candidate], config: DeployConfig) -> dict[int, str]:
    """Per batch size: the fastest within tolerance, if it beats float by `min_speedup`; else float."""
    chosen = {}
    for b in config.batch_sizes:
        timed = [c for c in results.values() if b in c.p50_ms]
        best = min(timed, key=lambda c: c.p50_ms[b])
        chosen[b] = best.name if best.speedup[b] >= config.min_speedup else FLOAT
        results[chosen[b]].chosen_for.append(b)
    return chosen


def _choice_lines(results: dict[str, Candidate], chosen: dict[int, str]) -> list[str]:
    lines = []
    for b, name in chosen.items():
        c = results[name]
        if name == FLOAT:
            lines.append(f"batch {b}: float kept (PyTorch eager, BatchNorm folded): nothing was faster here")
        else:
            speed = f"{c.speedup[b]:.2f}× float"
            lines.append(f"batch {b}: {name} ({c.runtime} {c.precision}), {speed}, cosine {c.cosine:.4f}")
    if len(set(chosen.values())) > 1:
        per = ", ".join(f"batch {b}: {name}" for b, name in chosen.items())
        lines.append(f"the fastest differs by batch size ({per}): each one's artifact is written")
    return lines


def _write(
    report: DeployReport, built: dict[str, nn.Module], config: DeployConfig, out: Path, check: tuple
) -> None:
    """The winners' (and `also`'s) artifacts, each loaded back and checked, and the report: into `out` at
    once (staged in a folder beside it, swapped in at the end)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        names = dict.fromkeys([*report.chosen.values(), *[n for n in config.also if n in built]])
        for name in names:
            c = report.candidate(name)
            c.artifact = _save(built[name], stage, name, check)
        report.out = str(out)
        (stage / "report.md").write_text(report.markdown())
        (stage / "report.json").write_text(report.to_json())
        _swap(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _save(model: nn.Module, folder: Path, name: str, check: tuple) -> str:
    """Write one artifact and load it back; the loaded copy must match the float model (within rounding of
    the candidate's own quality, which was measured before)."""
    if isinstance(model, Runner):
        path = model.save(folder / f"{name}{RUNTIMES[model.runtime][0].SUFFIX}")
        loaded = load_runtime(path)
    else:
        path = folder / f"{name}.pt"
        artifacts.save(model, path)
        loaded = artifacts.load(path)
    reference, quality_inputs = check
    sample = inputs.take(quality_inputs, 0, 64)
    again, before = agreement(loaded, reference, sample), agreement(model, reference, sample)
    if abs(again.cosine - before.cosine) > 1e-3:
        raise ModelError(
            f"{name}: the written artifact does not reproduce the model it was built from "
            f"(cosine {again.cosine:.4f} vs {before.cosine:.4f}); nothing was written"
        )
    return path.name


def _swap(stage: Path, out: Path) -> None:
    """Put the staged folder at `out`: the old one (if any) is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _bar(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    """A transient progress bar over the candidates (silent when disabled): `step(name)` starts the next."""
    if not enabled:
        yield lambda name: None
        return
    columns = (
        TextColumn("deploy: {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("", total=total)
        started = [False]

        def step(name: str) -> None:
            if started[0]:
                progress.advance(task)
            started[0] = True
            progress.update(task, description=f"building {name}")

        yield step
