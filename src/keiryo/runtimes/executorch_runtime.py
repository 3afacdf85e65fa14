"""ExecuTorch programs (.pte) with the XNNPACK delegate: fp32, and int8 through the XNNPACK quantizer.

As ExecuTorch's documentation shows: `torch.export` the model (a dynamic batch up to `MAX_BATCH`, for which
the program's memory is planned), `to_edge_transform_and_lower` with the `XnnpackPartitioner`, and
`to_executorch()` for the .pte bytes; int8 is the PT2E flow before that (export, `prepare_pt2e` with
`XNNPACKQuantizer` and `get_symmetric_quantization_config(is_per_channel=True)`, calibration, `convert_pt2e`),
giving int8 weights per channel and static int8 activations. Programs run in ExecuTorch's own runtime
(`executorch.runtime.Runtime`), the runtime a phone or board would use, with its XNNPACK thread pool sized to
the thread count PyTorch uses.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from keiryo.export_check import ExportError, first_line, quiet
from keiryo.optional import import_torchao
from keiryo.runtimes.runner import Conversion, Signature, dynamic_shapes

SUFFIX = ".pte"
MAX_BATCH = 64  # memory is planned for at most this batch; larger calls run in chunks (see Runner)


class ExecuTorchProgram:
    """A .pte program loaded in ExecuTorch's runtime, over the bytes it was loaded from."""

    suffix = SUFFIX

    def __init__(self, pte: bytes, sig: Signature, threads: int) -> None:
        from executorch.extension.pybindings.portable_lib import (
            _threadpool_get_thread_count,
            _unsafe_reset_threadpool,
        )
        from executorch.runtime import Runtime

        with _native_quiet():
            if _threadpool_get_thread_count() != threads:
                _unsafe_reset_threadpool(threads)  # one pool per process: the last program built sets it
            try:
                program = Runtime.get().load_program(pte)
                self.method = program.load_method("forward")
            except Exception as exc:
                raise ExportError(f"ExecuTorch cannot load the program: {first_line(exc)}") from exc
        self.program, self.pte = program, pte  # the program must outlive its method
        meta = self.method.metadata
        batched = [meta.input_tensor_meta(i).sizes() for i, s in enumerate(sig.inputs) if s.batched]
        # the batch its memory was planned for: the export's bound, or less where ExecuTorch's planner
        # tightens it (a conv → flatten → linear model is planned for 15 samples with a bound of 64)
        self.max_batch = min((sizes[0] for sizes in batched), default=None)

    def run(self, flat: list[Tensor]) -> Tensor:
        return self.method.execute(flat)[0]

    def artifact(self) -> dict[str, bytes]:
        return {SUFFIX: self.pte}


def build(conv: Conversion) -> ExecuTorchProgram:
    """Lower the flat model to an XNNPACK .pte, int8 when `conv.precision` says so."""
    import_torchao()  # executorch imports torchao: quietly (its CUDA-only extensions cannot load here)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    shapes = dynamic_shapes(conv.sig, MAX_BATCH)
    try:
        with quiet(), torch.no_grad():
            program = torch.export.export(conv.flat, conv.example, dynamic_shapes=shapes)
            if conv.precision != "fp32":
                quantized = _quantize(program, conv.calibration)  # a GraphModule taking the inputs one by one
                program = torch.export.export(quantized, conv.example, dynamic_shapes=shapes[0])
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            pte = lowered.to_executorch().buffer
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ExecuTorch cannot lower the model: {first_line(exc)}") from exc
    return ExecuTorchProgram(pte, conv.sig, conv.threads)


def load(path: Path, sig: Signature, threads: int, precision: str) -> ExecuTorchProgram:
    return ExecuTorchProgram(path.read_bytes(), sig, threads)


def _quantize(program: torch.export.ExportedProgram, calibration: list[tuple[Tensor, ...]]) -> nn.Module:
    """The PT2E int8 flow with ExecuTorch's XNNPACK quantizer, calibrated on `calibration`."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(program.module(), quantizer)
    for batch in calibration:
        prepared(*batch)
    return convert_pt2e(prepared)


@contextlib.contextmanager
def _native_quiet() -> Iterator[None]:
    """ExecuTorch's C++ runtime logs CPU probing to stderr when it starts; keep the user's terminal clean
    (Python errors still surface as exceptions)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
