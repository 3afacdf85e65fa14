"""Recipes: a YAML list of steps (train, prune, distill, quantize, export, measure), validated, then run.

```yaml
name: digits
data: digits
steps:
  - train: {model: cnn, epochs: 8}
  - prune: {ratio: 0.5, finetune_epochs: 3}
  - distill: {teacher: train, epochs: 6}          # student: the previous step's model
  - quantize: {method: int8-dynamic}
  - export: {format: onnx}
```

Each step takes the model of the step before it (or of `from: <step name>`) and writes `<name>.pt` and
`<name>.json` in the output folder. A step whose options and inputs are unchanged is not run again, so an
interrupted recipe resumes where it stopped (and a train step resumes from its own checkpoint).
Finally every model is measured side by side and `report.md`, `report.html` and `metrics.json` are written.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import keiryo
from keiryo import artifacts, data, models
from keiryo.errors import ConfigError

_NAME = {"name": str, "from": str}
STEP_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "train": {
        **_NAME,
        "model": str,
        "model_args": dict,
        "epochs": int,
        "batch_size": int,
        "lr": (int, float),
        "strategy": str,
        "workers": int,
        "precision": str,
    },
    "prune": {
        **_NAME,
        "ratio": (int, float),
        "structured": bool,
        "importance": str,
        "target": str,
        "global": bool,
        "iterative_steps": int,
        "finetune_epochs": int,
        "distill": bool,
    },
    "distill": {
        **_NAME,
        "teacher": str,
        "student": str,
        "student_args": dict,
        "epochs": int,
        "lr": (int, float),
        "temperature": (int, float),
        "alpha": (int, float),
    },
    "quantize": {**_NAME, "method": str, "backend": str, "compile": bool},
    "export": {**_NAME, "format": str},
}
TOP_FIELDS: dict[str, type | tuple[type, ...]] = {"name": str, "data": str, "seed": int, "steps": list}
MODEL_STEPS = ("train", "prune", "distill", "quantize")


@dataclass
class Step:
    """One validated step: its kind, unique name, options and where it stands in the file."""

    kind: str
    name: str
    options: dict[str, Any]
    line: int
    source: str | None = None  # the step whose model it takes (None for a first train step)


@dataclass
class Recipe:
    name: str
    data: str
    seed: int
    steps: list[Step]
    path: str = "<dict>"


@dataclass
class StepOutcome:
    """What one step did: its model file, whether it was reused, its own figures."""

    step: Step
    model_path: Path | None
    cached: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def _where(path: str, line: int | None) -> str:
    return f"recipe '{path}'" + (f" line {line}" if line else "")


def _check_fields(where: str, what: str, given: dict, allowed: dict) -> None:
    for key, value in given.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown field '{key}' in {what} (allowed: {', '.join(allowed)})")
        kind = allowed[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise ConfigError(f"{where}: field '{key}' of {what} must be {names}, got {value!r}")


def load_recipe(source: str | Path | dict | Recipe) -> Recipe:
    """Read and validate a recipe (a YAML file or a dict) before anything runs; errors name field and line."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        path, raw, lines = "<dict>", source, {}
    else:
        path = str(source)
        if not Path(path).is_file():
            raise ConfigError(f"recipe '{path}' does not exist")
        text = Path(path).read_text()
        try:
            raw = yaml.safe_load(text)
            node = yaml.compose(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark else None
            raise ConfigError(
                f"{_where(path, line)}: not valid YAML ({getattr(exc, 'problem', exc)})"
            ) from exc
        lines = _step_lines(node)
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe '{path}': expected a mapping with 'steps', got {type(raw).__name__}")
    _check_fields(f"recipe '{path}'", "the recipe", raw, TOP_FIELDS)
    if not raw.get("steps"):
        raise ConfigError(f"recipe '{path}': 'steps' must be a non-empty list")
    steps: list[Step] = []
    for i, entry in enumerate(raw["steps"]):
        where = _where(path, lines.get(i))
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{where}: each step is one mapping like '- prune: {{ratio: 0.5}}'")
        kind, options = next(iter(entry.items()))
        if kind not in STEP_FIELDS and kind != "measure":
            allowed = ", ".join([*STEP_FIELDS, "measure"])
            raise ConfigError(f"{where}: unknown step '{kind}' (allowed: {allowed})")
        options = dict(options or {})
        if kind == "measure":
            continue  # every recipe ends by measuring all its models; the step is accepted for readability
        _check_fields(where, f"step '{kind}'", options, STEP_FIELDS[kind])
        name = options.pop("name", None) or _unique(kind, steps)
        if any(s.name == name for s in steps):
            raise ConfigError(f"{where}: step name '{name}' is used twice")
        source = options.pop("from", None)
        model_steps = [s for s in steps if s.kind in MODEL_STEPS]
        if source is None and kind != "train":
            if not model_steps:
                raise ConfigError(f"{where}: step '{kind}' needs a model: put a train step first")
            source = model_steps[-1].name
        for ref in (source, options.get("teacher")):
            if ref is not None and ref not in [s.name for s in model_steps]:
                known = ", ".join(s.name for s in model_steps) or "none yet"
                raise ConfigError(f"{where}: '{ref}' is not an earlier step with a model (earlier: {known})")
        if kind == "train" and "model" not in options and source is None:
            options["model"] = "cnn"
        steps.append(Step(kind, name, options, lines.get(i, 0), source))
    return Recipe(
        name=raw.get("name") or Path(path).stem,
        data=raw.get("data", "digits"),
        seed=raw.get("seed", 0),
        steps=steps,
        path=path,
    )


def _step_lines(node: yaml.Node | None) -> dict[int, int]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    for key, value in node.value:
        if key.value == "steps" and isinstance(value, yaml.SequenceNode):
            return {i: item.start_mark.line + 1 for i, item in enumerate(value.value)}
    return {}


def _unique(kind: str, steps: list[Step]) -> str:
    n = sum(s.kind == kind for s in steps)
    return kind if n == 0 else f"{kind}{n + 1}"


def _key(recipe: Recipe, step: Step, inputs: list[str]) -> str:
    """Hash of everything a step's result depends on: reruns with the same key are skipped."""
    data_id: Any = recipe.data
    if Path(recipe.data).exists():
        stat = Path(recipe.data).stat()
        data_id = [recipe.data, stat.st_size, stat.st_mtime_ns]
    blob = {
        "kind": step.kind,
        "options": step.options,
        "inputs": inputs,
        "data": data_id,
        "seed": recipe.seed,
        "keiryo": keiryo.__version__,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_recipe(
    source: str | Path | dict,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    force: bool = False,
    on_step=None,
) -> tuple[keiryo.measure.Report, list[StepOutcome]]:
    """Run every step (reusing unchanged ones), measure all models side by side, write the report files."""
    from keiryo.measure import compare
    from keiryo.report import write_reports

    recipe = load_recipe(source)
    out = Path(out_dir or Path("keiryo-out") / recipe.name)
    out.mkdir(parents=True, exist_ok=True)
    splits = data.load_data(recipe.data, seed=recipe.seed)
    example = data.example_inputs(splits, 64)
    keys: dict[str, str] = {}
    loaded: dict[str, nn.Module] = {}
    outcomes: list[StepOutcome] = []
    for step in recipe.steps:
        inputs = [keys[s] for s in (step.source, step.options.get("teacher")) if s]
        key = keys[step.name] = _key(recipe, step, inputs)
        meta_path = out / f"{step.name}.json"
        model_path = out / f"{step.name}.pt" if step.kind in MODEL_STEPS else None
        if on_step is not None:
            on_step(step)
        previous = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        fresh = not force and previous.get("key") == key and (model_path is None or model_path.exists())
        started = time.perf_counter()
        if fresh:
            info = previous.get("info", {})
            if model_path is not None:
                loaded[step.name] = artifacts.load(model_path, trust_code=True)
        else:
            model, info = _run_step(step, recipe, splits, example, loaded, out, progress)
            if model is not None:
                artifacts.save(model, model_path, metadata={"recipe": recipe.name, "step": step.name})
                loaded[step.name] = model
            blob = {"key": key, "kind": step.kind, "options": step.options, "info": info}
            artifacts.atomic_write_bytes(json.dumps(blob, indent=2, default=str).encode(), meta_path)
        outcomes.append(StepOutcome(step, model_path, fresh, time.perf_counter() - started, info))
    report = compare(loaded, example, splits, num_threads=torch.get_num_threads())
    write_reports(report, out, title=f"keiryo recipe: {recipe.name}", notes=_notes(outcomes))
    return report, outcomes


def _notes(outcomes: list[StepOutcome]) -> list[str]:
    notes = []
    for o in outcomes:
        state = "reused" if o.cached else f"ran in {o.seconds:.1f} s"
        extra = "; ".join(f"{k}: {v}" for k, v in o.info.items() if not isinstance(v, (dict, list)))
        notes.append(f"{o.step.name} ({o.step.kind}, {state})" + (f": {extra}" if extra else ""))
    return notes


def _run_step(step, recipe, splits, example, loaded, out, progress):
    """The one place that maps a step to the public API; returns (model or None, info for the report)."""
    o = step.options
    seed = recipe.seed
    if step.kind == "train":
        torch.manual_seed(seed)
        spec = o.get("model", "cnn")
        kwargs = (
            models.kwargs_for_data(spec, splits.input_shape, splits.num_classes)
            if spec in models.BUILTIN
            else {}
        )
        model = models.build_model(spec, **{**kwargs, **o.get("model_args", {})})
        options = {
            k: o[k] for k in ("epochs", "batch_size", "lr", "strategy", "workers", "precision") if k in o
        }
        keiryo.train(
            model,
            splits,
            progress=progress,
            seed=seed,
            device="cpu",
            # resumable, except pipeline training, which keeps no checkpoints
            checkpoint=None if o.get("strategy") == "pipeline" else str(out / f"{step.name}.ckpt"),
            resume=o.get("strategy") != "pipeline",
            **options,
        )
        return model, {}
    source = loaded[step.source]
    if step.kind == "prune":
        from keiryo.compress.prune import prune
        from keiryo.train import TrainConfig

        model = prune(
            source,
            o.get("ratio", 0.5),
            structured=o.get("structured", True),
            example_inputs=example,
            importance=o.get("importance", "l2"),
            target=o.get("target", "channels"),
            global_pruning=o.get("global", False),
            data=splits,
            iterative_steps=o.get("iterative_steps", 1),
            finetune_epochs=o.get("finetune_epochs", 0),
            finetune=TrainConfig(lr=1e-3, seed=seed, device="cpu", progress=progress),
            teacher=source if o.get("distill") else None,
        )
        return model, {}
    if step.kind == "distill":
        from keiryo.compress.distill import distill

        if "student" in o:
            torch.manual_seed(seed)
            spec = o["student"]
            kwargs = (
                models.kwargs_for_data(spec, splits.input_shape, splits.num_classes)
                if spec in models.BUILTIN
                else {}
            )
            student = models.build_model(spec, **{**kwargs, **o.get("student_args", {})})
        else:
            student = copy_model(source)
        teacher = loaded[o.get("teacher", step.source)]
        options = {k: o[k] for k in ("epochs", "lr") if k in o}
        model = distill(
            teacher,
            student,
            splits,
            o.get("temperature", 4.0),
            o.get("alpha", 0.9),
            progress=progress,
            seed=seed,
            device="cpu",
            **options,
        )
        return model, {}
    if step.kind == "quantize":
        from keiryo.compress.quantize import quantize

        model = quantize(
            copy_model(source),
            o.get("method", "int8-dynamic"),
            calibration=splits,
            example_inputs=example,
            backend=o.get("backend", "auto"),
            compile=o.get("compile", True),
        )
        return model, {}
    if step.kind == "export":
        from keiryo.export import SUFFIXES, export

        suffix = SUFFIXES.get(o.get("format", "onnx"), "")
        result = export(source, example, out / f"{step.name}{suffix}", o.get("format", "onnx"))
        timing = {"runtime_p50_ms": result.runtime_p50_ms, "torch_p50_ms": result.torch_p50_ms}
        info = {"file": result.path.name, "bytes": result.bytes, "max_error": f"{result.max_error:.2e}"}
        return None, {**info, **{k: round(v, 3) for k, v in timing.items() if v is not None}}
    raise ConfigError(f"unknown step '{step.kind}'")  # load_recipe already rejects these


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy that keeps keiryo's recorded factory, structure and transforms."""
    import copy

    return copy.deepcopy(model)
