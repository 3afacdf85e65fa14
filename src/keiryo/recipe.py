"""Recipes: a YAML list of steps (train, prune, distill, quantize, export, deploy, measure), read and
validated here before anything runs (`keiryo.steps` runs them).

```yaml
name: digits
data: digits
steps:
  - train: {model: cnn, epochs: 8}
  - prune: {ratio: 0.5, finetune_epochs: 3}
  - distill: {teacher: train, epochs: 6}          # student: the previous step's model
  - quantize: {method: int8-dynamic}
  - export: {format: onnx}
  - deploy: {from: distill, batch_sizes: [1, 64], also: [executorch]}
```

Each step takes the model of the step before it (or of `from: <step name>`). A step's options are the
fields of the API's configs, read into them here so that a bad value fails before anything runs, naming the
line:
- train → `TrainConfig` (`epochs`, `batch_size`, `lr`, `precision`, `patience`: null runs every epoch and
  keeps the last weights) and a strategy (`strategy: ddp`, `workers: 2`, `grad_compression: powersgd:4`
  for ddp);
- prune → `Structured`/`Unstructured` (`kind`, `ratio`, `importance`, `target`, `global_pruning`, `protect`,
  `steps`; the older `structured`, `global`, `iterative_steps` still work), `finetune_epochs`, `distill`;
- distill → `Distill` (`temperature`, `alpha`, `loss`, `features`, ...) and `epochs`, `lr`, `patience`;
- quantize → the method's config (`method: int8-static`, `observer`, `granularity`, ...) and `Policy`
  (`backend`, `skip`, `compile`);
- deploy → `DeployConfig` (`batch_sizes`, `runtimes`: names or families such as onnxruntime, `also`,
  `min_cosine`, `min_top1`, `runs`): the fastest way to run the model here, written to `<name>/`.
A step's file records each config as its kind and `dataclasses.asdict`.

A recipe with a top-level `model: gguf:FILE` (or `hf:DIR`) compresses a language model: its `data` is text
(`shakespeare` or a file), its steps `lm-compress` (`method`: a name or chain of `keiryo lm compress`, such as
width+int8; `windows`, `length`, `layers`, `precision`), each on the recipe's model unless `from` names an
earlier step; `keiryo run` and `keiryo.run()` run it (`lm_recipe.py`).

A recipe is data, not code: a model spec that would import Python (anything but the built-ins and hf:DIR)
is refused unless the run passes `trust_code=True`, and so is a cached step file that names one. Step and
recipe names become file names, so they must be plain names (no folders, no `..`, no leading dot), and
a recipe file is refused when it is over 1 MiB or its YAML aliases expand to more than 10,000 nodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from keiryo.compress.distill import Distill
from keiryo.compress.prune_config import check_options as check_prune
from keiryo.compress.prune_config import method_from
from keiryo.compress.qconfig import Policy, method_of
from keiryo.compress.qconfig import check_options as check_quantize
from keiryo.deployment import DeployConfig, candidates_of
from keiryo.errors import ConfigError
from keiryo.lm.compress import chain_of
from keiryo.loop import TrainConfig
from keiryo.parallel.config import strategy_of
from keiryo.yamlfile import MAX_BYTES, read_yaml, where

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
        "grad_compression": (str, type(None)),
        "precision": str,
        "patience": (int, type(None)),
    },
    "prune": {
        **_NAME,
        "kind": str,
        "ratio": (int, float),
        "importance": str,
        "target": str,
        "global_pruning": bool,
        "protect": list,
        "steps": int,
        "structured": bool,  # the older spellings of kind, global_pruning and steps
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
        "patience": (int, type(None)),
        "temperature": (int, float),
        "alpha": (int, float),
        "loss": str,
        "features": (dict, list),
        "feature_weight": (int, float),
        "cache_teacher": bool,
    },
    "quantize": {
        **_NAME,
        "method": str,
        "granularity": str,
        "symmetric": bool,
        "group_size": int,
        "observer": str,
        "backend": str,
        "compile": bool,
        "skip": list,
    },
    "export": {**_NAME, "format": str},
    "lm-compress": {
        **_NAME,
        "method": str,
        "windows": int,
        "length": int,
        "layers": (int, float),
        "precision": str,
    },
    "deploy": {
        **_NAME,
        "batch_sizes": list,
        "runtimes": list,
        "also": list,
        "min_cosine": (int, float),
        "min_top1": (int, float),
        "runs": int,
    },
}
PRUNE_FIELDS = ("kind", "ratio", "importance", "target", "global_pruning", "steps")
DISTILL_FIELDS = ("temperature", "alpha", "loss", "features", "feature_weight", "cache_teacher")
QUANTIZE_FIELDS = ("granularity", "symmetric", "group_size", "observer")
TOP_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "data": str,
    "seed": int,
    "steps": list,
    "model": str,
}
LM_STEPS = ("lm-compress",)  # the steps of a language-model recipe (one with a top-level `model`)
MODEL_STEPS = ("train", "prune", "distill", "quantize")
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
    configs: dict[str, Any] = field(default_factory=dict)  # the API's config objects, made from `options`


def record(config: Any) -> dict[str, Any]:
    """A config as a step's file records it: its kind and `dataclasses.asdict`."""
    return {"kind": getattr(config, "kind", type(config).__name__), **dataclasses.asdict(config)}


