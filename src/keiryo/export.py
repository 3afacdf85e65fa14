"""Export a model for deployment: ONNX (checked in onnxruntime), torch.export programs, safetensors weights.

Example inputs follow `keiryo.inputs`: a Tensor, a tuple of positional arguments or a dict of keyword
arguments (a raw Hugging Face model takes `(ids, mask)` or `{"input_ids": ..., "attention_mask": ...}`). Every
tensor's first dimension is exported as one dynamic batch; ONNX inputs are named after the forward's
arguments (the dict keys). Outputs that are tuples, dicts or `ModelOutput`s are checked on their main tensor
(`inputs.main_output`: logits, last_hidden_state, ...), which the result names.

Every export is verified, not just written: the written file is loaded into a fresh object (an onnxruntime
session, a `torch.export.load`ed program, a fresh copy of the architecture with the safetensors weights), run
on a batch of the example inputs, and compared with the PyTorch model; a file that does not reproduce it is an
ExportError, and its largest deviation is reported (with the runtime's latency beside PyTorch's).
Files are written to a temporary folder beside the target and renamed into place only once verified; the
folder is removed whatever happens (an error, Ctrl-C), so a failed export leaves an existing file as it was.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import platform
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
from torch.utils import _pytree as pytree

from keiryo import inputs
from keiryo.errors import ConfigError, KeiryoError
from keiryo.inputs import Example
from keiryo.metrics import batch_of, has_quantized_kernels, time_models

# Each format and the file suffix it is written with.
SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".onnx", "torch-export": ".pt2", "safetensors": ".safetensors"}
FORMATS = tuple(SUFFIXES)
# Largest |exported − PyTorch| accepted, relative to the largest |output|: float kernels differ in rounding,
# onnxruntime's int8 rounds weights and activations, and safetensors must give back the very same weights.
TOLERANCE = {"onnx": 1e-2, "onnx-int8": 0.2, "torch-export": 1e-2, "safetensors": 1e-5}


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
    output: str = "output"  # which output was compared: "output", "logits", "last_hidden_state", ...


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


def check_target(path: str | Path, format: str) -> Path:
    """Refuse, before any work, an unknown format or a path that cannot be written (one-line ExportError)."""
    if format not in SUFFIXES:
        raise ExportError(f"unknown export format '{format}' (choose from {', '.join(FORMATS)})")
    path = Path(path)
    if path.is_dir():
        example = path / ("model" + SUFFIXES[format])
        raise ExportError(f"export path '{path}' is a folder; give a file path such as {example}")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ExportError(f"export path '{path}': '{folder}' is a file, so no folder can be made there")
    try:
        fd, probe = tempfile.mkstemp(prefix=".keiryo-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ExportError(f"export path '{path}': cannot write in '{folder}' ({exc.strerror})") from None
    return path


def _check_inputs(model: object, example_inputs: object, required: bool = True) -> None:
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


def _check_batch(example: Example) -> Example:
    """The example at a batch size it was not exported with (at least 3), to prove the batch is dynamic."""
    n = inputs.batch_size(example)
    return batch_of(example, max(3, n + 1))


def _dynamic_batch(example: Example) -> tuple | dict:
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


def _leaves(output: object) -> list[Tensor]:
    """The tensors of an output in the order exporters flatten it (tuples, dicts, ModelOutputs)."""
    return [t for t in pytree.tree_leaves(output) if isinstance(t, Tensor)]


def _main_index(output: object) -> int:
    """Where `inputs.main_output` lies among the output's flattened tensors."""
    main = inputs.main_output(output)
    return next(i for i, t in enumerate(_leaves(output)) if t is main)


