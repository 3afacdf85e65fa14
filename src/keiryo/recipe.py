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

A recipe is data, not code: a model spec that would import Python (anything but the built-ins and hf:DIR)
is refused unless the run passes `trust_code=True`, and so is a cached step file that names one. Step and
recipe names become file names, so they must be plain names (no folders, no `..`, no leading dot), and
a recipe file is refused when it is over 1 MiB or its YAML aliases expand to more than 10,000 nodes.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import keiryo
from keiryo import artifacts, data, fileio, models
from keiryo.errors import ArtifactError, ConfigError

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
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; 1 MiB is far more than any needs
MAX_RECIPE_NODES = 10_000  # YAML values after expanding aliases: stops "billion laughs" files
MAX_RECIPE_DEPTH = 64  # nested [ and {: PyYAML's scanner takes time quadratic in this depth
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
RESERVED_NAMES = ("metrics",)  # metrics.json is the report's; a step of that name would overwrite it


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
        raw, lines = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe '{path}': expected a mapping with 'steps', got {type(raw).__name__}")
    _check_fields(f"recipe '{path}'", "the recipe", raw, TOP_FIELDS)
    if not raw.get("steps"):
        raise ConfigError(f"recipe '{path}': 'steps' must be a non-empty list")
    recipe_name = raw.get("name") or _plain(Path(path).stem if path != "<dict>" else "recipe")
    _check_name(recipe_name, f"recipe '{path}'", "the recipe's name")
    steps: list[Step] = []
    for i, entry in enumerate(raw["steps"]):
        where = _where(path, lines.get(i))
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{where}: each step is one mapping like '- prune: {{ratio: 0.5}}'")
        kind, options = next(iter(entry.items()))
        if kind not in STEP_FIELDS and kind != "measure":
            allowed = ", ".join([*STEP_FIELDS, "measure"])
            raise ConfigError(f"{where}: unknown step '{kind}' (allowed: {allowed})")
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"{where}: the options of step '{kind}' must be a mapping, got {options!r}")
        options = dict(options or {})
        if kind == "measure":
            continue  # every recipe ends by measuring all its models; the step is accepted for readability
        _check_fields(where, f"step '{kind}'", options, STEP_FIELDS[kind])
        name = options.pop("name", None) or _unique(kind, steps)
        _check_name(name, where, "a step's name")
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
        name=recipe_name,
        data=raw.get("data", "digits"),
        seed=raw.get("seed", 0),
        steps=steps,
        path=path,
    )


def _check_name(name: Any, where: str, what: str) -> None:
    """Refuse a name that would put a file outside the output folder, hide it, or overwrite the report."""
    if (
        not isinstance(name, str)
        or not PLAIN_NAME.fullmatch(name)
        or ".." in name
        or name.lower() in RESERVED_NAMES
    ):
        raise ConfigError(
            f"{where}: {what} must be a plain file name (letters, digits, '_', '-', '.'; not starting with "
            f"'.' or '-', no '..' or '/', not {' or '.join(RESERVED_NAMES)}), got {_short(name)}"
        )


