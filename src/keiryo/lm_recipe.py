"""A language-model recipe (one with a top-level `model`), as `keiryo run` and `keiryo.run()` run it:

```yaml
name: smollm2
model: gguf:SmolLM2-135M-Instruct.Q4_1.gguf   # or hf:FOLDER
data: shakespeare                              # or a UTF-8 text file: calibration and held-out text
steps:
  - lm-compress: {name: int4, method: gptq}
  - lm-compress: {name: width, method: width, precision: bf16}
  - lm-compress: {name: width-int8, from: width, method: int8}
```

Each lm-compress step compresses the recipe's model (or, with `from`, an earlier step's) by a method or chain
of `keiryo lm compress` (`windows`, `length`, `layers`, `precision` as its options) and writes `<name>.pt`, a
keiryo LM file, in the output folder; a step whose options and inputs are unchanged is reused. Then every
model, the recipe's own first, is measured side by side as `keiryo lm eval` measures them, and the table is
written as `report.md` and `metrics.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from keiryo import fileio
from keiryo.errors import ArtifactError
from keiryo.fileio import staged
from keiryo.lm.job import CalibrationText, compress_file
from keiryo.lm.load import spec_path
from keiryo.lm.measure import EvalOptions, LMTable, as_json, markdown, measure
from keiryo.lm.store import load_lm
from keiryo.progress import say
from keiryo.recipe import Recipe, read_meta, step_key
from keiryo.units import human_bytes


def run_lm_recipe(recipe: Recipe, folder: Path, *, force: bool = False, progress: bool = True) -> LMTable:
    """Run `recipe`'s lm-compress steps into `folder` (unchanged ones reused), then measure every model, the
    recipe's own first, and write the table as `report.md` and `metrics.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    specs = [recipe.model]
    for step in recipe.steps:
        source = recipe.model if step.source is None else str(folder / f"{step.source}.pt")
        upstream = _file_id(recipe.model) if step.source is None else keys[step.source]
        key = keys[step.name] = step_key(recipe, step, [upstream])
        out, meta = folder / f"{step.name}.pt", folder / f"{step.name}.json"
        if progress:
            say(f"[bold]▶ {step.name}[/bold] ({step.options['method']})")
        if not force and out.is_file() and read_meta(meta).get("key") == key and _readable(out):
            if progress:
                say(f"{step.name}: reused {out} (its options and inputs are unchanged)")
        else:
            options = step.options
            text = CalibrationText(recipe.data, options.get("windows"), options.get("length"), recipe.seed)
            size = compress_file(source, step.configs["chain"], out, text, progress=progress)
            if progress:
                say(f"{options['method']}: saved {out} ({human_bytes(size)}, keiryo LM file)")
            record = {"key": key, "kind": step.kind, "options": options, "source": source, "bytes": size}
            fileio.atomic_write_bytes(json.dumps(record, indent=2).encode(), meta)
        specs.append(str(out))
    table = measure(specs, recipe.data, EvalOptions(), progress)
    with staged(folder / "metrics.json", folder / "report.md") as (json_tmp, markdown_tmp):
        fileio.atomic_write_bytes(json.dumps(as_json(table), indent=2).encode(), json_tmp)
        fileio.atomic_write_bytes(markdown(table).encode(), markdown_tmp)
    return table


def _readable(path: Path) -> bool:
    """Whether a step's kept file still loads (a corrupt or foreign one is made again, as keiryo.run does)."""
    try:
        load_lm(path)
    except ArtifactError:
        return False
    return True


def _file_id(spec: str) -> str:
    """The model a spec names: its path, sizes and modification times (a changed model runs steps again)."""
    path = spec_path(spec)
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return json.dumps([str(path.resolve()), stats])