def _verify(format: str, got: Tensor, want: Tensor) -> float:
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
    example_inputs: Example,
    path: str | Path,
    *,
    threads: int | None = None,
    int8: bool = False,
) -> ExportResult:
    """ONNX via the dynamo exporter, with a dynamic batch dimension; checked in onnxruntime.

    The ONNX inputs are named after the forward's arguments (a dict example's keys). `int8`: export the float
    model, then quantize the ONNX graph with onnxruntime's dynamic int8 (int8 weights, activations quantized
    per batch), since PyTorch's int8 kernels have no ONNX translation.
    """
    import onnxruntime as ort

    format = "onnx-int8" if int8 else "onnx"
    check_target(path, format)
    _check_inputs(model, example_inputs)
    model = model.eval()
    args, kwargs = inputs.args_kwargs(example_inputs)
    with _staged(path) as staged:
        try:
            with _quiet():
                torch.onnx.export(
                    model,
                    args,
                    str(staged),
                    kwargs=kwargs or None,
                    dynamo=True,
                    dynamic_shapes=_dynamic_batch(example_inputs),
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
        check = _check_batch(example_inputs)  # a batch size not seen at export
        with torch.inference_mode():
            want = inputs.call(model, check)
        index = _main_index(want)
        try:
            got = torch.from_numpy(session.run(None, _onnx_feed(session, check))[index])
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot run the exported model: {_first_line(exc)}") from exc
        error = _verify(format, got, inputs.main_output(want))
        feed = _onnx_feed(session, example_inputs)
        runtime = _p50_ms(lambda: session.run(None, feed))
        size = staged.stat().st_size
    return ExportResult(format, Path(path), size, error, runtime, torch_ms, inputs.output_name(want))


def _onnx_feed(session: object, example: Example) -> dict[str, object]:
    """The example as onnxruntime's input dict: keyword arguments by name, positional ones in order."""
    args, kwargs = inputs.args_kwargs(example)
    positional = iter(inputs.tensors(args))
    feed = {}
    for node in session.get_inputs():
        value = kwargs.get(node.name)
        feed[node.name] = (value if isinstance(value, Tensor) else next(positional)).numpy()
    return feed


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
            quantize_dynamic(
                str(float_copy), str(path), weight_type=QuantType.QInt8, reduce_range=_saturating_cpu()
            )
    except Exception as exc:
        raise ExportError(f"onnxruntime int8 quantization failed: {_first_line(exc)}") from exc
    finally:
        root.setLevel(level)


def _saturating_cpu() -> bool:
    """Whether onnxruntime's int8 kernels saturate here: x86 without VNNI multiplies u8 × s8 with VPMADDUBSW,
    whose int16 sums overflow (a 20% output error measured on an AVX2 CPU); onnxruntime's documented remedy
    is 7-bit weights (`reduce_range`), which cost almost nothing in accuracy (1.7% there)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        return "vnni" not in Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume the worst, 7-bit weights are safe everywhere
        return True


def export_program(model: nn.Module, example_inputs: Example, path: str | Path) -> ExportResult:
    """A `torch.export` program (.pt2): the graph and weights, loadable without the model's Python code."""
    check_target(path, "torch-export")
    _check_inputs(model, example_inputs)
    model = model.eval()
    args, kwargs = inputs.args_kwargs(example_inputs)
    with _staged(path) as staged:
        try:
            with _quiet():
                program = torch.export.export(
                    model, args, kwargs=kwargs or None, dynamic_shapes=_dynamic_batch(example_inputs)
                )
            torch.export.save(program, str(staged))
        except Exception as exc:
            if has_quantized_kernels(model):
                raise ExportError(
                    "torch.export failed: this model runs PyTorch int8 kernels, which it cannot trace; "
                    "keep it as a keiryo .pt file, or export the float model (onnx-int8 gives an int8 file)"
                ) from exc
            raise ExportError(f"torch.export failed: {_first_line(exc)}") from exc
        del program  # what is checked is the written file, loaded afresh
        try:
            loaded = torch.export.load(str(staged)).module()
        except Exception as exc:
            raise ExportError(
                f"torch.export.load cannot read the written program: {_first_line(exc)}"
            ) from exc
        check = _check_batch(example_inputs)
        with torch.inference_mode():
            want = inputs.call(model, check)
            try:
                got = inputs.call(loaded, check)
            except Exception as exc:
                raise ExportError(f"the written program fails to run: {_first_line(exc)}") from exc
            err = _verify("torch-export", _leaves(got)[_main_index(want)], inputs.main_output(want))
        lat = time_models({"program": loaded, "torch": model}, example_inputs, runs=30, warmup=5)
        size = staged.stat().st_size
    return ExportResult(
        "torch-export",
        Path(path),
        size,
        err,
        lat["program"].p50_ms,
        lat["torch"].p50_ms,
        inputs.output_name(want),
    )


def export_safetensors(
    model: nn.Module, path: str | Path, example_inputs: Example | None = None
) -> ExportResult:
    """The weights as safetensors (no code, no pickle), for loaders in other frameworks.

    Checked by loading the written file into a fresh copy of the architecture: its outputs on
    `example_inputs` (when given) must be the model's, and every tensor the very same. safetensors holds plain
    tensors only; a model with packed or quantized weights (int8, torchao) is refused, not half written.
    """
    from safetensors.torch import load_file, save_file

    check_target(path, "safetensors")
    _check_inputs(model, example_inputs, required=False)
    state = model.state_dict()
    for key, value in state.items():
        if type(value) is not Tensor or value.is_quantized:
            layer = key.split("._packed_params")[0] if "_packed_params" in key else key.rpartition(".")[0]
            raise ExportError(
                f"safetensors holds plain tensors only, and layer '{layer or key}' keeps packed or quantized "
                "weights (int8/int4); keep this model as a keiryo .pt file (keiryo.save, keiryo quantize "
                "--out x.pt), or export the float model (onnx-int8 gives an int8 file)"
            )
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    seen: dict[int, str] = {}
    for key, value in list(tensors.items()):  # tied weights share storage; safetensors wants copies
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[key] = value.clone()
        seen.setdefault(ptr, key)
    with _staged(path) as staged:
        try:
            save_file(tensors, str(staged))
            loaded = load_file(str(staged))
        except Exception as exc:
            raise ExportError(
                f"safetensors could not write and read back the weights: {_first_line(exc)}"
            ) from exc
        if loaded.keys() != tensors.keys():
            missing = sorted(tensors.keys() - loaded.keys())[:3]
            raise ExportError(f"the written safetensors file lacks {', '.join(missing)}; it was not kept")
        err = max(
            (_verify("safetensors", loaded[k], v) for k, v in tensors.items() if v.numel()), default=0.0
        )
        output = "weights"
        if example_inputs is not None:
            fresh = copy.deepcopy(model).eval()
            try:
                fresh.load_state_dict(loaded, strict=True)
            except RuntimeError as exc:
                raise ExportError(
                    f"the written weights do not fit the architecture: {_first_line(exc)}"
                ) from exc
            check = _check_batch(example_inputs)
            with torch.inference_mode():
                want = inputs.call(model, check)
                got = inputs.main_output(inputs.call(fresh, check))
                err = max(err, _verify("safetensors", got, inputs.main_output(want)))
                output = inputs.output_name(want)
        size = staged.stat().st_size
    return ExportResult("safetensors", Path(path), size, err, output=output)


def export(model: nn.Module, example_inputs: Example, path: str | Path, format: str = "onnx") -> ExportResult:
    """Export in one of FORMATS and verify the written file; see the functions above for each format."""
    check_target(path, format)
    if format in ("onnx", "onnx-int8"):
        return export_onnx(model, example_inputs, path, int8=format == "onnx-int8")
    if format == "torch-export":
        return export_program(model, example_inputs, path)
    check_target(path, format)
    if format == "safetensors":
        return export_safetensors(model, path, example_inputs)
    raise ExportError(f"unknown export format '{format}' (choose from {', '.join(FORMATS)})")