def _plain(stem: str) -> str:
    """A file's stem made a plain name (for the default output folder): other characters become '_'."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".-").replace("..", "_")[:64]
    return name if name and name.lower() not in RESERVED_NAMES else "recipe"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_yaml(path: str) -> tuple[Any, dict[int, int]]:
    """(the data, the line of each step) of a recipe file, refusing huge files and alias bombs first."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"recipe '{path}' does not exist")
    size = file.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe '{path}' is {size} bytes; a recipe may have at most {MAX_RECIPE_BYTES}")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe '{path}' is not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"recipe '{path}' cannot be read: {exc.strerror or exc}") from exc
    _check_depth(text, path)
    loader = yaml.SafeLoader(text)  # the pure-Python loader: libyaml's recursion can crash the process
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _count_nodes(node, path)
        return loader.construct_document(node), _step_lines(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ConfigError(f"{_where(path, line)}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    except RecursionError as exc:
        raise ConfigError(f"recipe '{path}': its YAML is nested too deeply") from exc
    finally:
        loader.dispose()


def _check_depth(text: str, path: str) -> None:
    """Refuse brackets nested deeper than MAX_RECIPE_DEPTH (counting those in strings too: a real recipe is
    nowhere near), before the YAML scanner spends minutes on them."""
    depth = 0
    for char in re.sub(r"[^\[\]{}]", "", text):
        depth = depth + 1 if char in "[{" else max(depth - 1, 0)
        if depth > MAX_RECIPE_DEPTH:
            raise ConfigError(f"recipe '{path}': its YAML nests [ and {{ more than {MAX_RECIPE_DEPTH} deep")


def _count_nodes(root: yaml.Node, path: str) -> int:
    """The number of YAML values once every alias is expanded; refuses more than MAX_RECIPE_NODES and
    aliases that contain themselves. Each node is counted once, so this takes time in the file's size."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{_where(path, node.start_mark.line + 1)}: a YAML alias contains itself")
        open_nodes.add(key)
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        open_nodes.discard(key)
        if total > MAX_RECIPE_NODES:
            raise ConfigError(
                f"recipe '{path}': its YAML expands to more than {MAX_RECIPE_NODES} values "
                "(aliases repeated inside aliases?); write the recipe out plainly"
            )
        sizes[key] = total
        return total

    return size(root)


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
    trust_code: bool = False,
) -> tuple[keiryo.metrics.Report, list[StepOutcome]]:
    """Run every step (reusing unchanged ones), measure all models side by side, write the report files.

    Model specs that import code, and cached step files built by such code, are refused (TrustError) unless
    `trust_code=True`; this is checked for every step before the first one runs.
    """
    from keiryo.metrics import compare
    from keiryo.report import write_reports

    recipe = load_recipe(source)
    _check_name(recipe.name, f"recipe '{recipe.path}'", "the recipe's name")  # also for Recipe objects
    for step in recipe.steps:
        _check_name(step.name, _where(recipe.path, step.line), "a step's name")
        spec = step.options.get("model" if step.kind == "train" else "student")
        if spec is not None:
            where = f"{_where(recipe.path, step.line)} (step '{step.name}')"
            models.check_trusted(spec, trust_code, where)
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
        previous = _read_meta(meta_path)
        fresh = not force and previous.get("key") == key and (model_path is None or model_path.exists())
        started = time.perf_counter()
        info = previous.get("info") if isinstance(previous.get("info"), dict) else {}
        if fresh and model_path is not None:
            try:
                loaded[step.name] = artifacts.load(model_path, trust_code=trust_code)
            except ArtifactError:  # corrupt or foreign: run the step again, which replaces it
                fresh = False
        if not fresh:
            model, info = _run_step(step, recipe, splits, example, loaded, out, progress, trust_code)
            if model is not None:
                artifacts.save(model, model_path, metadata={"recipe": recipe.name, "step": step.name})
                loaded[step.name] = model
            blob = {"key": key, "kind": step.kind, "options": step.options, "info": info}
            fileio.atomic_write_bytes(json.dumps(blob, indent=2, default=str).encode(), meta_path)
        outcomes.append(StepOutcome(step, model_path, fresh, time.perf_counter() - started, info))
    report = compare(loaded, example, splits, num_threads=torch.get_num_threads())
    write_reports(report, out, title=f"keiryo recipe: {recipe.name}", notes=_notes(outcomes))
    return report, outcomes


def _read_meta(path: Path) -> dict[str, Any]:
    """A step's saved key and figures; {} (run the step again) when missing, too big, or not a JSON object."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_RECIPE_BYTES:
            return {}
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _notes(outcomes: list[StepOutcome]) -> list[str]:
    notes = []
    for o in outcomes:
        state = "reused" if o.cached else f"ran in {o.seconds:.1f} s"
        extra = "; ".join(f"{k}: {v}" for k, v in o.info.items() if not isinstance(v, (dict, list)))
        notes.append(f"{o.step.name} ({o.step.kind}, {state})" + (f": {extra}" if extra else ""))
    return notes


def _run_step(step, recipe, splits, example, loaded, out, progress, trust_code=False):
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
        model = models.build_model(spec, trust_code=trust_code, **{**kwargs, **o.get("model_args", {})})
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
        from keiryo.loop import TrainConfig

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
            student = models.build_model(
                spec, trust_code=trust_code, **{**kwargs, **o.get("student_args", {})}
            )
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
