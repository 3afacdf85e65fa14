"""Export a model for deployment: ONNX (checked in onnxruntime), torch.export programs, safetensors weights,
and Hugging Face folders that transformers loads without keiryo (format "hf").

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
import logging
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from keiryo import hf_export, inputs
from keiryo.errors import KeiryoError
from keiryo.export_check import (
    ExportError,
    check_against,
    check_batch,
    check_inputs,
    dynamic_batch,
    first_line,
    main_index,
    p50_ms,
    quiet,
    staged_file,
    staged_folder,
    verify,
)
from keiryo.fileio import writable_folder
from keiryo.inputs import Example
from keiryo.metrics import has_quantized_kernels, time_models
from keiryo.provenance import TRANSFORMS_ATTR

# Each format and the file suffix it is written with ("hf" writes a folder).
SUFFIXES = {
    "onnx": ".onnx",
    "onnx-int8": ".onnx",
    "torch-export": ".pt2",
    "safetensors": ".safetensors",
    "hf": "",
}
FORMATS = tuple(SUFFIXES)
FLOAT_METHODS = ("fp32", "fp16", "bf16")  # quantize methods whose weights stay plain float tensors


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


def check_target(path: str | Path, format: str) -> Path:
    """Refuse, before any work, an unknown format or a path that cannot be written (one-line ExportError)."""
    if format not in SUFFIXES:
        raise ExportError(f"unknown export format '{format}' (choose from {', '.join(FORMATS)})")
    path = Path(path)
    if format == "hf":
        if path.exists() and not path.is_dir():
            raise ExportError(f"export path '{path}' is a file; a Hugging Face export is a folder")
        if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
            raise ExportError(
                f"export folder '{path}' holds other files; give a new folder (a previous Hugging Face "
                "export there is replaced)"
            )
    elif path.is_dir():
        example = path / ("model" + SUFFIXES[format])
        raise ExportError(f"export path '{path}' is a folder; give a file path such as {example}")
    try:
        writable_folder(path.parent)
    except NotADirectoryError as exc:
        raise ExportError(f"export path '{path}': {exc}") from None
    except OSError as exc:
        raise ExportError(f"export path '{path}': cannot write in its folder ({exc.strerror})") from None
    return path


def _traceable(model: nn.Module, example_inputs: Example, path: str | Path, format: str) -> tuple:
    """Check the target and the inputs before any work; the model in eval mode and its (args, kwargs)."""
    check_target(path, format)
    check_inputs(model, example_inputs)
    args, kwargs = inputs.args_kwargs(example_inputs)
    return model.eval(), args, kwargs


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
    model, args, kwargs = _traceable(model, example_inputs, path, format)
    with staged_file(path) as staged:
        write_onnx(model, (args, kwargs), dynamic_batch(example_inputs), staged)
        if int8:
            float_copy = staged.with_name("float." + staged.name)
            staged.rename(float_copy)
            quantize_onnx_dynamic(float_copy, staged)
        torch_ms = time_models({"torch": model}, example_inputs, runs=30, warmup=5)["torch"].p50_ms
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # same threads as PyTorch: fair
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # don't starve PyTorch
        try:
            session = ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot load the exported model: {first_line(exc)}") from exc
        check = check_batch(example_inputs)  # a batch size not seen at export
        with torch.inference_mode():
            want = inputs.call(model, check)
        index = main_index(want)
        try:
            got = torch.from_numpy(session.run(None, _onnx_feed(session, check))[index])
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot run the exported model: {first_line(exc)}") from exc
        error = verify(format, got, inputs.main_output(want))
        feed = _onnx_feed(session, example_inputs)
        runtime = p50_ms(lambda: session.run(None, feed))
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


def write_onnx(
    model: nn.Module,
    call: tuple[tuple, dict],
    dynamic_shapes: tuple | dict,
    path: Path,
    names: tuple[list[str], list[str]] | None = None,
) -> None:
    """`model` called with `call` (args, kwargs) written as one self-contained ONNX file by the dynamo
    exporter; `names` optionally names its (inputs, outputs). Failures are one-line ExportErrors."""
    args, kwargs = call
    input_names, output_names = names or (None, None)
    try:
        with quiet():
            torch.onnx.export(
                model,
                args,
                str(path),
                kwargs=kwargs or None,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                external_data=False,  # one self-contained file (fine below ONNX's 2 GB limit)
            )
    except Exception as exc:
        if has_quantized_kernels(model):
            raise ExportError(
                "ONNX export failed: this model runs PyTorch int8 kernels, which the ONNX exporter "
                "cannot translate; export the float model as onnx-int8 instead"
            ) from exc
        raise ExportError(f"ONNX export failed: {first_line(exc)}") from exc


def quantize_onnx_dynamic(source: Path, target: Path) -> None:
    """onnxruntime's dynamic int8 of the ONNX file `source` (int8 MatMul/Gemm/Conv weights, activations
    quantized per batch) written to `target`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with ort_quiet():
        try:
            quantize_dynamic(
                str(source), str(target), weight_type=QuantType.QInt8, reduce_range=saturating_cpu()
            )
        except Exception as exc:
            raise ExportError(f"onnxruntime int8 quantization failed: {first_line(exc)}") from exc


