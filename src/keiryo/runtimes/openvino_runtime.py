"""OpenVINO programs: fp32, and int8 through NNCF post-training quantization, compiled for CPU latency.

As OpenVINO's documentation shows: `ov.convert_model` from the PyTorch model with an example input (only the
batch dimension left dynamic), `nncf.quantize` on the converted model with an `nncf.Dataset` over the
calibration samples (`ModelType.TRANSFORMER` for transformers, which keeps softmax/layer-norm paths in
float), and `core.compile_model(model, "CPU", {...})` with the LATENCY hint and the thread count PyTorch uses.
Inference precision is pinned to f32 so a CPU with bf16 units does not silently run "fp32" in bf16.
IR files (.xml + .bin) are written with `compress_to_fp16=False`: the weights stay as they ran.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from keiryo.export_check import ExportError, first_line, quiet
from keiryo.runtimes.runner import Signature

SUFFIX = ".xml"


class OpenVinoProgram:
    """An OpenVINO model compiled for the CPU, with one reused inference request."""

    suffix = SUFFIX
    max_batch = None  # a dynamic batch: any size in one run

    def __init__(self, model: object, threads: int) -> None:
        import openvino as ov

        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "f32",
        }
        try:
            compiled = ov.Core().compile_model(model, "CPU", config)
        except Exception as exc:
            raise ExportError(f"OpenVINO cannot compile the program: {first_line(exc)}") from exc
        self.model = model
        self.request = compiled.create_infer_request()
        self._nbytes: int | None = None

    def run(self, flat: list[Tensor]) -> Tensor:
        result = self.request.infer([t.numpy() for t in flat], share_inputs=True)
        return torch.from_numpy(result[0])

    def write(self, path: Path) -> list[Path]:
        import openvino as ov

        ov.save_model(self.model, str(path), compress_to_fp16=False)
        return [path.with_suffix(".bin"), path]

    def nbytes(self) -> int:
        if self._nbytes is None:
            with tempfile.TemporaryDirectory(prefix="keiryo-ov-") as tmp:
                self._nbytes = sum(f.stat().st_size for f in self.write(Path(tmp) / "model.xml"))
        return self._nbytes


def build(
    flat: nn.Module,
    example: tuple[Tensor, ...],
    sig: Signature,
    precision: str,
    calibration: list[tuple[Tensor, ...]],
    threads: int,
) -> OpenVinoProgram:
    """Convert `flat` (see `runner.Flat`) to OpenVINO, quantized with NNCF when `precision` is int8."""
    import openvino as ov

    shapes = [
        (ov.PartialShape([-1 if s.batched and d == 0 else n for d, n in enumerate(t.shape)]), _ov_type(t))
        for s, t in zip(sig.inputs, example, strict=True)
    ]
    try:
        with quiet(), torch.no_grad():
            model = ov.convert_model(flat, example_input=example, input=shapes)
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot convert the model: {first_line(exc)}") from exc
    if precision != "fp32":
        model = _quantize(model, calibration, _is_transformer(flat))
    return OpenVinoProgram(model, threads)


def load(path: Path, sig: Signature, threads: int) -> OpenVinoProgram:
    import openvino as ov

    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot read '{path}': {first_line(exc)}") from exc
    return OpenVinoProgram(model, threads)


def _quantize(model: object, calibration: list[tuple[Tensor, ...]], transformer: bool) -> object:
    import nncf

    dataset = nncf.Dataset(calibration, lambda batch: [t.numpy() for t in batch])
    model_type = nncf.ModelType.TRANSFORMER if transformer else None
    try:
        with quiet():
            return nncf.quantize(model, dataset, subset_size=len(calibration), model_type=model_type)
    except Exception as exc:
        raise ExportError(f"NNCF int8 quantization failed: {first_line(exc)}") from exc


def _is_transformer(model: nn.Module) -> bool:
    """Whether the model holds attention (by its modules' names), for NNCF's transformer preset."""
    return any("attention" in type(m).__name__.lower() for m in model.modules())


def _ov_type(tensor: Tensor) -> object:
    import openvino as ov

    types = {torch.float32: ov.Type.f32, torch.int64: ov.Type.i64, torch.int32: ov.Type.i32}
    types |= {torch.float16: ov.Type.f16, torch.bool: ov.Type.boolean, torch.bfloat16: ov.Type.bf16}
    if tensor.dtype not in types:
        raise ExportError(f"OpenVINO: inputs of dtype {tensor.dtype} are not supported here")
    return types[tensor.dtype]
