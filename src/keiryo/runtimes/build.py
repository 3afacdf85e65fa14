"""Build a deployment runtime's program from a PyTorch model, and load a saved one back.

Each candidate in RUNTIME_CANDIDATES names a runtime and a precision; `build` converts the model through the
runtime's own documented tools (see onnx_runtime, openvino_runtime, executorch_runtime) and returns a
`Runner`. Every program takes any batch size: ONNX Runtime and OpenVINO programs have a dynamic batch
dimension, ExecuTorch programs are planned for batches up to `executorch_runtime.MAX_BATCH` and the Runner
runs larger ones in chunks. A runtime whose package is missing raises `errors.MissingDependency` (one line
naming the pip command), a model it cannot convert raises `ExportError`: both are KeiryoErrors a caller can
report as "skipped".
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from keiryo import inputs
from keiryo.errors import ArtifactError, ConfigError, MissingDependency, check_choice
from keiryo.export_check import ExportError, check_inputs
from keiryo.inputs import Example
from keiryo.runtimes import executorch_runtime, onnx_runtime, openvino_runtime
from keiryo.runtimes.runner import Conversion, Flat, Runner, Signature, read_sidecar, signature

# candidate -> (runtime, precision)
CANDIDATES = {
    "onnxruntime": ("onnxruntime", "fp32"),
    "onnxruntime-int8-dynamic": ("onnxruntime", "int8-dynamic"),
    "onnxruntime-int8-static": ("onnxruntime", "int8-static"),
    "openvino": ("openvino", "fp32"),
    "openvino-bf16": ("openvino", "bf16"),
    "openvino-int8": ("openvino", "int8-static"),
    "executorch": ("executorch", "fp32"),
    "executorch-int8": ("executorch", "int8-static"),
}
RUNTIME_CANDIDATES = tuple(CANDIDATES)
# runtime -> its module here, the packages it needs, and the pip command that installs them
RUNTIMES = {
    "onnxruntime": (onnx_runtime, ("onnxruntime", "onnx"), "pip install onnxruntime"),
    "openvino": (openvino_runtime, ("openvino", "nncf"), "pip install 'keiryo[openvino]'"),
    "executorch": (executorch_runtime, ("executorch",), "pip install executorch"),
}
CALIBRATION_SAMPLES = 300  # as NNCF's default subset: enough for min-max ranges, quick on small models


def require(runtime: str) -> None:
    """Raise MissingDependency unless every package `runtime` needs imports."""
    _, packages, pip = RUNTIMES[runtime]
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError:
            raise MissingDependency(f"{runtime} is not installed ({package} is missing): {pip}") from None


def build(
    model: nn.Module,
    example_inputs: Example,
    candidate: str,
    calibration: Example | Iterable[Example] | None = None,
    threads: int | None = None,
) -> Runner:
    """The model converted to `candidate`'s runtime and precision, as a Runner.

    `example_inputs` fix the form of the inputs (every tensor's first dimension is the batch, any size runs
    later). `calibration` (static int8 only: an example of many samples, or several) gives activation
    ranges; up to CALIBRATION_SAMPLES samples are used, one at a time; without it the example inputs are
    used. `threads` defaults to `torch.get_num_threads()`, so the runtime and PyTorch use the same count.
    """
    check_choice(candidate, RUNTIME_CANDIDATES, "runtime candidate")
    runtime, precision = CANDIDATES[candidate]
    require(runtime)
    check_inputs(model, example_inputs)
    threads = threads or torch.get_num_threads()
    model = model.eval()
    example = inputs.resize_batch(example_inputs, 2)  # a batch above 1: exporters specialize a batch of 1
    module = RUNTIMES[runtime][0]
    sig = signature(model, example)
    flat = Flat(model, example)
    samples = _samples(sig, calibration if calibration is not None else example_inputs, precision)
    program = module.build(Conversion(flat, flat.example(example), sig, precision, samples, threads))
    runner = Runner(program, sig, runtime, precision)
    _check_shape(runner, model, example)
    return runner


def load_runtime(path: str | Path, threads: int | None = None) -> Runner:
    """A Runner from a saved artifact (.onnx, .xml, .pte) and its `.json` sidecar (either path will do).
    No pickle: the sidecar is JSON, the artifact is the runtime's own format."""
    artifact, meta = read_sidecar(path)
    runtime, precision = meta.get("runtime"), meta.get("precision")
    if runtime not in RUNTIMES:
        raise ArtifactError(f"'{artifact}': unknown runtime {runtime!r} in its sidecar")
    module = RUNTIMES[runtime][0]
    if artifact.suffix != module.SUFFIX:
        raise ArtifactError(f"'{artifact}': a {runtime} artifact is a {module.SUFFIX} file")
    require(runtime)
    try:
        program = module.load(artifact, meta["signature"], threads or torch.get_num_threads(), str(precision))
    except ExportError as exc:
        raise ArtifactError(f"'{artifact}' is corrupt or not a {runtime} program: {exc}") from None
    return Runner(program, meta["signature"], runtime, str(precision))


def _samples(
    sig: Signature, calibration: Example | Iterable[Example], precision: str
) -> list[tuple[Tensor, ...]]:
    """Static int8's calibration as single samples in the flat inputs' form (empty for other precisions)."""
    if precision != "int8-static":
        return []
    examples = [calibration] if isinstance(calibration, (Tensor, dict, tuple)) else list(calibration)
    samples: list[tuple[Tensor, ...]] = []
    for example in examples:
        try:
            inputs.check_example(example, "calibration")
            n = inputs.batch_size(example)
        except ConfigError as exc:
            raise ConfigError(f"calibration: {exc}") from None
        for i in range(min(n, CALIBRATION_SAMPLES - len(samples))):
            samples.append(tuple(sig.flatten(*inputs.args_kwargs(inputs.take(example, i, i + 1)))))
    if not samples:
        raise ConfigError("calibration holds no samples")
    return samples


def _check_shape(runner: Runner, model: nn.Module, example: Example) -> None:
    """A program whose output differs in shape from the model's is broken: refuse it now."""
    with torch.inference_mode():
        want = inputs.forward(model, example)
        try:
            got = inputs.main_output(inputs.call(runner, example))
        except Exception as exc:
            raise ExportError(f"the {runner.runtime} program fails to run: {exc}") from exc
    if got.shape != want.shape:
        raise ExportError(
            f"the {runner.runtime} program gives outputs of shape {tuple(got.shape)}, the model "
            f"{tuple(want.shape)}; it was not kept"
        )