@contextlib.contextmanager
def ort_quiet() -> Iterator[None]:
    """onnxruntime's quantization logs a pre-processing tip on the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with quiet():
            yield
    finally:
        root.setLevel(level)


def saturating_cpu() -> bool:
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
    model, args, kwargs = _traceable(model, example_inputs, path, "torch-export")
    with staged_file(path) as staged:
        try:
            with quiet():
                program = torch.export.export(
                    model, args, kwargs=kwargs or None, dynamic_shapes=dynamic_batch(example_inputs)
                )
            torch.export.save(program, str(staged))
        except Exception as exc:
            if has_quantized_kernels(model):
                raise ExportError(
                    "torch.export failed: this model runs PyTorch int8 kernels, which it cannot trace; "
                    "keep it as a keiryo .pt file, or export the float model (onnx-int8 gives an int8 file)"
                ) from exc
            raise ExportError(f"torch.export failed: {first_line(exc)}") from exc
        del program  # what is checked is the written file, loaded afresh
        try:
            loaded = torch.export.load(str(staged)).module()
        except Exception as exc:
            raise ExportError(
                f"torch.export.load cannot read the written program: {first_line(exc)}"
            ) from exc
        err, output = check_against("torch-export", model, loaded, example_inputs)
        lat = time_models({"program": loaded, "torch": model}, example_inputs, runs=30, warmup=5)
        size = staged.stat().st_size
    return ExportResult(
        "torch-export",
        Path(path),
        size,
        err,
        lat["program"].p50_ms,
        lat["torch"].p50_ms,
        output,
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
    check_inputs(model, example_inputs, required=False)
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
    with staged_file(path) as staged:
        try:
            save_file(tensors, str(staged))
            loaded = load_file(str(staged))
        except Exception as exc:
            raise ExportError(
                f"safetensors could not write and read back the weights: {first_line(exc)}"
            ) from exc
        if loaded.keys() != tensors.keys():
            missing = sorted(tensors.keys() - loaded.keys())[:3]
            raise ExportError(f"the written safetensors file lacks {', '.join(missing)}; it was not kept")
        err = max((verify("safetensors", loaded[k], v) for k, v in tensors.items() if v.numel()), default=0.0)
        output = "weights"
        if example_inputs is not None:
            fresh = copy.deepcopy(model).eval()
            try:
                fresh.load_state_dict(loaded, strict=True)
            except RuntimeError as exc:
                raise ExportError(
                    f"the written weights do not fit the architecture: {first_line(exc)}"
                ) from exc
            fresh_err, output = check_against("safetensors", model, fresh, example_inputs)
            err = max(err, fresh_err)
        size = staged.stat().st_size
    return ExportResult("safetensors", Path(path), size, err, output=output)


def export_hf(model: nn.Module, path: str | Path, example_inputs: Example | None = None) -> ExportResult:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer files) that transformers loads by
    itself, for float/fp16/bf16 and pruned models (see `keiryo.hf_export`); int8/int4 models are refused.

    Checked by loading the written folder with transformers and comparing it with the model on
    `example_inputs` (when given).
    """
    check_target(path, "hf")
    check_inputs(model, example_inputs, required=False)
    methods = [
        t["options"].get("method") for t in getattr(model, TRANSFORMS_ATTR, []) if t["kind"] == "quantize"
    ]
    if has_quantized_kernels(model) or any(m not in FLOAT_METHODS for m in methods):
        raise ExportError(
            "int8/int4 weights have no Hugging Face layout that transformers loads by itself: keiryo.load "
            "reads them from the keiryo .pt file (keiryo.save, or --out model.pt); export the float model as "
            "onnx-int8 for an int8 file that onnxruntime loads"
        )
    path = Path(path)
    with staged_folder(path) as staged:
        try:
            fresh = hf_export.write_folder(model, staged)
            loaded = hf_export.load_folder(fresh, staged)
        except KeiryoError as exc:
            raise ExportError(f"Hugging Face export: {exc}") from None
        err, output = 0.0, "weights"
        if example_inputs is not None:
            err, output = check_against("hf", model, hf_export.like(model, loaded), example_inputs)
        size = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file())
    return ExportResult("hf", path, size, err, output=output)


def export(model: nn.Module, example_inputs: Example, path: str | Path, format: str = "onnx") -> ExportResult:
    """Export in one of FORMATS and verify the written file; see the functions above for each format."""
    check_target(path, format)
    if format in ("onnx", "onnx-int8"):
        return export_onnx(model, example_inputs, path, int8=format == "onnx-int8")
    if format == "torch-export":
        return export_program(model, example_inputs, path)
    if format == "hf":
        return export_hf(model, path, example_inputs)
    return export_safetensors(model, path, example_inputs)
