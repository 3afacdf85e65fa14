"""`keiryo quantize`, `prune`, `distill` and `optimize`: make a model file smaller or faster, and show the
model before and after side by side."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from keiryo import artifacts, data, models, report
from keiryo.cli.options import (
    DataOpt,
    DeviceOpt,
    LrOpt,
    ModelOutOpt,
    PatienceOpt,
    PrecisionOpt,
    ProgressOpt,
    RunsOpt,
    SeedOpt,
    ThreadsOpt,
    TrustCodeOpt,
    float_list,
    parse_kwargs,
    parse_pair,
    training,
)
from keiryo.cli.outputs import check_fits, check_output, console, data_path, save, size, staged
from keiryo.compress.distill import Distill
from keiryo.compress.distill import distill as run_distill
from keiryo.compress.prune import prune as run_prune
from keiryo.compress.prune_config import check_options as check_prune
from keiryo.compress.prune_config import method_from
from keiryo.compress.qconfig import CONFIGS, Policy, QuantConfig, method_of
from keiryo.compress.qconfig import check_options as check_quantize
from keiryo.compress.quantize import quantize as run_quantize
from keiryo.compress.quantize import report_of
from keiryo.compress.quantize import sensitivity as layer_sensitivity
from keiryo.errors import ConfigError
from keiryo.examples import example_inputs, metadata_for, model_for_data
from keiryo.loop import TrainConfig
from keiryo.measuring import compare
from keiryo.metrics import Timing, accuracy
from keiryo.metrics import threads as fixed_threads
from keiryo.optimize import Search, parse_duration
from keiryo.optimize import optimize as run_optimize
from keiryo.summary import candidate_lines, tried_line


def quantize(
    model_file: Annotated[Path, typer.Argument(help="The trained model file to quantize.")],
    method: Annotated[
        str,
        typer.Option(
            help="fp32 | fp16 | bf16 | int8-dynamic | int8-weight-only | int4-weight-only | int8-static | qat"
        ),
    ] = "int8-dynamic",
    out: ModelOutOpt = Path("quantized.pt"),
    calibration: Annotated[
        str | None,
        typer.Option("--calibration", "-c", help="Data to calibrate int8-static on and to train qat with."),
    ] = None,
    data_source: Annotated[
        str | None, typer.Option("--data", "-d", help="Data for the accuracy column (else --calibration).")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="auto (measure all, keep the fastest within tolerance) | fbgemm | torchao...")
    ] = "auto",
    granularity: Annotated[
        str | None, typer.Option(help="int8 weight scales: per-tensor | per-channel (auto tries both).")
    ] = None,
    affine: Annotated[bool, typer.Option("--affine", help="Affine int8 weights, not symmetric.")] = False,
    skip: Annotated[list[str] | None, typer.Option(help="Layer to keep in float (repeatable).")] = None,
    group_size: Annotated[int, typer.Option(help="int4 weights per scale: 32 | 64 | 128.")] = 32,
    observer: Annotated[str, typer.Option(help="int8-static ranges: histogram | minmax | percentile.")] = (
        "histogram"
    ),
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="Let auto also try torch.compile'd kernels (default: for models of 10M+ parameters).",
        ),
    ] = None,
    qat_epochs: Annotated[int, typer.Option(min=1, help="Fake-quantized training epochs for qat.")] = 3,
    sensitivity: Annotated[
        bool, typer.Option("--sensitivity", help="Also print the error each layer adds when quantized alone.")
    ] = False,
    threads: ThreadsOpt = None,
    trust_code: TrustCodeOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Quantize a model file with the fastest kernel that keeps its outputs, and show before/after.

    Example: keiryo quantize cnn.pt --method int8-static --calibration digits --out cnn-int8.pt
    """
    check_output(out, inputs=[model_file, data_path(calibration), data_path(data_source)])
    qat = TrainConfig(epochs=qat_epochs, lr=5e-4, seed=seed, device="cpu", progress=False)
    given = {
        "granularity": granularity,
        "symmetric": not affine,
        "group_size": group_size,
        "observer": observer,
    }
    config = _quant_config(method, {**given, "train": qat})
    policy = Policy(backend=backend, skip=tuple(skip or ()), compile=compile)
    check_quantize(config, policy, has_calibration=calibration is not None)
    original = artifacts.load(model_file, trust_code=trust_code)
    cal = data.load_data(calibration, seed=seed) if calibration else None
    splits = data.load_data(data_source, seed=seed) if data_source else cal
    check_fits(original, cal)
    check_fits(original, splits)
    example = example_inputs(original, splits, 64, seed, str(model_file))
    with staged(out) as (staged_out,):
        with fixed_threads(threads):
            quantized = run_quantize(original, config, cal, example, policy)
        chosen = report_of(quantized)
        test_acc = accuracy(quantized, splits.test) if splits is not None else None
        save(quantized, staged_out, out, {"test_accuracy": test_acc} if splits is not None else {})
        side_by_side = {model_file.stem: original, method: quantized}
        result = compare(side_by_side, example, splits, Timing(threads=threads))
        title = f"keiryo quantize ({method}, backend {chosen.backend})"
        report.print_report(result, title=title, console=console)
        for line in candidate_lines(chosen):
            console.print(line, markup=False)
        if sensitivity and method not in ("fp32", "fp16", "bf16"):
            sens_method = "int8-static" if method == "qat" else method
            for s in layer_sensitivity(original, _quant_config(sens_method, given), example, cal):
                console.print(f"  layer {s.name} ({s.kind}): SQNR {s.sqnr_db:.1f} dB, cosine {s.cosine:.4f}")
    console.print(f"saved {out} ({size(out)})")


