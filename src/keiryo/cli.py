"""The `keiryo` command: parse, call the public API, print. Errors are caught once, in `main`.

Nothing is lost on a failed run: every command checks its options and its output paths (a folder, a path under
a file, a folder it cannot write in, an output that is also an input) before any work, writes its outputs to
temporary names beside them, and renames them into place only when the whole command has succeeded; a failing
or interrupted run leaves an existing output byte for byte as it was.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import signal
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated

import torch
import typer
import yaml
from rich.console import Console

from keiryo import artifacts, data, devices, fileio, models, provenance, report
from keiryo.errors import ArtifactError, ConfigError, KeiryoError, check_bytes, one_line
from keiryo.loop import TrainConfig
from keiryo.loop import train as run_training
from keiryo.metrics import accuracy, compare
from keiryo.recipe import Recipe, load_recipe, run_recipe

app = typer.Typer(
    name="keiryo",
    help="Faster PyTorch training and lighter models, with the measurements to prove both.\n\n"
    "Start with `keiryo demo`; every command takes --help with an example.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, files) gets a wide fixed width so that tables are not squeezed into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 180)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 400)

# Libraries' notes to their own developers (deprecations inside torch, exporter tips) would break the one-line
# output of a command; KEIRYO_DEBUG=1 shows them.
LIBRARY_WARNINGS = r"(torch|torchao|torch_pruning|onnx|onnxruntime|onnxscript)(\.|$)"
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64-bit seeds
MAX_BATCH = 2**31 - 1
DataOpt = Annotated[
    str, typer.Option("--data", "-d", help="'digits' (built in), or a .npz/.pt/.csv file or an image folder.")
]
SeedOpt = Annotated[
    int, typer.Option(min=0, max=MAX_SEED, help="Seed for the split, the initial weights and the shuffle.")
]
ThreadsOpt = Annotated[int | None, typer.Option(min=1, help="Intra-op threads for the timing.")]
TrustCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code", help="Allow model files and specs that import your code (pkg.mod:fn, file.py:fn)."
    ),
]
RunsOpt = Annotated[int, typer.Option(min=1, help="Timed runs per batch size in the table.")]


def _parse_kwargs(pairs: list[str] | None) -> dict:
    """['width=64', 'hidden=[128,64]'] -> {'width': 64, 'hidden': [128, 64]} (values read as YAML)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"model argument '{pair}' must look like name=value")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or one_line(exc)
            raise ConfigError(
                f"model argument '{pair}': the value is not valid YAML ({problem}); e.g. hidden=[128,64]"
            ) from None
    return out


def _build_for_data(
    spec: str, splits: data.DataSplits, extra: dict, seed: int = 0, trust_code: bool = False
) -> object:
    """A model sized to the data, with seeded initial weights so that runs repeat exactly."""
    torch.manual_seed(seed)
    kwargs = (
        models.kwargs_for_data(spec, splits.input_shape, splits.num_classes) if spec in models.BUILTIN else {}
    )
    return models.build_model(spec, trust_code=trust_code, **{**kwargs, **extra})


# --- outputs: checked before any work, written under temporary names, renamed at the end -------------------


