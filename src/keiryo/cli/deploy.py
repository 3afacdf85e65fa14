"""`keiryo deploy`: the fastest way to run a model file on this machine, chosen by measuring every runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keiryo import artifacts, data
from keiryo.cli.options import DataOpt, SeedOpt, ThreadsOpt, TrustCodeOpt, int_list
from keiryo.cli.outputs import check_fits, check_folder, console, data_path, same_path
from keiryo.compress.qconfig import Policy
from keiryo.deployment import DeployConfig, candidates_of, deploy
from keiryo.errors import ConfigError
from keiryo.examples import example_inputs


def deploy_command(
    model_file: Annotated[
        Path, typer.Argument(help="The model file to deploy (from keiryo train, prune...).")
    ],
    data_source: DataOpt = "digits",
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Folder for the chosen artifact(s) and report.md/report.json."),
    ] = Path("deployed"),
    batch: Annotated[
        str,
        typer.Option("--batch", "-b", help="Batch sizes you serve, e.g. 1,64: each is timed and chosen for."),
    ] = "1,64",
    runtimes: Annotated[
        str | None,
        typer.Option(
            help="Only these (comma-separated): torch, onnxruntime, openvino, executorch (each: all its "
            "precisions), or single candidates such as openvino-int8, onnxruntime-fp32 (default: all "
            "installed). PyTorch float is always measured."
        ),
    ] = None,
    also: Annotated[
        str | None,
        typer.Option(
            help="Also write these runtime candidates' artifacts, e.g. executorch (a .pte for devices)."
        ),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(help="Least cosine similarity to the float model's outputs a candidate must keep."),
    ] = Policy.min_cosine,
    min_top1: Annotated[
        float, typer.Option(help="Least top-1 agreement with float, for models that output class scores.")
    ] = Policy.min_top1,
    runs: Annotated[int, typer.Option(min=1, help="Timed interleaved rounds per batch size.")] = 30,
    threads: ThreadsOpt = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar over the candidates.")] = True,
    trust_code: TrustCodeOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Find the fastest way to run a model here that keeps its outputs, and write what runs it.

    Candidates: PyTorch (eager with BatchNorm folded, channels-last, compiled, int8 eager and PT2E),
    ONNX Runtime (fp32, int8 dynamic/static), OpenVINO (fp32, NNCF int8), ExecuTorch (XNNPACK fp32/int8).
    Each is compared with the float model on --data's training inputs (cosine, top-1 agreement).
    Those within tolerance are timed interleaved with float at each --batch size: the fastest wins there.
    Float stays unless a candidate beats it, so the choice is never slower than float in the same run.
    --out gets the winner's artifact (.pt/.pt2, .onnx, .xml+.bin or .pte, with a .json sidecar) and
    report.md/report.json with every candidate; a failed run leaves --out as it was.
    Load a runtime artifact with keiryo.load_runtime(path): it takes tensors like the model.

    Example: keiryo deploy cnn.pt --data digits --out cnn-deployed --batch 1,64 --also executorch
    """
    config = DeployConfig(
        batch_sizes=tuple(int_list(batch, "--batch")),
        candidates=candidates_of(runtimes.split(",")) if runtimes else None,
        min_cosine=tolerance,
        min_top1=min_top1,
        runs=runs,
        threads=threads,
        also=tuple(a.strip() for a in also.split(",") if a.strip()) if also else (),
        progress=progress,
    )
    check_folder(out)
    if same_path(out, model_file) or same_path(out, data_path(data_source)):
        raise ConfigError(f"--out '{out}' is also an input; write to another folder so the input is kept")
    model = artifacts.load(model_file, trust_code=trust_code)
    splits = data.load_data(data_source, seed=seed)
    check_fits(model, splits)
    example = example_inputs(model, splits, 1, seed, str(model_file))
    result = deploy(model, example, splits, config, out)
    console.print(result.table(), markup=False)
    for line in [*result.messages, *result.written]:
        console.print(line, markup=False)
    console.print(f"report: {out / 'report.md'}", markup=False)