def _quant_config(method: str, given: dict[str, object]) -> QuantConfig:
    """The method's config with the options it has (the CLI offers every method's options at once)."""
    fields = {f.name for f in dataclasses.fields(CONFIGS[method])} if method in CONFIGS else set()
    return method_of(method, **{k: v for k, v in given.items() if k in fields and v is not None})


def prune(
    model_file: Annotated[Path, typer.Argument(help="The trained model file to prune.")],
    ratio: Annotated[float, typer.Option(help="Fraction to remove (0-1) of --target.")] = 0.5,
    out: ModelOutOpt = Path("pruned.pt"),
    unstructured: Annotated[
        bool, typer.Option("--unstructured", help="Zero single weights instead of removing channels.")
    ] = False,
    importance: Annotated[
        str, typer.Option(help="l1 | l2 | bn | taylor (needs --data) | activation.")
    ] = "l2",
    target: Annotated[
        str, typer.Option(help="What --ratio removes: channels | params | flops | latency.")
    ] = "channels",
    global_pruning: Annotated[
        bool, typer.Option("--global", help="Rank all layers together instead of each layer alone.")
    ] = False,
    protect: Annotated[
        list[str] | None, typer.Option(help="Layer name to leave whole (repeatable; the classifier always).")
    ] = None,
    data_source: Annotated[
        str | None, typer.Option("--data", "-d", help="Data for taylor, fine-tuning and the accuracy column.")
    ] = None,
    iterative_steps: Annotated[int, typer.Option(min=1, help="Prune in N steps, each fine-tuned.")] = 1,
    distill: Annotated[
        bool, typer.Option("--distill", help="Fine-tune against the unpruned model's soft targets.")
    ] = False,
    finetune_epochs: Annotated[int, typer.Option(min=0, help="Fine-tuning epochs after each step.")] = 0,
    threads: ThreadsOpt = None,
    trust_code: TrustCodeOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Prune a model file: remove channels, neurons and heads (or zero weights), and show before/after.

    Example: keiryo prune cnn.pt --ratio 0.5 --importance taylor --finetune-epochs 3 --data digits -o small.pt
    """
    check_output(out, inputs=[model_file, data_path(data_source)])
    options = {"ratio": ratio, "importance": importance, "target": target, "global_pruning": global_pruning}
    kind = "unstructured" if unstructured else "structured"
    method = method_from({"kind": kind, **options, "protect": protect or (), "steps": iterative_steps})
    finetune = (
        TrainConfig(epochs=finetune_epochs, lr=1e-3, seed=seed, device="cpu", progress=False)
        if finetune_epochs
        else None
    )
    check_prune(method, finetune, has_data=data_source is not None, has_teacher=distill)
    original = artifacts.load(model_file, trust_code=trust_code)
    splits = data.load_data(data_source, seed=seed) if data_source else None
    check_fits(original, splits)
    example = example_inputs(original, splits, 64, seed, str(model_file))
    with staged(out) as (staged_out,):
        pruned = run_prune(original, method, example, splits, finetune, original if distill else None)
        test_acc = accuracy(pruned, splits.test) if splits is not None else None
        save(pruned, staged_out, out, {"test_accuracy": test_acc} if splits is not None else {})
        result = compare(
            {model_file.stem: original, "pruned": pruned}, example, splits, Timing(threads=threads)
        )
        removed = "weights, unstructured" if unstructured else target
        report.print_report(result, title=f"keiryo prune (ratio {ratio} of {removed})", console=console)
    if unstructured:
        console.print("zeroed weights are stored compactly, but dense kernels do not run faster for them")
    console.print(f"saved {out} ({size(out)})")


def distill(
    teacher: Annotated[Path, typer.Option("--teacher", "-t", help="The trained teacher's model file.")],
    student: Annotated[
        str, typer.Option("--student", "-s", help="mlp | cnn | transformer | pkg.mod:fn | file.py:fn")
    ] = "mlp",
    data_source: DataOpt = "digits",
    out: ModelOutOpt = Path("student.pt"),
    student_arg: Annotated[
        list[str] | None,
        typer.Option("--student-arg", "-a", help="Student factory argument name=value (repeatable)."),
    ] = None,
    temperature: Annotated[float, typer.Option(help="Softmax temperature T of soft targets (> 0).")] = 4.0,
    alpha: Annotated[float, typer.Option(help="Teacher term weight; 1 − alpha goes to the labels.")] = 0.9,
    loss: Annotated[str, typer.Option(help="kl (classes) | mse | cosine (regression, embeddings).")] = "kl",
    feature: Annotated[
        list[str] | None,
        typer.Option(help="Match hidden layers: student_layer=teacher_layer (repeatable)."),
    ] = None,
    cache_teacher: Annotated[
        bool, typer.Option("--cache-teacher", help="Run the teacher once per sample (data not augmented).")
    ] = False,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training split.")] = 30,
    patience: PatienceOpt = 10,
    lr: LrOpt = 3e-3,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    runs: RunsOpt = 50,
    trust_code: Annotated[
        bool,
        typer.Option("--trust-code", help="Allow a teacher file or a student spec that imports your code."),
    ] = False,
    seed: SeedOpt = 0,
    progress: ProgressOpt = True,
) -> None:
    """Train a small student to match a frozen teacher's soft targets, save it, and compare the two.

    Example: keiryo distill --teacher cnn.pt --student mlp -a hidden=[128] --data digits --out student.pt
    """
    check_output(out, inputs=[teacher, data_path(data_source)])
    models.check_trusted(student, trust_code, "--student")
    kwargs = parse_kwargs(student_arg)
    pairs = [parse_pair(f, "--feature") for f in feature or []]
    features = dict(pairs)
    if len(features) < len(pairs):
        raise ConfigError(
            "--feature names a student layer twice; match each student layer to one teacher layer"
        )
    how = Distill(temperature, alpha, loss, features or None, cache_teacher=cache_teacher)
    config = training(epochs, patience, lr, device, precision, seed=seed, progress=progress)
    teacher_model = artifacts.load(teacher, trust_code=trust_code)
    splits = data.load_data(data_source, seed=seed)
    check_fits(teacher_model, splits)
    net = model_for_data(student, splits, kwargs, seed, trust_code)
    with staged(out) as (staged_out,):
        run_distill(teacher_model, net, splits, how, config)
        trained, teacher_model = net.cpu(), teacher_model.cpu()
        test_acc = accuracy(trained, splits.test)
        extra = {"distilled_from": str(teacher), "temperature": temperature, "alpha": alpha}
        save(trained, staged_out, out, {**metadata_for(splits, test_acc), **extra})
        side_by_side = {"teacher": teacher_model, "student": trained}
        result = compare(side_by_side, data.example_inputs(splits, 64), splits, Timing(runs=runs))
        report.print_report(result, title="keiryo distill", console=console)
    console.print(f"saved {out} ({size(out)})")


def optimize(
    model_file: Annotated[Path, typer.Argument(help="A trained keiryo model file.")],
    data_source: DataOpt = "digits",
    max_drop: Annotated[float, typer.Option(help="Accuracy points it may lose (val and test).")] = 1.0,
    objective: Annotated[str, typer.Option(help="What to minimise: latency (batch 64) or size.")] = "latency",
    time_limit: Annotated[str, typer.Option(help="No new candidate after this (90s, 10m).")] = "10m",
    ratios: Annotated[str, typer.Option(help="Pruning ratios (of channels) to try.")] = "0.25,0.5,0.75",
    methods: Annotated[str, typer.Option(help="Quantization methods to try ('none' for float).")] = (
        "none,int8-dynamic"
    ),
    finetune_epochs: Annotated[int, typer.Option(min=0, help="Fine-tuning epochs after pruning.")] = 4,
    out: ModelOutOpt = Path("optimized.pt"),
    trust_code: TrustCodeOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Search pruning × distillation × quantization for the cheapest model within an accuracy budget.

    Every candidate is measured side by side; the result keeps its accuracy within --max-drop points of the
    original on both the validation split (which chooses) and the test split (which confirms).

    Example: keiryo optimize cnn.pt --data digits --max-drop 1.0 --objective latency --time-limit 10m
    """
    check_output(out, inputs=[model_file, data_path(data_source)])
    finetune = (
        TrainConfig(epochs=finetune_epochs, lr=1e-3, seed=seed, device="cpu", progress=False)
        if finetune_epochs
        else None
    )
    search = Search(
        max_drop=max_drop,
        objective=objective,
        time_limit=parse_duration(time_limit),
        ratios=float_list(ratios, "--ratios"),
        distill=(False, True) if finetune is not None else (False,),
        methods=tuple(None if m.strip() == "none" else m.strip() for m in methods.split(",") if m.strip()),
        finetune=finetune,
        seed=seed,
    )
    model = artifacts.load(model_file, trust_code=trust_code)
    splits = data.load_data(data_source, seed=seed)
    check_fits(model, splits)
    with staged(out) as (staged_out,):
        result = run_optimize(model, splits, search, on_candidate=lambda c: console.print(tried_line(c)))
        report.print_report(result.report, title="keiryo optimize: every candidate", console=console)
        for note in result.notes:
            console.print(note)
        best = result.best
        save(best.model, staged_out, out, {"test_accuracy": best.test_accuracy, "chosen": best.name})
    console.print(
        f"chosen: {best.name} (test {best.test_accuracy:.2%} vs original {result.baseline_test:.2%}, "
        f"{objective} {best.cost:.3f}{' ms' if objective == 'latency' else ' bytes'}) → {out}"
    )
