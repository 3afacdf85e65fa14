"""`keiryo train`: train a model in one process, on N local workers or under torchrun, and save it."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from keiryo import data, models
from keiryo.cli import options as opt
from keiryo.cli.outputs import check_output, console, data_path, err_console, same_path, save, size, staged
from keiryo.errors import ConfigError
from keiryo.examples import metadata_for, model_for_data
from keiryo.metrics import accuracy
from keiryo.parallel.config import DDP, FSDP, SCHEDULES, Async, Pipeline, Strategy, strategy_of
from keiryo.report import human_bytes
from keiryo.summary import parallel_lines
from keiryo.training import train as run_training


def train(
    model: Annotated[
        str, typer.Option("--model", "-m", help="mlp | cnn | transformer | pkg.mod:fn | file.py:fn")
    ] = "cnn",
    data_source: opt.DataOpt = "digits",
    out: opt.ModelOutOpt = Path("model.pt"),
    model_arg: Annotated[
        list[str] | None, typer.Option("--model-arg", "-a", help="Factory argument name=value (repeatable).")
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(min=1, help="Passes over the training split (default: 10, or more on small data)."),
    ] = None,
    patience: opt.PatienceOpt = 10,
    batch_size: Annotated[int, typer.Option(min=1, max=opt.MAX_BATCH, help="Samples per step.")] = 64,
    lr: opt.LrOpt = 3e-3,
    device: opt.DeviceOpt = "auto",
    precision: opt.PrecisionOpt = "fp32",
    compile: Annotated[bool, typer.Option("--compile", help="Use torch.compile.")] = False,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint file, written each epoch (and every --checkpoint-every steps)."),
    ] = None,
    checkpoint_every: Annotated[
        int, typer.Option(min=0, help="Also checkpoint every N steps (0: epoch ends only).")
    ] = 0,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from --checkpoint if it exists (workers restarted by --max-restarts or by "
            "torchrun --max-restarts resume from their own run's checkpoint by themselves).",
        ),
    ] = False,
    seed: opt.SeedOpt = 0,
    progress: opt.ProgressOpt = True,
    strategy: Annotated[
        str, typer.Option(help="single | ddp | fsdp | pipeline (--workers processes) | async (Ray workers).")
    ] = "single",
    workers: opt.WorkersOpt = 1,
    grad_compression: Annotated[
        str | None,
        typer.Option(
            help="ddp: compress gradients for the all-reduce: fp16 | bf16 (half the bytes) | powersgd[:RANK] "
            "(low-rank factors of each weight matrix, rank 1 by default; far fewer bytes)."
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds before a crashed or hung worker stops the whole run.")
    ] = 120.0,
    max_restarts: Annotated[
        int,
        typer.Option(
            min=0,
            help="Local workers: restart them up to N times after one dies; the run resumes from "
            "--checkpoint (under torchrun use torchrun's own --max-restarts).",
        ),
    ] = 0,
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
    trust_code: opt.TrustCodeOpt = False,
) -> None:
    """Train a model and save it with its measured test accuracy; in one process, N local workers or torchrun.

    --batch-size is the whole batch: with ddp/fsdp each of the N workers takes 1/N of it.

    Example: keiryo train --model cnn --data digits --epochs 10 --out cnn.pt --checkpoint ck.pt --resume
    Example: keiryo train --model cnn --strategy ddp --workers 2 --epochs 3 --out cnn.pt
    Example: keiryo train --model cnn --strategy ddp --workers 2 --grad-compression powersgd:2 --out cnn.pt
    """
    check_output(out, inputs=[data_path(data_source)])
    if checkpoint is not None:
        check_output(checkpoint, "--checkpoint", inputs=[data_path(data_source)])
        if same_path(checkpoint, out):
            raise ConfigError("--checkpoint and --out are the same file; the checkpoint needs its own path")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"--timeout must be a number of seconds > 0, got {timeout}")
    if pipeline_schedule is not None and pipeline_schedule not in SCHEDULES:
        raise ConfigError(
            f"unknown pipeline schedule '{pipeline_schedule}' (choose {' or '.join(SCHEDULES)})"
        )
    models.check_trusted(model, trust_code, "--model")
    kwargs = opt.parse_kwargs(model_arg)
    spec = _strategy(strategy, workers, timeout, max_restarts, _slowdown(slowdown))
    if grad_compression is not None:
        if not isinstance(spec, DDP):
            raise ConfigError(
                f"--grad-compression needs --strategy ddp, not {strategy} (it compresses DDP's gradient "
                "all-reduce; fsdp reduce-scatters shards, which DDP's communication hooks do not cover)"
            )
        spec = replace(spec, grad_compression=grad_compression)
    if isinstance(spec, Pipeline):
        given = {"split_points": split_point, "schedule": pipeline_schedule, "microbatches": microbatches}
        spec = replace(spec, **{k: v for k, v in given.items() if v is not None})
    elif isinstance(spec, Async):
        spec = replace(spec, mode=async_mode, staleness_bound=staleness_bound, ray_address=ray_address)
    config = opt.training(
        epochs,
        patience,
        lr,
        device,
        precision,
        batch_size=batch_size,
        compile=compile,
        checkpoint=str(checkpoint) if checkpoint else None,
        checkpoint_every=checkpoint_every,
        resume=resume,
        seed=seed,
        progress=progress,
    )
    splits = data.load_data(data_source, seed=seed)
    net = model_for_data(model, splits, kwargs, seed, trust_code)
    with staged(out) as (staged_out,):
        result = run_training(net, splits, spec, config)
        trained = result.model.cpu()
        if result.parallel:
            own, lines = parallel_lines(result.parallel, strategy)
            err_console.print(own)
            if result.parallel["rank"] != 0:
                return  # only rank 0 writes and reports
            for line in lines:
                console.print(line)
            if "grad_traffic" in result.parallel:
                console.print(_traffic_line(result.parallel["grad_traffic"], result.parallel["workers"]))
        test_acc = accuracy(trained, splits.test)
        save(trained, staged_out, out, metadata_for(splits, test_acc))
    if result.resumed_from is not None:
        console.print(f"resumed from step {result.resumed_from} of {checkpoint}")
    acc_text = f"test accuracy {test_acc:.2%}" if test_acc is not None else "trained (regression)"
    console.print(f"{acc_text} · saved {out} ({size(out)})")


def _strategy(
    name: str, workers: int, timeout: float, max_restarts: int, slowdown: list[float] | None
) -> Strategy:
    """The strategy config for --strategy and the options every parallel strategy shares."""
    spec = strategy_of(name, None if name == "single" and workers == 1 else workers)
    if isinstance(spec, (DDP, FSDP, Pipeline)):
        return replace(spec, timeout=timeout, max_restarts=max_restarts)
    if isinstance(spec, Async):
        return replace(spec, slowdown=slowdown)
    return spec


def _traffic_line(traffic: dict, workers: int) -> str:
    """One line on the gradient bytes each worker all-reduced per step, against plain fp32."""
    ring = 2 * (workers - 1) / workers
    last, dense = traffic["last_step_bytes"], traffic["dense_bytes_per_step"]
    if not traffic["steps"]:
        return "no gradient all-reduce ran (no training step)"
    method = traffic["compression"] or "fp32"
    return (
        f"gradients all-reduced per step per worker: {human_bytes(last)} ({method}; "
        f"{last / dense:.1%} of fp32's {human_bytes(dense)}) · ring all-reduce sends {ring:.2f}× that · "
        f"mean over {traffic['steps']} steps {human_bytes(traffic['bytes_per_step'])}"
    )


def _slowdown(text: str | None) -> list[float] | None:
    """--slowdown 1,1,1,4 -> [1.0, 1.0, 1.0, 4.0]."""
    if not text:
        return None
    try:
        factors = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--slowdown must be comma-separated numbers, got '{text}'") from None
    if not all(math.isfinite(v) and v > 0 for v in factors):
        raise ConfigError(f"--slowdown factors must be numbers > 0, got '{text}'")
    return factors
