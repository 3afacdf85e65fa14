"""Export a model for deployment: ONNX (checked in onnxruntime), torch.export programs, safetensors weights.

Every export is verified, not just written: the file is loaded back, run on the example inputs, and its
largest deviation from the PyTorch model is reported (with onnxruntime's latency beside PyTorch's for ONNX).
Files are written to a temporary folder beside the target and renamed into place.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from keiryo.errors import KeiryoError
from keiryo.measure import batch_of, has_quantized_kernels, time_models

# Each format and the file suffix it is written with.
SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".onnx", "torch-export": ".pt2", "safetensors": ".safetensors"}
FORMATS = tuple(SUFFIXES)


class ExportError(KeiryoError):
    """A model could not be exported, or the exported file does not reproduce the model."""


@dataclass
class ExportResult:
    """What an export wrote and how faithfully the file reproduces the model."""

    format: str
    path: Path
    bytes: int
    max_error: float  # largest |exported − PyTorch| on the example inputs
    runtime_p50_ms: float | None = None  # the exported file run by its runtime (onnxruntime, torch.export)
    torch_p50_ms: float | None = None  # the PyTorch model on the same inputs, timed interleaved


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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
def _staged(path: str | Path) -> Iterator[Path]:
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


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporters colour their messages
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _p50_ms(fn: Callable[[], object], runs: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor,
    path: str | Path,
    *,
    threads: int | None = None,
    int8: bool = False,
) -> ExportResult:
    """ONNX via the dynamo exporter, with a dynamic batch dimension; checked in onnxruntime.

    `int8`: export the float model, then quantize the ONNX graph with onnxruntime's dynamic int8 (int8
    weights, activations quantized per batch), since PyTorch's int8 kernels have no ONNX translation.
    """
    import onnxruntime as ort

    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with _staged(path) as staged:
        try:
            with _quiet():
                torch.onnx.export(
                    model,
                    (example_inputs,),
                    str(staged),
                    dynamo=True,
                    dynamic_shapes=({0: batch},),
                    external_data=False,  # one self-contained file (fine below ONNX's 2 GB limit)
                )
        except Exception as exc:
            if has_quantized_kernels(model):
                raise ExportError(
                    "ONNX export failed: this model runs PyTorch int8 kernels, which the ONNX exporter "
                    "cannot translate; export the float model as onnx-int8 instead"
                ) from exc
            raise ExportError(f"ONNX export failed: {_first_line(exc)}") from exc
        if int8:
            _quantize_onnx(staged)
        torch_ms = time_models({"torch": model}, example_inputs, runs=30, warmup=5)["torch"].p50_ms
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # same threads as PyTorch: fair
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # don't starve PyTorch
        try:
            session = ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot load the exported model: {_first_line(exc)}") from exc
        name = session.get_inputs()[0].name
        check = batch_of(example_inputs, max(3, len(example_inputs) + 1))  # a batch size not seen at export
        feed = {name: check.numpy()}
        got = torch.from_numpy(session.run(None, feed)[0])
        with torch.inference_mode():
            want = model(check).float()
        runtime = _p50_ms(lambda: session.run(None, {name: example_inputs.numpy()}))
        size = staged.stat().st_size
    error = float((got - want).abs().max())
    return ExportResult("onnx-int8" if int8 else "onnx", Path(path), size, error, runtime, torch_ms)


def _quantize_onnx(path: Path) -> None:
    """Rewrite the ONNX file at `path` with onnxruntime's dynamic int8 (MatMul/Gemm/Conv weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_copy = path.with_name("float." + path.name)
    path.rename(float_copy)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs a pre-processing tip on the root logger at every call
    try:
        with _quiet():
            quantize_dynamic(str(float_copy), str(path), weight_type=QuantType.QInt8)
    except Exception as exc:
        raise ExportError(f"onnxruntime int8 quantization failed: {_first_line(exc)}") from exc
    finally:
        root.setLevel(level)


def export_program(model: nn.Module, example_inputs: Tensor, path: str | Path) -> ExportResult:
    """A `torch.export` program (.pt2): the graph and weights, loadable without the model's Python code."""
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with _staged(path) as staged:
        try:
            with _quiet():
                program = torch.export.export(model, (example_inputs,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(staged))
            loaded = torch.export.load(str(staged)).module()
        except Exception as exc:
            raise ExportError(f"torch.export failed: {_first_line(exc)}") from exc
        check = batch_of(example_inputs, max(3, len(example_inputs) + 1))
        with torch.inference_mode():
            err = float((loaded(check).float() - model(check).float()).abs().max())
        lat = time_models({"program": loaded, "torch": model}, example_inputs, runs=30, warmup=5)
        size = staged.stat().st_size
    return ExportResult("torch-export", Path(path), size, err, lat["program"].p50_ms, lat["torch"].p50_ms)


def export_safetensors(model: nn.Module, path: str | Path) -> ExportResult:
    """The float weights as safetensors (no code, no pickle), for loaders in other frameworks."""
    from safetensors.torch import load_file, save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if isinstance(v, Tensor)}
    if any(type(v) is not Tensor or v.is_quantized for v in state.values()):
        raise ExportError("safetensors holds plain tensors only; export the float model, or use torch-export")
    with _staged(path) as staged:
        seen: dict[int, str] = {}
        for key, value in list(state.items()):  # tied weights share storage; safetensors wants copies
            ptr = value.untyped_storage().data_ptr()
            if ptr in seen:
                state[key] = value.clone()
            seen.setdefault(ptr, key)
        save_file(state, str(staged))
        loaded = load_file(str(staged))
        err = max((float((loaded[k].float() - v.float()).abs().max()) for k, v in state.items()), default=0.0)
        size = staged.stat().st_size
    return ExportResult("safetensors", Path(path), size, err)


def export(model: nn.Module, example_inputs: Tensor, path: str | Path, format: str = "onnx") -> ExportResult:
    """Export in one of FORMATS and verify the file; see the functions above for each format."""
    if format in ("onnx", "onnx-int8"):
        return export_onnx(model, example_inputs, path, int8=format == "onnx-int8")
    if format == "torch-export":
        return export_program(model, example_inputs, path)
    if format == "safetensors":
        return export_safetensors(model, path)
    raise ExportError(f"unknown export format '{format}' (choose from {', '.join(FORMATS)})")
