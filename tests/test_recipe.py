from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from keiryo.cli import main
from keiryo.errors import ConfigError
from keiryo.recipe import load_recipe
from keiryo.steps import run_recipe

TINY = """\
name: tiny
data: digits
steps:
  - train: {model: mlp, epochs: 1, model_args: {hidden: [32]}}
  - prune: {ratio: 0.5}
  - export: {format: onnx}
"""


def test_recipe_runs_reuses_and_reports(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    out = tmp_path / "out"
    report, outcomes = run_recipe(recipe, out, progress=False)
    assert [o.step.name for o in outcomes] == ["train", "prune", "export"]
    assert not any(o.cached for o in outcomes)
    assert [r.name for r in report.rows] == ["train", "prune"]
    assert report.rows[1].params < report.rows[0].params
    for name in ("train.pt", "prune.pt", "export.onnx", "report.md", "report.html", "metrics.json"):
        assert (out / name).exists(), name
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html  # one self-contained page
    assert json.loads((out / "export.json").read_text())["info"]["file"] == "export.onnx"
    configs = json.loads((out / "prune.json").read_text())["configs"]  # the step is its configs' asdict
    assert configs["method"]["kind"] == "structured" and configs["method"]["ratio"] == 0.5

    _, again = run_recipe(recipe, out, progress=False)
    assert all(o.cached for o in again)  # nothing changed: nothing runs

    recipe.write_text(TINY.replace("ratio: 0.5", "ratio: 0.25"))
    _, changed = run_recipe(recipe, out, progress=False)
    assert [o.cached for o in changed] == [True, False, False]  # the changed step and what follows it


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "steps:\n  - train: {}\n  - prun: {ratio: 0.5}\n",
            "line 3: unknown step 'prun' (allowed: train, prune",
        ),
        ("steps:\n  - train: {epocks: 3}\n", "line 2: unknown field 'epocks' in step 'train'"),
        (
            "steps:\n  - train: {}\n  - prune: {ratio: half}\n",
            "line 3: field 'ratio' of step 'prune' must be",
        ),
        ("steps:\n  - train: {epochs: true}\n", "field 'epochs' of step 'train' must be int"),
        ("steps:\n  - prune: {ratio: 0.5}\n", "needs a model: put a train step first"),
        ("steps:\n  - train: {}\n  - distill: {teacher: big}\n", "'big' is not an earlier step"),
        ("steps: [\n", "not valid YAML"),
        ("stepz: []\n", "unknown field 'stepz' in the recipe"),
        ("steps: []\n", "'steps' must be a non-empty list"),
        # config values, checked when the recipe is read (each config checks its own fields)
        ("steps:\n  - train: {}\n  - prune: {ratio: 1.5}\n", "line 3: step 'prune': pruning ratio"),
        ("steps:\n  - train: {strategy: ddpp}\n", "line 2: step 'train': unknown strategy 'ddpp'"),
        ("steps:\n  - train: {}\n  - distill: {alpha: 2}\n", "line 3: step 'distill': alpha"),
        ("steps:\n  - train: {}\n  - prune: {distill: true}\n", "line 3: step 'prune': a teacher"),
        (
            "steps:\n  - train: {}\n  - quantize: {method: int8-static, observer: x}\n",
            "line 3: step 'quantize': unknown observer 'x'",
        ),
        ("steps:\n  - train: {}\n  - quantize: {group_size: 64}\n", "int8-dynamic has no option group_size"),
        (
            "steps:\n  - train: {}\n  - deploy: {runtimes: [tensorrt]}\n",
            "unknown runtime or candidate 'tensorrt'",
        ),
        ("steps:\n  - train: {}\n  - deploy: {batch_sizes: [0]}\n", "line 3: step 'deploy': batch size"),
        ("steps:\n  - train: {}\n  - deploy: {also: [torch]}\n", "unknown runtime candidate in also 'torch'"),
        ("steps:\n  - train: {grad_compression: fp16}\n", "grad_compression needs strategy ddp"),
        ("steps:\n  - train: {strategy: ddp, grad_compression: fp8}\n", "unknown grad_compression 'fp8'"),
    ],
)
def test_bad_recipes_name_the_field_and_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_recipe(path)
    assert "\n" not in str(info.value) and "bad.yaml" in str(info.value)


