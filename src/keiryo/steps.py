"""Running a recipe: each step calls the public API, unchanged steps are reused, and every model is measured.

Each step takes the model of the step before it (or of `from: <step name>`) and writes `<name>.pt` and
`<name>.json` in the output folder (a deploy step: the folder `<name>/` that `keiryo.deploy` writes, whose
chosen models join the final table). A step whose options and inputs are unchanged is not run again, so an
interrupted recipe resumes where it stopped (and a train step resumes from its own checkpoint). Finally every
model is measured side by side and `report.md`, `report.html` and `metrics.json` are written.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keiryo import artifacts, data, fileio, inputs, measuring, models, report
from keiryo.compress.distill import distill
from keiryo.compress.prune import prune
from keiryo.compress.quantize import quantize, report_of
from keiryo.deploy_files import deployed_choice, load_deployed
from keiryo.deployment import deploy
from keiryo.errors import ArtifactError, ConfigError
from keiryo.examples import model_for_data
from keiryo.export import SUFFIXES, export
from keiryo.lm.measure import LMTable
from keiryo.lm_recipe import run_lm_recipe
from keiryo.metrics import Timing
from keiryo.recipe import MODEL_STEPS, Recipe, Step, check_name, load_recipe, read_meta, record, step_key
from keiryo.training import train
from keiryo.yamlfile import where


@dataclass
class StepOutcome:
    """What one step did: its model file, whether it was reused, its own figures."""

    step: Step
    model_path: Path | None
    cached: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def run(
    recipe: str | Path | dict | Recipe,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    force: bool = False,
    trust_code: bool = False,
) -> measuring.Report | LMTable:
    """Run a recipe (a YAML path or a dict) and return its side-by-side `Report`; a language-model recipe
    (a top-level `model: gguf:FILE` or `hf:FOLDER`) returns `keiryo lm eval`'s table, an `LMTable`.

    A recipe is data: a model spec in it that is not one of keiryo's built-ins (code it would import) is
    refused unless `trust_code=True` (a language model's weights load as data, never as code).
    """
    loaded = load_recipe(recipe)
    if loaded.model is not None:
        folder = Path(out_dir or Path("keiryo-out") / loaded.name)
        return run_lm_recipe(loaded, folder, force=force, progress=progress)
    return run_recipe(loaded, out_dir, progress=progress, force=force, trust_code=trust_code)[0]


def run_recipe(
    source: str | Path | dict | Recipe,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    force: bool = False,
    on_step: Callable[[Step], None] | None = None,
    trust_code: bool = False,
) -> tuple[measuring.Report, list[StepOutcome]]:
    """Run every step (reusing unchanged ones), measure all models side by side, write the report files.

    Model specs that import code, and cached step files built by such code, are refused (TrustError) unless
    `trust_code=True`; this is checked for every step before the first one runs. `on_step` is called with
    each step as it starts.
    """
    recipe = load_recipe(source)
    if recipe.model is not None:
        raise ConfigError(
            f"recipe '{recipe.path}' compresses a language model: run it with `keiryo run` or keiryo.run()"
        )
    check_name(recipe.name, f"recipe '{recipe.path}'", "the recipe's name")  # also for Recipe objects
    for step in recipe.steps:
        check_name(step.name, where(recipe.path, step.line), "a step's name")
        spec = step.options.get("model" if step.kind == "train" else "student")
        if spec is not None:
            models.check_trusted(spec, trust_code, f"{where(recipe.path, step.line)} (step '{step.name}')")
    out = Path(out_dir or Path("keiryo-out") / recipe.name)
    out.mkdir(parents=True, exist_ok=True)
    splits = data.load_data(recipe.data, seed=recipe.seed)
    example = data.example_inputs(splits, 64)
    keys: dict[str, str] = {}
    loaded: dict[str, nn.Module] = {}
    outcomes: list[StepOutcome] = []
    for step in recipe.steps:
        inputs = [keys[s] for s in (step.source, step.options.get("teacher")) if s]
        key = keys[step.name] = step_key(recipe, step, inputs)
        meta_path = out / f"{step.name}.json"
        model_path = out / f"{step.name}.pt" if step.kind in MODEL_STEPS else None
        if on_step is not None:
            on_step(step)
        previous = read_meta(meta_path)
        made = model_path if model_path is not None else out / step.name if step.kind == "deploy" else None
        fresh = not force and previous.get("key") == key and (made is None or made.exists())
        started = time.perf_counter()
        info = previous.get("info") if isinstance(previous.get("info"), dict) else {}
        if fresh and model_path is not None:
            try:
                loaded[step.name] = artifacts.load(model_path, trust_code=trust_code)
            except ArtifactError:  # corrupt or foreign: run the step again, which replaces it
                fresh = False
        if not fresh:
            context = _Context(recipe, splits, example, loaded, out, progress, trust_code)
            model, info = _run_step(step, context)
            if model is not None:
                artifacts.save(model, model_path, metadata={"recipe": recipe.name, "step": step.name})
                loaded[step.name] = model
            configs = {name: record(c) for name, c in step.configs.items() if c is not None}
            blob = {"key": key, "kind": step.kind, "options": step.options, "configs": configs, "info": info}
            fileio.atomic_write_bytes(json.dumps(blob, indent=2, default=str).encode(), meta_path)
        outcomes.append(StepOutcome(step, model_path, fresh, time.perf_counter() - started, info))
    rows = {**loaded, **_deployed(outcomes, out)}
    result = measuring.compare(rows, example, splits, Timing(threads=torch.get_num_threads()))
    report.write_reports(result, out, title=f"keiryo recipe: {recipe.name}", notes=_notes(outcomes))
    return result, outcomes


def _notes(outcomes: list[StepOutcome]) -> list[str]:
    notes = []
    for o in outcomes:
        state = "reused" if o.cached else f"ran in {o.seconds:.1f} s"
        extra = "; ".join(f"{k}: {v}" for k, v in o.info.items() if not isinstance(v, (dict, list)))
        notes.append(f"{o.step.name} ({o.step.kind}, {state})" + (f": {extra}" if extra else ""))
    return notes


@dataclass
class _Context:
    """What every step may use: the recipe, its data, the models of the steps before, where to write."""

    recipe: Recipe
    splits: data.DataSplits
    example: torch.Tensor
    loaded: dict[str, nn.Module]
    out: Path
    progress: bool
    trust_code: bool


def _run_step(step: Step, ctx: _Context) -> tuple[nn.Module | None, dict[str, Any]]:
    """The one place that maps a step to the public API; returns (model or None, info for the report)."""
    if step.kind == "train":
        return _train(step, ctx), {}
    if step.kind == "prune":
        return _prune(step, ctx), {}
    if step.kind == "distill":
        return _distill(step, ctx), {}
    if step.kind == "quantize":
        return _quantize(step, ctx)
    if step.kind == "export":
        return None, _export(step, ctx)
    if step.kind == "deploy":
        return None, _deploy(step, ctx)
    raise ConfigError(f"unknown step '{step.kind}'")  # load_recipe already rejects these


def _train(step: Step, ctx: _Context) -> nn.Module:
    o, seed = step.options, ctx.recipe.seed
    model = model_for_data(o.get("model", "cnn"), ctx.splits, o.get("model_args"), seed, ctx.trust_code)
    strategy = step.configs["strategy"]
    resumable = strategy.kind != "pipeline"  # pipeline training keeps no checkpoints
    config = replace(
        step.configs["train"],
        checkpoint=str(ctx.out / f"{step.name}.ckpt") if resumable else None,
        resume=resumable,
        progress=ctx.progress,
    )
    train(model, ctx.splits, strategy, config)
    return model


def _prune(step: Step, ctx: _Context) -> nn.Module:
    source = ctx.loaded[step.source]
    finetune = step.configs["finetune"]
    if finetune is not None:
        finetune = replace(finetune, progress=ctx.progress)
    teacher = source if step.options.get("distill") else None
    return prune(source, step.configs["method"], ctx.example, ctx.splits, finetune, teacher)


def _distill(step: Step, ctx: _Context) -> nn.Module:
    o, seed = step.options, ctx.recipe.seed
    if "student" in o:
        student = model_for_data(o["student"], ctx.splits, o.get("student_args"), seed, ctx.trust_code)
    else:
        student = copy.deepcopy(ctx.loaded[step.source])
    teacher = ctx.loaded[o.get("teacher", step.source)]
    config = replace(step.configs["train"], progress=ctx.progress)
    return distill(teacher, student, ctx.splits, step.configs["distill"], config)


def _quantize(step: Step, ctx: _Context) -> tuple[nn.Module, dict[str, Any]]:
    """The quantized model, and what quantize chose and why (kept float, a kernel, its speed-up) for the
    report: a step that keeps float says so."""
    source = ctx.loaded[step.source]
    model = quantize(source, step.configs["method"], ctx.splits, ctx.example, step.configs["policy"])
    report = report_of(model)
    return model, ({"chosen": report.message} if report is not None else {})


def _export(step: Step, ctx: _Context) -> dict[str, Any]:
    fmt = step.options.get("format", "onnx")
    result = export(
        ctx.loaded[step.source], ctx.example, ctx.out / f"{step.name}{SUFFIXES.get(fmt, '')}", fmt
    )
    timing = {"runtime_p50_ms": result.runtime_p50_ms, "torch_p50_ms": result.torch_p50_ms}
    info = {"file": result.path.name, "bytes": result.bytes, "max_error": f"{result.max_error:.2e}"}
    return {**info, **{k: round(v, 3) for k, v in timing.items() if v is not None}}


def _deploy(step: Step, ctx: _Context) -> dict[str, Any]:
    """The fastest way to run the step's model here (`keiryo.deploy`), written to `<out>/<name>/`."""
    config = replace(step.configs["deploy"], progress=ctx.progress)
    source = ctx.loaded[step.source]
    result = deploy(source, inputs.take(ctx.example, 0, 1), ctx.splits, config, ctx.out / step.name)
    chosen = ", ".join(
        f"b{b} {name} ({result.candidate(name).speedup[b]:.2f}× float)" for b, name in result.chosen.items()
    )
    return {"chosen": chosen, "notes": " · ".join(result.messages), "written": " · ".join(result.written)}


def _deployed(outcomes: list[StepOutcome], out: Path) -> dict[str, nn.Module]:
    """The models each deploy step chose (one per distinct winner), loaded from its folder for the table."""
    rows: dict[str, nn.Module] = {}
    for o in outcomes:
        if o.step.kind != "deploy":
            continue
        chosen, _ = deployed_choice(out / o.step.name)
        for b, candidate in chosen.items():
            name = f"{o.step.name} ({candidate})"
            if name not in rows:
                rows[name] = load_deployed(out / o.step.name, b)
    return rows
