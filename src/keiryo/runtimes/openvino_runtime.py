"""OpenVINO programs: fp32, bf16, and int8 through NNCF post-training quantization, compiled for CPU latency.

As OpenVINO's documentation shows: `ov.convert_model` from the PyTorch model with an example input (only the
batch dimension left dynamic), `nncf.quantize` on the converted model with an `nncf.Dataset` over the
calibration samples (`ModelType.TRANSFORMER` for transformers, which keeps softmax/layer-norm paths in
float; the full bias correction, `fast_bias_correction=False`: on keiryo's digits cnn it lifts the cosine to
the float outputs from 0.986 to 0.996 and top-1 agreement from 98.1% to 100%), and
`core.compile_model(model, "CPU", {...})` with the LATENCY hint and the thread count PyTorch uses, compiled
for each input shape it meets (static shapes run faster than a dynamic batch). The inference precision is
the candidate's: f32 for fp32 (OpenVINO's own default on a CPU with bf16 units is bf16, which would run
"fp32" in bf16 unannounced), bf16 for bf16 (refused on a CPU without bf16 units, where it would be emulated),
and OpenVINO's default for int8 (the layers NNCF leaves in float run in the CPU's fastest float type).
IR files (.xml + .bin) are written with `compress_to_fp16=False`: the weights stay as they ran.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from keiryo.export_check import ExportError, first_line, quiet
from keiryo.runtimes.runner import Conversion, Signature

SUFFIX = ".xml"
# OpenVINO's CPU plugin ran the digits cnn 2x faster at batch 1 compiled for that shape than with a dynamic
# batch (0.68 vs 1.34 ms): each input shape met is compiled once, statically, up to this many shapes
STATIC_SHAPES = 8
# precision -> INFERENCE_PRECISION_HINT (None: OpenVINO's default for this CPU)
HINTS = {"fp32": "f32", "bf16": "bf16", "int8-static": None}


class OpenVinoProgram:
    """An OpenVINO model compiled for the CPU: with static shapes for each input shape it meets (up to
    STATIC_SHAPES of them, compiled at first use; beyond, the dynamic-batch compilation runs)."""

    suffix = SUFFIX
    max_batch = None  # a dynamic batch: any size in one run

    def __init__(self, model: object, threads: int, precision: str) -> None:
        self.model, self.threads, self.hint = model, threads, HINTS.get(precision)
        self.requests: dict[tuple, object] = {}
        self.dynamic = self._compile(model)
        self._files: dict[str, bytes] | None = None

    def _compile(self, model: object) -> object:
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads}
        if self.hint is not None:
            config["INFERENCE_PRECISION_HINT"] = self.hint
        try:
            return ov.Core().compile_model(model, "CPU", config).create_infer_request()
        except Exception as exc:
            raise ExportError(f"OpenVINO cannot compile the program: {first_line(exc)}") from exc

    def run(self, flat: list[Tensor]) -> Tensor:
        import openvino as ov

        shapes = tuple(tuple(t.shape) for t in flat)
        request = self.requests.get(shapes)
        if request is None and len(self.requests) < STATIC_SHAPES:
            static = self.model.clone()
            static.reshape({i: list(shape) for i, shape in enumerate(shapes)})
            request = self.requests[shapes] = self._compile(static)
        request = request or self.dynamic
        for i, t in enumerate(flat):
            request.set_input_tensor(i, ov.Tensor(t.numpy(), shared_memory=True))
        request.infer()
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    def artifact(self) -> dict[str, bytes]:
        """The IR's .xml and .bin, serialized once (weights kept as they run: no fp16 compression)."""
        import openvino as ov

        if self._files is None:
            with tempfile.TemporaryDirectory(prefix="keiryo-ov-") as tmp:
                xml = Path(tmp) / "model.xml"
                ov.save_model(self.model, str(xml), compress_to_fp16=False)
                self._files = {".xml": xml.read_bytes(), ".bin": xml.with_suffix(".bin").read_bytes()}
        return self._files


def build(conv: Conversion) -> OpenVinoProgram:
    """Convert the flat model to OpenVINO, quantized with NNCF when `conv.precision` is int8."""
    import openvino as ov

    if conv.precision == "bf16" and not has_bf16():
        raise ExportError("this CPU has no bf16 units (OpenVINO would emulate bf16, slower than fp32)")

    shapes = [
        (ov.PartialShape([-1 if s.batched and d == 0 else n for d, n in enumerate(t.shape)]), _ov_type(t))
        for s, t in zip(conv.sig.inputs, conv.example, strict=True)
    ]
    try:
        with quiet(), torch.no_grad():
            model = ov.convert_model(conv.flat, example_input=conv.example, input=shapes)
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot convert the model: {first_line(exc)}") from exc
    if conv.precision == "int8-static":
        model = _quantize(model, conv.calibration, _is_transformer(conv.flat))
    return OpenVinoProgram(model, conv.threads, conv.precision)


def has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (AVX-512 BF16 or AMX), as it reports."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def load(path: Path, sig: Signature, threads: int, precision: str) -> OpenVinoProgram:
    import openvino as ov

    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot read '{path}': {first_line(exc)}") from exc
    return OpenVinoProgram(model, threads, precision)


def _quantize(model: object, calibration: list[tuple[Tensor, ...]], transformer: bool) -> object:
    import nncf

    dataset = nncf.Dataset(calibration, lambda batch: [t.numpy() for t in batch])
    model_type = nncf.ModelType.TRANSFORMER if transformer else None
    try:
        with quiet():
            return nncf.quantize(
                model,
                dataset,
                subset_size=len(calibration),
                model_type=model_type,
                fast_bias_correction=False,
            )
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
