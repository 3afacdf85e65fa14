"""ONNX Runtime programs: fp32, int8 dynamic and int8 static (QDQ), configured as its documentation
recommends for CPU latency.

The model is exported once (`export.write_onnx`, the dynamo exporter, a dynamic batch), pre-processed for
quantization (`quant_pre_process`: symbolic shape inference and graph optimization), then quantized by
onnxruntime's own tools: `quantize_dynamic` (int8 weights, activations quantized per call) or
`quantize_static` in QDQ format with per-channel weights and activation ranges from a calibration reader.
Sessions run with all graph optimizations, sequential execution, one inter-op thread and as many intra-op
threads as PyTorch uses (`threads`). On x86 without VNNI, weights are 7-bit (`reduce_range`), onnxruntime's
documented remedy for the u8×s8 saturation of those CPUs (see `export.saturating_cpu`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from keiryo.export import ort_quiet, quantize_onnx_dynamic, saturating_cpu, write_onnx
from keiryo.export_check import ExportError, first_line
from keiryo.runtimes.runner import Conversion, Signature, dynamic_shapes

SUFFIX = ".onnx"


class OnnxProgram:
    """An onnxruntime session over the ONNX bytes it was made from (which `write` saves)."""

    suffix = SUFFIX
    max_batch = None  # a dynamic batch: any size in one run

    def __init__(self, model_bytes: bytes, sig: Signature, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: warnings about unused initializers are not the user's
        try:
            self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot load the ONNX program: {first_line(exc)}") from exc
        self.model_bytes = model_bytes
        self.names = [s.name for s in sig.inputs]

    def run(self, flat: list[Tensor]) -> Tensor:
        feed = {name: t.numpy() for name, t in zip(self.names, flat, strict=True)}
        return torch.from_numpy(self.session.run(None, feed)[0])

    def artifact(self) -> dict[str, bytes]:
        return {SUFFIX: self.model_bytes}


def build(conv: Conversion) -> OnnxProgram:
    """Export the flat model to ONNX and quantize it as `conv.precision` says."""
    sig = conv.sig
    names = ([s.name for s in sig.inputs], [sig.output.replace("[", "_").replace("]", "")])
    with tempfile.TemporaryDirectory(prefix="keiryo-onnx-") as tmp:
        source = Path(tmp) / "float.onnx"
        write_onnx(conv.flat, (conv.example, {}), dynamic_shapes(sig), source, names)
        if conv.precision == "fp32":
            return OnnxProgram(source.read_bytes(), sig, conv.threads)
        prepared = Path(tmp) / "prepared.onnx"
        target = Path(tmp) / "int8.onnx"
        _pre_process(source, prepared)
        if conv.precision == "int8-dynamic":
            quantize_onnx_dynamic(prepared, target)
        else:
            _quantize_static(prepared, target, sig, conv.calibration)
        return OnnxProgram(target.read_bytes(), sig, conv.threads)


def load(path: Path, sig: Signature, threads: int, precision: str) -> OnnxProgram:
    return OnnxProgram(path.read_bytes(), sig, threads)


def _pre_process(source: Path, target: Path) -> None:
    """onnxruntime's recommended step before quantizing: shape inference and graph optimization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with ort_quiet():
        try:
            quant_pre_process(str(source), str(target))
        except Exception as exc:
            raise ExportError(f"onnxruntime quantization pre-processing failed: {first_line(exc)}") from exc


def _quantize_static(
    source: Path, target: Path, sig: Signature, calibration: list[tuple[Tensor, ...]]
) -> None:
    """Static int8 in QDQ format: per-channel int8 weights, uint8 activations with min-max ranges."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    names = [s.name for s in sig.inputs]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {n: t.numpy() for n, t in zip(names, batch, strict=True)}

    with ort_quiet():
        try:
            quantize_static(
                str(source),
                str(target),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=saturating_cpu(),
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as exc:
            raise ExportError(f"onnxruntime static int8 quantization failed: {first_line(exc)}") from exc