@dataclass
class Recipe:
    name: str
    data: str
    seed: int
    steps: list[Step]
    path: str = "<dict>"
    model: str | None = None  # a language-model recipe's model (hf:FOLDER or gguf:FILE); its data is text


def _check_fields(place: str, what: str, given: dict, allowed: dict) -> None:
    for key, value in given.items():
        if key not in allowed:
            raise ConfigError(f"{place}: unknown field '{key}' in {what} (allowed: {', '.join(allowed)})")
        kind = allowed[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise ConfigError(f"{place}: field '{key}' of {what} must be {names}, got {value!r}")


def load_recipe(source: str | Path | dict | Recipe) -> Recipe:
    """Read and validate a recipe (a YAML file or a dict) before anything runs; errors name field and line."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        path, raw, lines = "<dict>", source, {}
    else:
        path = str(source)
        raw, lines = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe '{path}': expected a mapping with 'steps', got {type(raw).__name__}")
    _check_fields(f"recipe '{path}'", "the recipe", raw, TOP_FIELDS)
    if not raw.get("steps"):
        raise ConfigError(f"recipe '{path}': 'steps' must be a non-empty list")
    recipe_name = raw.get("name") or _plain(Path(path).stem if path != "<dict>" else "recipe")
    check_name(recipe_name, f"recipe '{path}'", "the recipe's name")
    steps: list[Step] = []
    for i, entry in enumerate(raw["steps"]):
        place = where(path, lines.get(i))
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{place}: each step is one mapping like '- prune: {{ratio: 0.5}}'")
        kind, options = next(iter(entry.items()))
        if kind not in STEP_FIELDS and kind != "measure":
            allowed = ", ".join([*STEP_FIELDS, "measure"])
            raise ConfigError(f"{place}: unknown step '{kind}' (allowed: {allowed})")
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"{place}: the options of step '{kind}' must be a mapping, got {options!r}")
        options = dict(options or {})
        if kind == "measure":
            continue  # every recipe ends by measuring all its models; the step is accepted for readability
        if kind in LM_STEPS and "model" not in raw:
            raise ConfigError(
                f"{place}: step '{kind}' needs the recipe's model: add 'model: gguf:FILE' (or hf:DIR)"
            )
        if kind not in LM_STEPS and "model" in raw:
            raise ConfigError(
                f"{place}: a language-model recipe's steps are {', '.join(LM_STEPS)}, not '{kind}'"
            )
        _check_fields(place, f"step '{kind}'", options, STEP_FIELDS[kind])
        name = options.pop("name", None) or _unique(kind, steps)
        check_name(name, place, "a step's name")
        if any(s.name == name for s in steps):
            raise ConfigError(f"{place}: step name '{name}' is used twice")
        source = options.pop("from", None)
        if kind in LM_STEPS:  # the recipe's model, unless `from` names an earlier step
            steps.append(_lm_step(kind, name, options, source, steps, place, lines.get(i, 0)))
            continue
        model_steps = [s for s in steps if s.kind in MODEL_STEPS]
        if source is None and kind != "train":
            if not model_steps:
                raise ConfigError(f"{place}: step '{kind}' needs a model: put a train step first")
            source = model_steps[-1].name
        for ref in (source, options.get("teacher")):
            if ref is not None and ref not in [s.name for s in model_steps]:
                known = ", ".join(s.name for s in model_steps) or "none yet"
                raise ConfigError(f"{place}: '{ref}' is not an earlier step with a model (earlier: {known})")
        if kind == "train" and "model" not in options and source is None:
            options["model"] = "cnn"
        try:
            configs = _configs(kind, options, raw.get("seed", 0))
        except ConfigError as exc:
            raise ConfigError(f"{place}: step '{name}': {exc}") from None
        steps.append(Step(kind, name, options, lines.get(i, 0), source, configs))
    return Recipe(
        name=recipe_name,
        data=raw.get("data", "shakespeare" if "model" in raw else "digits"),
        seed=raw.get("seed", 0),
        steps=steps,
        path=path,
        model=raw.get("model"),
    )


def _lm_step(
    kind: str, name: str, options: dict, source: str | None, steps: list[Step], place: str, line: int
) -> Step:
    """A language-model step, its method chain made into configs now (a bad method fails before anything
    runs, naming the line)."""
    if source is not None and source not in [s.name for s in steps]:
        known = ", ".join(s.name for s in steps) or "none yet"
        raise ConfigError(f"{place}: '{source}' is not an earlier step (earlier: {known})")
    if "method" not in options:
        raise ConfigError(f"{place}: step '{name}' needs a method (e.g. method: width+int8)")
    for key, least in (("windows", 1), ("length", 2)):
        if key in options and options[key] < least:
            raise ConfigError(f"{place}: step '{name}': {key} must be at least {least}")
    try:
        chain = chain_of(options["method"], options.get("layers"), options.get("precision", "fp32"))
    except ConfigError as exc:
        raise ConfigError(f"{place}: step '{name}': {exc}") from None
    return Step(kind, name, options, line, source, {"chain": chain})


def _configs(kind: str, options: dict[str, Any], seed: int) -> dict[str, Any]:
    """The API's configs for a step's options, made now so that a bad value fails before anything runs."""
    o = options
    if kind == "train":
        train = {k: o[k] for k in ("epochs", "batch_size", "lr", "precision", "patience") if k in o}
        strategy = strategy_of(o.get("strategy", "single"), o.get("workers"))
        if o.get("grad_compression") is not None:
            if strategy.kind != "ddp":
                raise ConfigError(f"grad_compression needs strategy ddp (this step's is {strategy.kind})")
            strategy = dataclasses.replace(strategy, grad_compression=o["grad_compression"])  # checks it
        return {"strategy": strategy, "train": TrainConfig(**train, seed=seed, device="cpu")}
    if kind == "prune":
        method = {
            k: o[k] for k in ("kind", "ratio", "importance", "target", "global_pruning", "steps") if k in o
        }
        if "structured" in o:
            method.setdefault("kind", "structured" if o["structured"] else "unstructured")
        if "global" in o:
            method.setdefault("global_pruning", o["global"])
        if "iterative_steps" in o:
            method.setdefault("steps", o["iterative_steps"])
        config = method_from({**method, "protect": tuple(o.get("protect", ()))})
        epochs = o.get("finetune_epochs", 0)
        finetune = TrainConfig(epochs=epochs, lr=1e-3, seed=seed, device="cpu") if epochs else None
        check_prune(config, finetune, has_teacher=o.get("distill", False))
        return {"method": config, "finetune": finetune}
    if kind == "distill":
        how = {
            k: o[k]
            for k in ("temperature", "alpha", "loss", "features", "feature_weight", "cache_teacher")
            if k in o
        }
        train = {k: o[k] for k in ("epochs", "lr", "patience") if k in o}
        return {"distill": Distill(**how), "train": TrainConfig(**train, seed=seed, device="cpu")}
    if kind == "quantize":
        how = {k: o[k] for k in QUANTIZE_FIELDS if k in o}
        policy = Policy(
            backend=o.get("backend", "auto"), skip=tuple(o.get("skip", ())), compile=o.get("compile")
        )
        method = check_quantize(method_of(o.get("method", "int8-dynamic"), **how), policy)
        return {"method": method, "policy": policy}
    if kind == "deploy":
        how = {k: o[k] for k in ("min_cosine", "min_top1", "runs") if k in o}
        runtimes = candidates_of(o["runtimes"]) if "runtimes" in o else None
        batch_sizes = tuple(o.get("batch_sizes", (1, 64)))
        return {"deploy": DeployConfig(batch_sizes, runtimes, also=tuple(o.get("also", ())), **how)}
    return {}


def check_name(name: Any, place: str, what: str) -> None:
    """Refuse a name that would put a file outside the output folder, hide it, or overwrite the report."""
    if (
        not isinstance(name, str)
        or not PLAIN_NAME.fullmatch(name)
        or ".." in name
        or name.lower() in RESERVED_NAMES
    ):
        raise ConfigError(
            f"{place}: {what} must be a plain file name (letters, digits, '_', '-', '.'; not starting with "
            f"'.' or '-', no '..' or '/', not {' or '.join(RESERVED_NAMES)}), got {_short(name)}"
        )


def _plain(stem: str) -> str:
    """A file's stem made a plain name (for the default output folder): other characters become '_'."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".-").replace("..", "_")[:64]
    return name if name and name.lower() not in RESERVED_NAMES else "recipe"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unique(kind: str, steps: list[Step]) -> str:
    n = sum(s.kind == kind for s in steps)
    return kind if n == 0 else f"{kind}{n + 1}"


def demo_recipe(quick: bool = False) -> Recipe:
    """The recipe `keiryo demo` runs (recipes/digits.yaml); `quick`: one epoch per step and few timing rounds
    (a smoke test)."""
    path = resources.files("keiryo").joinpath("recipes/digits.yaml")
    raw = yaml.safe_load(path.read_text())
    if quick:
        for step in raw["steps"]:
            kind, options = next(iter(step.items()))
            if "epochs" in options:
                options["epochs"] = 1
            if kind == "deploy":
                options["runs"] = 5
    recipe = load_recipe(raw)
    recipe.path = str(path)
    return recipe


def step_key(recipe: Recipe, step: Step, inputs: list[str]) -> str:
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
        "keiryo": version("keiryo"),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_meta(path: Path) -> dict[str, Any]:
    """A step's saved key and figures; {} (run the step again) when missing, too big, or not a JSON object."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            return {}
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}