def _same_path(a: Path | None, b: Path | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _probe_folder(folder: Path, target: Path, option: str) -> None:
    """The nearest existing folder at or above `folder` must be a folder this process can create files in."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{option} '{target}': '{folder}' is a file, so no folder can be made there")
    try:
        fd, probe = tempfile.mkstemp(prefix=".keiryo-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"{option} '{target}': cannot write in folder '{folder}' ({exc.strerror})"
        ) from None


def _check_output(path: Path, option: str = "--out", inputs: Sequence[Path | str | None] = ()) -> Path:
    """Refuse, before any work, an output file that cannot be written or that is also one of the inputs."""
    if path.is_dir():
        raise ConfigError(f"{option} '{path}' is a folder; give the path of a file to write")
    for source in inputs:
        if source is not None and Path(source).exists() and _same_path(path, Path(source)):
            raise ConfigError(
                f"{option} '{path}' is also an input; write to another path so the input is kept"
            )
    _probe_folder(path.parent, path, option)
    return path


def _check_folder(path: Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that is a file or that cannot be written in."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} '{path}' is a file; give a folder to write the outputs in")
    _probe_folder(path, path, option)
    return path


@contextlib.contextmanager
def _staged(*targets: Path | None) -> Iterator[list[Path | None]]:
    """A temporary path beside each target; each is renamed onto its target only if the block succeeds.

    Whatever ends the block early (an error, Ctrl-C) removes the temporary files and leaves every target as
    it was; so does a Ctrl-C that a library swallowed during the block.
    """
    temps = [None if t is None else t.with_name(f".{t.name}.{secrets.token_hex(4)}.partial") for t in targets]
    try:
        yield temps
        if _interrupted():  # Ctrl-C was pressed and a library swallowed it: write nothing
            raise KeyboardInterrupt
        umask = os.umask(0)
        os.umask(umask)
        for temp, target in zip(temps, targets, strict=True):
            if temp is not None and target is not None and temp.exists():
                try:
                    os.chmod(temp, 0o666 & ~umask)  # temporary files are created 0600; give the usual mode
                    os.replace(temp, target)
                except OSError as exc:
                    raise ArtifactError(f"cannot write '{target}': {exc.strerror}") from None
    finally:
        for temp in temps:
            if temp is not None:
                temp.unlink(missing_ok=True)


def _save(model: object, path: Path, target: Path, metadata: dict) -> None:
    """`artifacts.save` to a staged path; a full disk or a vanished folder becomes a one-line error."""
    try:
        artifacts.save(model, path, metadata=metadata)
    except OSError as exc:
        raise ArtifactError(f"cannot write '{target}': {exc.strerror or one_line(exc)}") from None


def _write_text(text: str, path: Path, target: Path) -> None:
    try:
        fileio.atomic_write_bytes(text.encode(), path)
    except OSError as exc:
        raise ArtifactError(f"cannot write '{target}': {exc.strerror or one_line(exc)}") from None


def _size(path: Path) -> str:
    return report.human_bytes(path.stat().st_size)


def _data_path(source: str | None) -> Path | None:
    """The data source as a path, when it names an existing file or folder (not a built-in name)."""
    return Path(source) if source and Path(source).exists() else None


def _check_fits(model: object, splits: data.DataSplits | None) -> None:
    """One sample of the data through the model, before any work: a mismatch is a one-line error."""
    if splits is not None:
        data.check_model_fits(model, splits)


@app.command()
def train(
    model: Annotated[
        str, typer.Option("--model", "-m", help="mlp | cnn | transformer | pkg.mod:fn | file.py:fn")
    ] = "cnn",
    data_source: DataOpt = "digits",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the trained model file.")] = Path(
        "model.pt"
    ),
    model_arg: Annotated[
        list[str] | None, typer.Option("--model-arg", "-a", help="Factory argument name=value (repeatable).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training split.")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="Samples per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")] = 3e-3,
    device: Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16 (autocast).")] = "fp32",
    compile: Annotated[bool, typer.Option("--compile", help="Use torch.compile.")] = False,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint file, written each epoch (and every --checkpoint-every steps)."),
    ] = None,
    checkpoint_every: Annotated[
        int, typer.Option(min=0, help="Also checkpoint every N steps (0: epoch ends only).")
    ] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from --checkpoint if it exists.")
    ] = False,
    seed: SeedOpt = 0,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    strategy: Annotated[
        str, typer.Option(help="single | ddp | fsdp | pipeline (--workers processes) | async (Ray workers).")
    ] = "single",
    workers: Annotated[
        int, typer.Option(min=1, help="Local worker processes (under torchrun: its WORLD_SIZE decides).")
    ] = 1,
    timeout: Annotated[
        float, typer.Option(help="Seconds before a crashed or hung worker stops the whole run.")
    ] = 120.0,
    split_point: Annotated[
        list[str] | None,
        typer.Option(help="Pipeline: module name a new stage starts at (repeatable; default: balanced)."),
    ] = None,
    pipeline_schedule: Annotated[str | None, typer.Option(help="Pipeline schedule: gpipe | 1f1b.")] = None,
    microbatches: Annotated[int | None, typer.Option(min=1, help="Pipeline micro-batches per batch.")] = None,
    async_mode: Annotated[
        str, typer.Option(help="Async: async | bounded | scaled | dcasgd | sync (barrier, to compare).")
    ] = "async",
    staleness_bound: Annotated[
        int, typer.Option(min=0, help="Async bounded: discard pushes staler than S.")
    ] = 4,
    slowdown: Annotated[
        str | None, typer.Option(help="Async: per-worker slowdown factors, e.g. 1,1,1,4 (experiments).")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Async: join this Ray cluster (default: start Ray locally).")
    ] = None,
    trust_code: TrustCodeOpt = False,
) -> None:
    """Train a model and save it with its measured test accuracy; in one process, N local workers or torchrun.

    --batch-size is the whole batch: with ddp/fsdp each of the N workers takes 1/N of it.

    Example: keiryo train --model cnn --data digits --epochs 10 --out cnn.pt --checkpoint ck.pt --resume
    Example: keiryo train --model cnn --strategy ddp --workers 2 --epochs 3 --out cnn.pt
    """
    _check_output(out, inputs=[_data_path(data_source)])
    if checkpoint is not None:
        _check_output(checkpoint, "--checkpoint", inputs=[_data_path(data_source)])
        if _same_path(checkpoint, out):
            raise ConfigError("--checkpoint and --out are the same file; the checkpoint needs its own path")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"--timeout must be a number of seconds > 0, got {timeout}")
    if pipeline_schedule is not None:
        from keiryo.parallel.pipeline import SCHEDULES

        if pipeline_schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown pipeline schedule '{pipeline_schedule}' (choose {' or '.join(SCHEDULES)})"
            )
    models.check_trusted(model, trust_code, "--model")
    kwargs = _parse_kwargs(model_arg)
    async_options = _async_options(strategy, async_mode, staleness_bound, slowdown, ray_address)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        device=device,
        precision=precision,
        compile=compile,
        checkpoint=str(checkpoint) if checkpoint else None,
        checkpoint_every=checkpoint_every,
        resume=resume,
        seed=seed,
        progress=progress,
    )
    splits = data.load_data(data_source, seed=seed)
    net = _build_for_data(model, splits, kwargs, seed, trust_code)
    with _staged(out) as (staged,):
        result = run_training(
            net,
            splits,
            strategy=strategy,
            workers=workers,
            timeout=timeout,
            split_points=split_point,
            pipeline_schedule=pipeline_schedule,
            microbatches=microbatches,
            async_options=async_options,
            **{k: getattr(config, k) for k in TrainConfig.__dataclass_fields__},
        )
        trained = result.model.cpu()
        if result.parallel and not _print_parallel(result.parallel, strategy):
            return  # only rank 0 writes and reports
        test_acc = accuracy(trained, splits.test)
        _save(trained, staged, out, _metadata(splits, test_acc))
    if result.resumed_from is not None:
        console.print(f"resumed from step {result.resumed_from} of {checkpoint}")
    acc_text = f"test accuracy {test_acc:.2%}" if test_acc is not None else "trained (regression)"
    console.print(f"{acc_text} · saved {out} ({_size(out)})")


def _print_parallel(par: dict, strategy: str) -> bool:
    """Print a parallel run's figures; False on the workers other than rank 0, which write nothing."""
    same = "same on all workers" if par["weights_identical"] else "DIFFERENT across workers"
    err_console.print(f"rank {par['rank']}/{par['workers']}: weights sha256 {par['fingerprint']} ({same})")
    if par["rank"] != 0:
        return False
    memory = " · ".join(
        f"worker {i}: {report.human_bytes(m['params'] + m['grads'] + m['optimizer'])}"
        for i, m in enumerate(par["memory"])
    )
    console.print(f"{strategy} on {par['workers']} workers · params+grads+optimizer per worker: {memory}")
    if strategy == "pipeline":
        stages = ", ".join(report.human_bytes(b) for b in par["stage_param_bytes"])
        console.print(
            f"stages split before {', '.join(par['split_points'])} · parameters per stage: {stages} · "
            f"{par['schedule']} with {par['microbatches']} micro-batches, bubble {par['bubble']:.0%}"
        )
    return True


def _async_options(
    strategy: str, mode: str, bound: int, slowdown: str | None, address: str | None
) -> dict | None:
    """The parameter server's options, for --strategy async only."""
    if strategy != "async":
        return None
    options: dict = {"mode": mode, "staleness_bound": bound, "ray_address": address}
    if slowdown:
        try:
            options["slowdown"] = [float(v) for v in slowdown.split(",")]
        except ValueError:
            raise ConfigError(f"--slowdown must be comma-separated numbers, got '{slowdown}'") from None
        if not all(math.isfinite(v) and v > 0 for v in options["slowdown"]):
            raise ConfigError(f"--slowdown factors must be numbers > 0, got '{slowdown}'")
    return options


def _metadata(splits: data.DataSplits, test_accuracy: float | None) -> dict:
    return {
        "data": splits.name,
        "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes,
        "classes": splits.classes,
        "test_accuracy": test_accuracy,
    }


@app.command()
def bench(
    model_files: Annotated[list[Path], typer.Argument(help="Model files; the first is the baseline.")],
    data_source: Annotated[
        str | None, typer.Option("--data", "-d", help="Data for accuracy and agreement (test split).")
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes to time.")] = "1,64",
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per batch size (after warm-up).")] = 50,
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads (default: torch's).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write raw numbers as JSON.")] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Also write a markdown table.")
    ] = None,
    trust_code: TrustCodeOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Measure model files side by side: size, FLOPs, latency, throughput, accuracy, agreement.

    Example: keiryo bench teacher.pt student.pt --data digits --batch-sizes 1,64 --threads 2
    """
    sizes = _int_list(batch_sizes, "--batch-sizes")
    inputs = [*model_files, _data_path(data_source)]
    for option, path in (("--json", json_out), ("--markdown", markdown_out)):
        if path is not None:
            _check_output(path, option, inputs)
    if _same_path(json_out, markdown_out):
        raise ConfigError("--json and --markdown are the same file; give each its own path")
    loaded = {}
    for path in model_files:
        name = path.stem if path.stem not in loaded else str(path)
        loaded[name] = artifacts.load(path, trust_code=trust_code)
    splits = data.load_data(data_source, seed=seed) if data_source else None
    for model in loaded.values():
        _check_fits(model, splits)
    example = _example_inputs(model_files[0], next(iter(loaded.values())), splits, max(sizes), seed)
    with _staged(json_out, markdown_out) as (json_tmp, markdown_tmp):
        result = compare(loaded, example, splits, batch_sizes=tuple(sizes), runs=runs, num_threads=threads)
        report.print_report(result, title="keiryo bench", console=console)
        if json_out and json_tmp:
            _write_text(report.to_json(result), json_tmp, json_out)
        if markdown_out and markdown_tmp:
            _write_text(report.markdown(result), markdown_tmp, markdown_out)


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option} must be positive integers, got '{text}'")
    if max(values) > MAX_BATCH:
        raise ConfigError(f"{option} must be at most {MAX_BATCH}, got '{text}'")
    return values


@app.command()
def prune(
    model_file: Annotated[Path, typer.Argument(help="The trained model file to prune.")],
    ratio: Annotated[float, typer.Option(help="Fraction to remove (0-1) of --target.")] = 0.5,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the pruned model.")] = Path(
        "pruned.pt"
    ),
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
    iterative_steps: Annotated[
        int, typer.Option(min=1, help="Prune in N steps (fine-tuning after each).")
    ] = 1,
    finetune_epochs: Annotated[int, typer.Option(min=0, help="Fine-tuning epochs after each step.")] = 0,
    distill: Annotated[
        bool, typer.Option("--distill", help="Fine-tune against the unpruned model's soft targets.")
    ] = False,
    threads: ThreadsOpt = None,
    trust_code: TrustCodeOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Prune a model file: remove channels, neurons and heads (or zero weights), and show before/after.

    Example: keiryo prune cnn.pt --ratio 0.5 --importance taylor --finetune-epochs 3 --data digits -o small.pt
    """
    from keiryo.compress.prune import check_options
    from keiryo.compress.prune import prune as prune_model

    _check_output(out, inputs=[model_file, _data_path(data_source)])
    check_options(
        ratio, not unstructured, importance, target, iterative_steps, finetune_epochs,
        has_data=data_source is not None, has_teacher=distill,
    )  # fmt: skip
    finetune = TrainConfig(lr=1e-3, seed=seed, device="cpu", progress=False)
    original = artifacts.load(model_file, trust_code=trust_code)
    splits = data.load_data(data_source, seed=seed) if data_source else None
    _check_fits(original, splits)
    example = _example_inputs(model_file, original, splits, 64, seed)
    with _staged(out) as (staged,):
        pruned = prune_model(
            original,
            ratio,
            structured=not unstructured,
            example_inputs=example,
            importance=importance,
            target=target,
            global_pruning=global_pruning,
            protect=protect,
            data=splits,
            iterative_steps=iterative_steps,
            finetune_epochs=finetune_epochs,
            finetune=finetune,
            teacher=original if distill else None,
        )
        test_acc = accuracy(pruned, splits.test) if splits is not None else None
        _save(pruned, staged, out, {"test_accuracy": test_acc} if splits is not None else {})
        result = compare({model_file.stem: original, "pruned": pruned}, example, splits, num_threads=threads)
        removed = "weights, unstructured" if unstructured else target
        report.print_report(result, title=f"keiryo prune (ratio {ratio} of {removed})", console=console)
    if unstructured:
        console.print("zeroed weights are stored compactly, but dense kernels do not run faster for them")
    console.print(f"saved {out} ({_size(out)})")


def _example_inputs(model_file: Path, model: object, splits: data.DataSplits | None, batch: int, seed: int):
    """Inputs to measure or export with: the data's test inputs, else random ones of the recorded shape."""
    if splits is not None:
        check_bytes(batch * 4 * math.prod(splits.input_shape), f"a batch of {batch} inputs")
        return data.example_inputs(splits, batch)
    shape = provenance.metadata_of(model).get("input_shape")
    if not shape:
        raise ConfigError(f"'{model_file}' does not record its input shape; pass --data")
    check_bytes(batch * 4 * math.prod(shape), f"a batch of {batch} inputs")
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


@app.command("export")
def export_command(
    model_file: Annotated[Path, typer.Argument(help="A keiryo model file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The exported file (.onnx, .pt2, .safetensors).")],
    format: Annotated[
        str, typer.Option(help="onnx | onnx-int8 (int8 by onnxruntime) | torch-export | safetensors.")
    ] = "onnx",
    data_source: Annotated[
        str | None, typer.Option("--data", "-d", help="Data whose inputs check the export (else random).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH, help="Batch size of the check and the timing.")
    ] = 64,
    trust_code: TrustCodeOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Export a model for deployment and verify the file: max error against PyTorch, and runtime latency.

    The check loads the written file afresh (onnxruntime, torch.export.load, a new copy of the architecture
    for safetensors) and compares its outputs with the model's; a file that does not reproduce it is not kept.

    Example: keiryo export cnn.pt --format onnx --out cnn.onnx --data digits
    """
    from keiryo.export import check_target
    from keiryo.export import export as export_model

    check_target(out, format)
    _check_output(out, inputs=[model_file, _data_path(data_source)])
    model = artifacts.load(model_file, trust_code=trust_code)
    splits = data.load_data(data_source, seed=seed) if data_source else None
    _check_fits(model, splits)
    example = _example_inputs(model_file, model, splits, batch_size, seed)
    result = export_model(model, example, out, format)
    console.print(f"exported {model_file} → {result.path} ({format}, {report.human_bytes(result.bytes)})")
    console.print(f"max |exported − PyTorch| on a fresh batch, from the written file: {result.max_error:.2e}")
    if result.runtime_p50_ms is not None and result.torch_p50_ms is not None:
        speed = result.torch_p50_ms / result.runtime_p50_ms
        console.print(
            f"latency at batch {batch_size}: {format} {result.runtime_p50_ms:.3f} ms, PyTorch "
            f"{result.torch_p50_ms:.3f} ms ({speed:.2f}× {'faster' if speed >= 1 else 'slower'} than PyTorch)"
        )


@app.command("optimize")
def optimize_command(
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
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the chosen model.")] = Path(
        "optimized.pt"
    ),
    trust_code: TrustCodeOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Search pruning × distillation × quantization for the cheapest model within an accuracy budget.

    Every candidate is measured side by side; the result keeps its accuracy within --max-drop points of the
    original on both the validation split (which chooses) and the test split (which confirms).

    Example: keiryo optimize cnn.pt --data digits --max-drop 1.0 --objective latency --time-limit 10m
    """
    from keiryo.optimize import check_options, optimize, parse_duration

    _check_output(out, inputs=[model_file, _data_path(data_source)])
    try:
        ratio_list = tuple(float(r) for r in ratios.split(",") if r.strip())
    except ValueError:
        raise ConfigError(f"--ratios must be comma-separated numbers, got '{ratios}'") from None
    method_list = tuple(None if m.strip() == "none" else m.strip() for m in methods.split(",") if m.strip())
    seconds = parse_duration(time_limit)
    check_options(max_drop, objective, seconds, ratio_list, method_list, finetune_epochs)
    model = artifacts.load(model_file, trust_code=trust_code)
    splits = data.load_data(data_source, seed=seed)
    _check_fits(model, splits)

    def show(candidate) -> None:
        console.print(
            f"  tried {candidate.name:<24} val {candidate.val_accuracy:.2%}  "
            f"test {candidate.test_accuracy:.2%}"
        )

    with _staged(out) as (staged,):
        result = optimize(
            model,
            splits,
            max_drop=max_drop,
            objective=objective,
            time_limit=seconds,
            ratios=ratio_list,
            methods=method_list,
            finetune_epochs=finetune_epochs,
            seed=seed,
            on_candidate=show,
        )
        report.print_report(result.report, title="keiryo optimize: every candidate", console=console)
        for note in result.notes:
            console.print(note)
        best = result.best
        _save(best.model, staged, out, {"test_accuracy": best.test_accuracy, "chosen": best.name})
    console.print(
        f"chosen: {best.name} (test {best.test_accuracy:.2%} vs original {result.baseline_test:.2%}, "
        f"{objective} {best.cost:.3f}{' ms' if objective == 'latency' else ' bytes'}) → {out}"
    )


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option("--teacher", "-t", help="The trained teacher's model file.")],
    student: Annotated[
        str, typer.Option("--student", "-s", help="mlp | cnn | transformer | pkg.mod:fn | file.py:fn")
    ] = "mlp",
    data_source: DataOpt = "digits",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the student's model file.")] = Path(
        "student.pt"
    ),
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
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")] = 3e-3,
    device: Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16 (autocast).")] = "fp32",
    runs: RunsOpt = 50,
    trust_code: Annotated[
        bool,
        typer.Option("--trust-code", help="Allow a teacher file or a student spec that imports your code."),
    ] = False,
    seed: SeedOpt = 0,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train a small student to match a frozen teacher's soft targets, save it, and compare the two.

    Example: keiryo distill --teacher cnn.pt --student mlp -a hidden=[128] --data digits --out student.pt
    """
    from keiryo.compress.distill import check_options
    from keiryo.compress.distill import distill as run_distill

    _check_output(out, inputs=[teacher, _data_path(data_source)])
    check_options(temperature, alpha, loss)
    models.check_trusted(student, trust_code, "--student")
    kwargs = _parse_kwargs(student_arg)
    pairs = [_parse_pair(f, "--feature") for f in feature or []]
    features = dict(pairs)
    if len(features) < len(pairs):
        raise ConfigError(
            "--feature names a student layer twice; match each student layer to one teacher layer"
        )
    options = dict(epochs=epochs, lr=lr, device=device, precision=precision, seed=seed, progress=progress)
    TrainConfig(**options)  # its checks, before any work
    teacher_model = artifacts.load(teacher, trust_code=trust_code)
    splits = data.load_data(data_source, seed=seed)
    _check_fits(teacher_model, splits)
    net = _build_for_data(student, splits, kwargs, seed, trust_code)
    with _staged(out) as (staged,):
        run_distill(
            teacher_model,
            net,
            splits,
            temperature,
            alpha,
            features=features or None,
            loss=loss,
            cache_teacher=cache_teacher,
            **options,
        )
        trained, teacher_model = net.cpu(), teacher_model.cpu()
        test_acc = accuracy(trained, splits.test)
        extra = {"distilled_from": str(teacher), "temperature": temperature, "alpha": alpha}
        _save(trained, staged, out, {**_metadata(splits, test_acc), **extra})
        side_by_side = {"teacher": teacher_model, "student": trained}
        result = compare(side_by_side, data.example_inputs(splits, 64), splits, runs=runs)
        report.print_report(result, title="keiryo distill", console=console)
    console.print(f"saved {out} ({_size(out)})")


def _parse_pair(text: str, option: str) -> tuple[str, str]:
    left, sep, right = text.partition("=")
    if not sep or not left.strip() or not right.strip():
        raise ConfigError(f"{option} '{text}' must look like student_layer=teacher_layer")
    return left.strip(), right.strip()


@app.command("hf")
def hf_command(
    model_dir: Annotated[Path, typer.Argument(help="A local Hugging Face model folder (config.json...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the keiryo model file.")] = Path(
        "hf-model.pt"
    ),
    texts: Annotated[
        Path | None, typer.Option(help="Text file, one text per line, to measure on (default: 8 samples).")
    ] = None,
    data_out: Annotated[
        Path | None,
        typer.Option("--data-out", help="Write the texts' token ids and outputs as a .pt file for --data."),
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="embedding | classifier (default: from the config).")
    ] = None,
    layers: Annotated[
        int | None, typer.Option(min=1, help="Keep this many encoder layers, evenly spaced.")
    ] = None,
    intermediate_size: Annotated[
        int | None, typer.Option(min=1, help="Keep this many feed-forward neurons per layer.")
    ] = None,
    max_length: Annotated[int, typer.Option(min=1, help="Truncate texts to this many tokens.")] = 128,
    runs: RunsOpt = 30,
    threads: ThreadsOpt = None,
) -> None:
    """Turn a Hugging Face model folder into a keiryo model file, offline, and measure it on texts.

    The file works with every command that takes a model file; give them the --data-out file as --data:
    keiryo bench/prune/export MODEL --data TOKENS.pt, and
    keiryo distill --teacher MODEL --student hf:DIR -a layers=3 --loss cosine --data TOKENS.pt.

    Example: keiryo hf ./all-MiniLM-L6-v2 --texts sentences.txt --out minilm.pt --data-out sentences.pt
    """
    from keiryo import hf

    _check_output(out, inputs=[texts])
    if data_out is not None:
        _check_output(data_out, "--data-out", inputs=[texts])
        if _same_path(out, data_out):
            raise ConfigError("--out and --data-out are the same file; give each its own path")
    options = {"task": task, "layers": layers, "intermediate_size": intermediate_size}
    kwargs = {key: value for key, value in options.items() if value is not None}
    lines = hf.read_texts(texts) if texts else list(hf.SAMPLE_TEXTS)
    model = models.build_model(f"hf:{model_dir}", max_length=max_length, **kwargs)
    tokens = model.tokenize(lines)
    metadata = {"source": str(model_dir.resolve()), "task": model.task, "sequence_length": tokens.shape[-1]}
    with _staged(out, data_out) as (staged, data_staged):
        _save(model, staged, out, metadata)
        if data_out and data_staged:
            hf.write_text_data(model, lines, data_staged)
        sizes = (1, len(tokens))
        result = compare({model_dir.name: model}, tokens, batch_sizes=sizes, runs=runs, num_threads=threads)
        report.print_report(result, title=f"keiryo hf ({model.task}, {len(lines)} texts)", console=console)
    wrote = f" · data {data_out}" if data_out else ""
    console.print(f"saved {out} ({_size(out)}){wrote}")


@app.command("quantize")
def quantize_command(
    model_file: Annotated[Path, typer.Argument(help="The trained model file to quantize.")],
    method: Annotated[
        str,
        typer.Option(
            help="fp32 | fp16 | bf16 | int8-dynamic | int8-weight-only | int4-weight-only | int8-static | qat"
        ),
    ] = "int8-dynamic",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the quantized model.")] = Path(
        "quantized.pt"
    ),
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
        bool, typer.Option("--compile/--no-compile", help="Let auto also try torch.compile'd kernels.")
    ] = True,
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
    from keiryo.compress.quantize import check_options, report_of
    from keiryo.compress.quantize import quantize as quantize_model
    from keiryo.compress.quantize import sensitivity as layer_sensitivity
    from keiryo.metrics import threads as fixed_threads

    _check_output(out, inputs=[model_file, _data_path(calibration), _data_path(data_source)])
    check_options(method, backend, granularity, observer, group_size, has_calibration=calibration is not None)
    qat = TrainConfig(epochs=qat_epochs, lr=5e-4, seed=seed, device="cpu", progress=False)
    original = artifacts.load(model_file, trust_code=trust_code)
    cal = data.load_data(calibration, seed=seed) if calibration else None
    splits = data.load_data(data_source, seed=seed) if data_source else cal
    _check_fits(original, cal)
    _check_fits(original, splits)
    example = _example_inputs(model_file, original, splits, 64, seed)
    with _staged(out) as (staged,):
        with fixed_threads(threads):
            quantized = quantize_model(
                original,
                method,
                cal,
                example,
                backend=backend,
                granularity=granularity,
                symmetric=not affine,
                skip=tuple(skip or ()),
                group_size=group_size,
                observer=observer,
                compile=compile,
                qat=qat,
            )
        chosen = report_of(quantized)
        test_acc = accuracy(quantized, splits.test) if splits is not None else None
        _save(quantized, staged, out, {"test_accuracy": test_acc} if splits is not None else {})
        result = compare({model_file.stem: original, method: quantized}, example, splits, num_threads=threads)
        title = f"keiryo quantize ({method}, backend {chosen.backend})"
        report.print_report(result, title=title, console=console)
        for c in chosen.candidates:
            timing = ", ".join(f"b{b} {ms:.3f} ms ({c.speedup[b]:.2f}×)" for b, ms in c.p50_ms.items())
            cosine = f"cosine {c.cosine:.4f}" if c.cosine is not None else "cosine -"
            name = c.backend + (f" {c.granularity}" if c.granularity else "")
            note = f" · {c.note}" if c.note else ""
            console.print(f"  candidate {name}: {cosine}, {timing or 'not timed'}{note}", markup=False)
        console.print(f"chosen: {chosen.message}", markup=False)
        if sensitivity and method not in ("fp32", "fp16", "bf16"):
            sens_method = "int8-static" if method == "qat" else method
            for s in layer_sensitivity(original, sens_method, example, cal, granularity=granularity):
                console.print(f"  layer {s.name} ({s.kind}): SQNR {s.sqnr_db:.1f} dB, cosine {s.cosine:.4f}")
    console.print(f"saved {out} ({_size(out)})")


# Technique commands (quantize, prune, distill, ...) are added above this line, one function each.


@app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file (see recipes/digits.yaml).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder [keiryo-out/NAME]")] = None,
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

    Example: keiryo run recipes/digits.yaml --out keiryo-demo
    """
    loaded = load_recipe(recipe)
    _run_and_print(loaded, out, force=force, progress=progress, trust_code=trust_code)


def _run_and_print(
    recipe: Recipe | dict, out: Path | None, *, force: bool, progress: bool, trust_code: bool
) -> None:
    def announce(step) -> None:
        console.print(f"[bold]▶ {step.name}[/bold] ({step.kind})")

    folder = out or Path("keiryo-out") / (recipe.name if isinstance(recipe, Recipe) else recipe["name"])
    _check_folder(folder)
    result, outcomes = run_recipe(
        recipe, out, progress=progress, force=force, on_step=announce, trust_code=trust_code
    )
    title = f"keiryo run: {outcomes[0].step.name} → {outcomes[-1].step.name}"
    report.print_report(result, title=title, console=console)
    for outcome in outcomes:
        state = "reused" if outcome.cached else f"{outcome.seconds:.1f} s"
        extra = "  ".join(f"{k} {v}" for k, v in outcome.info.items() if v is not None)
        console.print(f"  {outcome.step.name:<10} {outcome.step.kind:<9} {state:>8}  {extra}")
    console.print(f"report: {folder / 'report.html'} · {folder / 'report.md'}")


@app.command()
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
    _check_folder(out)
    raw = yaml.safe_load(resources.files("keiryo").joinpath("recipes/digits.yaml").read_text())
    if quick:
        for step in raw["steps"]:
            options = next(iter(step.values()))
            if "epochs" in options:
                options["epochs"] = 1
    console.print(
        "[bold]keiryo demo[/bold]: digits (1,797 real 8×8 images) · "
        + " → ".join(next(iter(s)) for s in raw["steps"])
    )
    _run_and_print(raw, out, force=force, progress=progress, trust_code=trust_code)


@app.command()
def env() -> None:
    """Print what a bug report needs: versions, threads, accelerators."""
    import keiryo

    console.print(f"keiryo: {keiryo.__version__}")
    for key, value in devices.describe().items():
        console.print(f"{key}: {value}")


def _say(line: str) -> None:
    """One line on stderr, never wrapped (rich would wrap a long message at the terminal's width)."""
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run a command and return its exit code (the console script exits with it).

    User errors print one line (`error: ...`) and return 2; Ctrl-C prints `interrupted` and returns 130;
    anything else is a keiryo bug: one line and 1 (KEIRYO_DEBUG=1 shows the traceback instead).
    """
    from keiryo.__main__ import SigintWatch

    watch = SigintWatch.install()  # None when `python -m keiryo` installed one already
    try:
        with warnings.catch_warnings():
            if not os.environ.get("KEIRYO_DEBUG"):
                warnings.filterwarnings("ignore", module=LIBRARY_WARNINGS)
            return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        if watch is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _interrupted() -> bool:
    """Whether Ctrl-C was pressed during this run, even if a library swallowed its KeyboardInterrupt."""
    return bool(getattr(signal.getsignal(signal.SIGINT), "fired", False))


def _dispatch(args: list[str]) -> int:
    command = typer.main.get_command(app)
    try:
        # typer's own `main` turns Ctrl-C into a silent exit 130; run the command here and say so instead.
        with command.make_context("keiryo", args) as ctx:
            command.invoke(ctx)
    except typer.Exit as exc:  # --help
        return exc.exit_code
    except typer.Abort:
        _say("interrupted")
        return 130
    except typer.TyperException as exc:  # usage errors: unknown command or option, bad option value
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `keiryo`: the help (typer has printed it)
            if exc.format_message().strip():
                print(exc.format_message(), file=sys.stderr)
            return 2
        context = getattr(exc, "ctx", None)
        where = context.command_path if context is not None else "keiryo"
        _say(f"error: {' '.join(exc.format_message().split())} (see: {where} --help)")
        return getattr(exc, "exit_code", 2)
    except Exception as exc:
        if _interrupted():  # a Ctrl-C that a library turned into another error (see SigintWatch)
            _say("interrupted")
            return 130
        if isinstance(exc, KeiryoError):
            _say(f"error: {one_line(exc, limit=1000)}")
            return 2
        if os.environ.get("KEIRYO_DEBUG"):
            raise
        _say(f"error: unexpected {one_line(exc, limit=300)} (set KEIRYO_DEBUG=1 for the traceback)")
        return 1
    return 0
