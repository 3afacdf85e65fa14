"""The files `keiryo.deploy` writes and reads back: each winner's artifact (a runtime's own format with its
JSON sidecar, a keiryo model file, or a torch.export `.pt2` for a model without a keiryo factory),
report.md and report.json, staged beside the output folder and swapped in whole; `load_deployed` loads the
chosen model for a batch size from that folder, run as it was timed. Nothing here unpickles."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from keiryo import artifacts, inputs
from keiryo.compress.quant_pt2e import Pt2eInt8
from keiryo.deploy_report import DeployReport
from keiryo.devices import channels_last, compile_frozen
from keiryo.errors import ArtifactError, ConfigError, ModelError, one_line
from keiryo.metrics import agreement, batch_of
from keiryo.optional import import_torchao
from keiryo.runtimes import Runner, load_runtime
from keiryo.runtimes.build import RUNTIMES

# a winner that runs the float model differently is written as that model, and run that way again at load
WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "torch-compile": compile_frozen,
    "torch-channels-last": channels_last,
}
PT2E = "torch-pt2e-int8"  # written as its int8 graph (.pt2) when the model has no keiryo factory
ARTIFACT_CHECK_SAMPLES = 64  # a written artifact is loaded back and run on this many quality inputs


class Unwritable(ModelError):
    """A candidate whose artifact cannot be written, or does not reproduce it when loaded back; `name` says
    which (deploy then lets the next fastest serve)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def write_folder(report: DeployReport, names: list[str], out: Path, check: tuple) -> None:
    """The named candidates' artifacts, each loaded back and checked against `check` (the float model,
    example and quality inputs), and report.md/report.json: into `out` at once (staged in a folder beside
    it, swapped in at the end), so that a failure leaves an existing `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        for name in dict.fromkeys(names):
            try:
                report.candidate(name).artifact = _save(report, name, stage, check)
            except ModelError as exc:
                raise Unwritable(name, str(exc)) from None
        report.out = str(out)
        (stage / "report.md").write_text(report.markdown())
        (stage / "report.json").write_text(report.to_json())
        _swap(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _save(report: DeployReport, name: str, folder: Path, check: tuple) -> str:
    """Write one candidate's artifact and load it back as `load_deployed` will: the loaded copy must give
    the outputs the candidate gave (its agreement with float is added to the report's lines)."""
    reference, example, quality_inputs = check
    model = report.models[name]
    if isinstance(model, Runner):
        path = model.save(folder / f"{name}{RUNTIMES[model.runtime][0].SUFFIX}")
    else:
        path = _save_torch(model.model if name in WRAPPERS else model, folder / name, example)
    loaded = _load(path, name)
    sample = inputs.take(quality_inputs, 0, ARTIFACT_CHECK_SAMPLES)
    again, before = agreement(loaded, reference, sample), agreement(model, reference, sample)
    if abs(again.cosine - before.cosine) > 1e-3:
        raise ModelError(
            f"{name}: the written artifact does not reproduce the model it was built from "
            f"(cosine {again.cosine:.4f} vs {before.cosine:.4f}); nothing was written"
        )
    how = "keiryo.load_runtime" if isinstance(loaded, Runner) else "keiryo.deployment.load_deployed"
    report.written.append(
        f"{name}: wrote {path.name}; loaded back ({how}) it gives cosine {again.cosine:.5f}, "
        f"max |Δ| {again.max_error:.2g} against the float PyTorch model"
    )
    return path.name


def _save_torch(model: nn.Module, stem: Path, example: inputs.Example) -> Path:
    """A keiryo model file when the model has a factory (keiryo's models, and what keiryo made of them);
    else a torch.export program (`.pt2`, loaded without pickle by torch.export.load; a PT2E int8 model as
    its int8 graph, compiled again at load)."""
    try:
        return artifacts.save(model, stem.with_suffix(".pt"))
    except ArtifactError:
        pass
    if isinstance(model, Pt2eInt8):
        model = model.program  # the int8 graph itself; compiled again at load, as it was timed
    args, kwargs = inputs.args_kwargs(batch_of(example, 2))
    dims = tuple(
        {0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) else None for a in (*args, *kwargs.values())
    )
    path = stem.with_suffix(".pt2")
    try:
        torch.export.save(torch.export.export(model, args, kwargs, dynamic_shapes=dims), path)
    except Exception as exc:  # noqa: BLE001  (torch.export raises many kinds; the line names it)
        raise ModelError(f"{stem.name}: no keiryo factory and torch.export failed: {one_line(exc)}") from None
    return path


def load_deployed(folder: str | Path, batch_size: int | None = None) -> nn.Module:
    """The model `deploy` chose for `batch_size` (None: the largest it timed), from its output folder, run
    as it was timed: a runtime artifact by `load_runtime`, a keiryo model file by `keiryo.load`, a `.pt2` by
    `torch.export.load` (compiled or channels-last again when that is what won). No pickle."""
    folder = Path(folder)
    chosen, files = deployed_choice(folder)
    size = max(chosen) if batch_size is None else batch_size
    if size not in chosen:
        raise ConfigError(f"'{folder}' was deployed for batch sizes {sorted(chosen)}, not {size}")
    return _load(folder / files[chosen[size]], chosen[size])


def deployed_choice(folder: Path) -> tuple[dict[int, str], dict[str, str]]:
    """From a deploy folder's report.json: the candidate chosen per batch size, and each written file."""
    try:
        report = json.loads((Path(folder) / "report.json").read_text())
        chosen = {int(b): str(name) for b, name in report["chosen"].items()}
        files = {c["name"]: c["artifact"] for c in report["candidates"] if c.get("artifact")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"'{folder}' is not a folder keiryo deploy wrote ({one_line(exc)})") from None
    return chosen, files


def _load(path: Path, name: str) -> nn.Module:
    if path.suffix == ".pt":
        model = artifacts.load(path)
    elif name == PT2E and path.suffix == ".pt2":
        import_torchao()  # its quantize/dequantize ops must be registered before the graph loads
        return Pt2eInt8(torch.export.load(path).module())
    elif path.suffix == ".pt2":
        model = torch.export.load(path).module()
    else:
        return load_runtime(path)
    return WRAPPERS[name](model) if name in WRAPPERS else model


def _swap(stage: Path, out: Path) -> None:
    """Put the staged folder at `out`: the old one (if any) is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