def test_missing_recipe_file_is_a_one_line_cli_error(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe" in capsys.readouterr().err


def test_the_demo_recipe_is_valid():
    from importlib import resources

    recipe = load_recipe(str(resources.files("keiryo").joinpath("recipes/digits.yaml")))
    assert [s.kind for s in recipe.steps] == ["train", "prune", "distill", "quantize", "deploy"]
    deploy = recipe.steps[-1]
    assert deploy.source == "distill" and deploy.configs["deploy"].also == ("executorch",)
    assert deploy.configs["deploy"].batch_sizes == (1, 64)


def test_the_example_language_model_recipe_is_valid():
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "smollm2.yaml")
    assert recipe.model == "gguf:SmolLM2-135M-Instruct.Q4_1.gguf" and recipe.data == "shakespeare"
    assert [s.name for s in recipe.steps] == ["int8", "int4", "width", "width-int8"]
    assert [s.source for s in recipe.steps] == [None, None, None, "width"]
    ((name, width),) = recipe.steps[2].configs["chain"]
    assert name == "width" and width.ffn == 0.5 and width.reconstruct.precision == "bf16"
    assert width.ffn_widths == "measured"


def test_a_step_is_its_configs_and_older_spellings_still_work(tmp_path):
    from keiryo.compress.prune_config import Structured, Unstructured
    from keiryo.parallel.config import DDP

    train_step = "steps:\n  - train: {strategy: ddp, workers: 2, epochs: 2}\n"
    old = train_step + "  - prune: {ratio: 0.5, global: true, iterative_steps: 2, finetune_epochs: 1}\n"
    new = train_step + "  - prune: {ratio: 0.5, global_pruning: true, steps: 2, finetune_epochs: 1}\n"
    for text in (old, new):
        path = tmp_path / "r.yaml"
        path.write_text(text)
        train, prune = load_recipe(path).steps
        assert train.configs["strategy"] == DDP(workers=2) and train.configs["train"].epochs == 2
        assert prune.configs["method"] == Structured(ratio=0.5, global_pruning=True, steps=2)
        assert prune.configs["finetune"].epochs == 1
    path.write_text("steps:\n  - train: {}\n  - prune: {ratio: 0.5, structured: false}\n")
    assert load_recipe(path).steps[1].configs["method"] == Unstructured(ratio=0.5)
    path.write_text("steps:\n  - train: {strategy: ddp, workers: 2, grad_compression: powersgd:2}\n")
    assert load_recipe(path).steps[0].configs["strategy"] == DDP(workers=2, grad_compression="powersgd:2")


def test_quantize_step_says_what_it_chose(tmp_path):
    """A quantize step's report line names its choice, kept float included (the demo kept float silently)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: q\ndata: digits\nsteps:\n  - train: {model: mlp, epochs: 1, model_args: {hidden: [32]}}\n"
        "  - quantize: {method: int8-dynamic}\n"
    )
    _, outcomes = run_recipe(recipe, tmp_path / "out", progress=False)
    chosen = outcomes[1].info["chosen"]
    assert chosen.startswith("kept float:") or "× float" in chosen, chosen
    saved = json.loads((tmp_path / "out" / "quantize.json").read_text())["info"]
    assert saved["chosen"] == chosen


def test_deploy_step_writes_its_folder_and_its_choice_joins_the_table(tmp_path):
    """The deploy step runs keiryo.deploy on the step before it; its chosen model is a row of the report."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: d\ndata: digits\nsteps:\n  - train: {model: mlp, epochs: 1, model_args: {hidden: [32]}}\n"
        "  - deploy: {batch_sizes: [1, 8], runtimes: [onnxruntime], also: [onnxruntime], runs: 3}\n"
    )
    out = tmp_path / "out"
    report, outcomes = run_recipe(recipe, out, progress=False)
    folder = out / "deploy"
    blob = json.loads((folder / "report.json").read_text())
    assert set(blob["chosen"]) == {"1", "8"} and (folder / "onnxruntime.onnx").is_file()
    names = [r.name for r in report.rows]
    assert names[0] == "train" and all(n.startswith("deploy (") for n in names[1:]) and len(names) >= 2
    for row in report.rows[1:]:
        assert row.agreement.cosine > 0.99 and row.accuracy is not None
    info = outcomes[1].info
    assert "b1 " in info["chosen"] and "onnxruntime.onnx" in info["written"]
    _, again = run_recipe(recipe, out, progress=False)
    assert all(o.cached for o in again)
