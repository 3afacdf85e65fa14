"""How an export is checked and kept: written in a folder beside the target, verified, then moved into place.

Every writer in `keiryo.export` stages its file (or folder) here, runs the written file against the PyTorch
model on a batch size it was not exported with, and compares the main outputs (`inputs.main_output`) within
the format's tolerance; exporters' chatter is kept off the terminal and their errors cut to one line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from keiryo import inputs
from keiryo.errors import ConfigError, KeiryoError
from keiryo.inputs import Example
from keiryo.metrics import batch_of

# Largest |exported − PyTorch| accepted, relative to the largest |output|: float kernels differ in rounding,
# onnxruntime's int8 rounds weights and activations, and safetensors must give back the very same weights.
TOLERANCE = {"onnx": 1e-2, "onnx-int8": 0.2, "torch-export": 1e-2, "safetensors": 1e-5, "hf": 1e-2}


class ExportError(KeiryoError):
    """A model could not be exported, or the exported file does not reproduce the model."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The dynamo ONNX exporter prints progress and warnings meant for its developers; keep the CLI clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`; renamed into place only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = tmp_dir / path.name
        yield staged
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o666 & ~umask)  # some writers create 0600 files; give the usual permissions
        os.replace(staged, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path`; it replaces `path` (a previous export) only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = tmp_dir / path.name
        staged.mkdir()
        yield staged
        if path.exists():
            os.replace(path, tmp_dir / "previous")
        os.replace(staged, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporters colour their messages
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_inputs(model: object, example_inputs: object, required: bool = True) -> None:
    if not isinstance(model, nn.Module):
        raise ExportError(f"export needs a torch.nn.Module, got a {type(model).__name__}")
    if example_inputs is None and not required:
        return
    what = "export needs example inputs (a tensor, a tuple of arguments or a dict of them)"
    try:
        inputs.check_example(example_inputs, "example inputs")
        if inputs.batch_size(example_inputs) < 1:
            raise ConfigError("no sample")
    except ConfigError as exc:
        raise ExportError(f"{what} with a batch of at least one sample: {exc}") from None


def check_batch(example: Example) -> Example:
    """The example at a batch size it was not exported with (at least 3), to prove the batch is dynamic."""
    n = inputs.batch_size(example)
    return batch_of(example, max(3, n + 1))


def dynamic_batch(example: Example) -> tuple | dict:
    """`dynamic_shapes` marking the first dimension of each batch-first tensor as the one dynamic batch,
    laid out like the arguments (a tuple for positional arguments, a dict for keyword ones)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    n = inputs.batch_size(example)

    def spec(value: object) -> object:
        if isinstance(value, Tensor):
            return {0: batch} if value.dim() > 0 and value.shape[0] == n else None
        return pytree.tree_map(lambda _: None, value)

    args, kwargs = inputs.args_kwargs(example)
    return {k: spec(v) for k, v in kwargs.items()} if kwargs else tuple(spec(v) for v in args)


def leaves(output: object) -> list[Tensor]:
    """The tensors of an output in the order exporters flatten it (tuples, dicts, ModelOutputs)."""
    return [t for t in pytree.tree_leaves(output) if isinstance(t, Tensor)]


def main_index(output: object) -> int:
    """Where `inputs.main_output` lies among the output's flattened tensors."""
    main = inputs.main_output(output)
    return next(i for i, t in enumerate(leaves(output)) if t is main)


def verify(format: str, got: Tensor, want: Tensor) -> float:
    """The largest |got − want|; an ExportError when the written file does not reproduce the model."""
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        raise ExportError(
            f"the written {format} file gives outputs of shape {tuple(got.shape)}, the model "
            f"{tuple(want.shape)}; the export is broken and was not kept"
        )
    error = float((got - want).abs().max()) if got.numel() else 0.0
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1e-6)
    if not math.isfinite(error) or error > TOLERANCE[format] * scale:
        raise ExportError(
            f"the written {format} file does not reproduce the model (max |exported − PyTorch| {error:.3g} "
            f"for outputs up to {scale:.3g}); it was not kept"
        )
    return error


def p50_ms(fn: Callable[[], object], runs: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def check_against(format: str, model: nn.Module, written: nn.Module, example: Example) -> tuple[float, str]:
    """Run the written file, loaded afresh (`written`), and `model` on a batch size not exported with: the
    largest |difference| of their main outputs (an ExportError beyond the format's tolerance) and its name."""
    check = check_batch(example)
    with torch.inference_mode():
        want = inputs.call(model, check)
        try:
            got = inputs.call(written, check)
        except Exception as exc:
            raise ExportError(f"the written {format} file fails to run: {first_line(exc)}") from exc
    error = verify(format, leaves(got)[main_index(want)], inputs.main_output(want))
    return error, inputs.output_name(want)
