"""`keiryo run` and `keiryo demo`: run a recipe's steps, then print the side-by-side table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keiryo import report
from keiryo.cli.lm import print_table
from keiryo.cli.options import TrustCodeOpt
from keiryo.cli.outputs import check_folder, console
from keiryo.lm_recipe import run_lm_recipe
from keiryo.recipe import Recipe, Step, demo_recipe, load_recipe
from keiryo.steps import run_recipe


def run(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file (see recipes/digits.yaml).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (default: keiryo-out/NAME).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Run every step again, even unchanged ones.")] = (
        False
    ),
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    trust_code: Annotated[
        bool, typer.Option("--trust-code", help="Allow model specs in the recipe that import your code.")
    ] = False,
) -> None:
    """Run a recipe: its steps in order (unchanged ones reused), then the side-by-side report.

    Writes each step's model (.pt) and figures (.json), report.md, report.html, metrics.json and
    tradeoffs.png. An interrupted run resumes where it stopped.

    A recipe with a top-level `model: gguf:FILE` (or hf:DIR) compresses a language model: its steps are
    `lm-compress: {method: width+int8, windows: 512, length: 256, layers: 0.25, precision: bf16, from: STEP}`
    (each a `keiryo lm compress`, on the recipe's model unless `from` names a step), its `data` the text
    (shakespeare or a file); every model is then measured as `keiryo lm eval` does (report.md,
    metrics.json).

    Example: keiryo run recipes/digits.yaml --out keiryo-demo
    """
    _run_and_print(load_recipe(recipe), out, force=force, progress=progress, trust_code=trust_code)


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's models and report.")] = Path(
        "keiryo-demo"
    ),
    quick: Annotated[bool, typer.Option("--quick", help="One epoch per training step (a smoke test).")] = (
        False
    ),
    force: Annotated[bool, typer.Option("--force", help="Run every step again.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    trust_code: TrustCodeOpt = False,
) -> None:
    """Run the built-in recipe on digits: train a cnn teacher, prune, distil, quantize, export, report.

    No network needed: the data ships with scikit-learn. The recipe is recipes/digits.yaml.

    Example: keiryo demo --out keiryo-demo
    """
    check_folder(out)
    recipe = demo_recipe(quick=quick)
    console.print(
        "[bold]keiryo demo[/bold]: digits (1,797 real 8×8 images) · "
        + " → ".join(s.kind for s in recipe.steps)
    )
    _run_and_print(recipe, out, force=force, progress=progress, trust_code=trust_code)


def _run_and_print(
    recipe: Recipe, out: Path | None, *, force: bool, progress: bool, trust_code: bool
) -> None:
    def announce(step: Step) -> None:
        console.print(f"[bold]▶ {step.name}[/bold] ({step.kind})")

    folder = check_folder(out or Path("keiryo-out") / recipe.name)
    if recipe.model is not None:  # a language model's recipe: compress, then measure as `keiryo lm eval`
        chain = " → ".join(f"{step.name} ({step.options['method']})" for step in recipe.steps)
        console.print(f"[bold]keiryo run[/bold]: {recipe.name} · {recipe.model} · {recipe.data} · {chain}")
        print_table(run_lm_recipe(recipe, folder, force=force, progress=progress))
        console.print(f"report: {folder / 'report.md'} · {folder / 'metrics.json'}")
        return
    result, outcomes = run_recipe(
        recipe, folder, progress=progress, force=force, on_step=announce, trust_code=trust_code
    )
    title = f"keiryo run: {outcomes[0].step.name} → {outcomes[-1].step.name}"
    report.print_report(result, title=title, console=console)
    for outcome in outcomes:
        state = "reused" if outcome.cached else f"{outcome.seconds:.1f} s"
        extra = "  ".join(f"{k} {v}" for k, v in outcome.info.items() if v is not None)
        console.print(f"  {outcome.step.name:<10} {outcome.step.kind:<9} {state:>8}  {extra}")
    console.print(f"report: {folder / 'report.html'} · {folder / 'report.md'}")
