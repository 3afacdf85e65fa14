"""Static int8 by PT2E (torch.export + torchao's X86InductorQuantizer), compiled by inductor with freezing.

Where `quant_static.py` runs each layer as quantize → torch.ao int8 kernel → dequantize in eager mode, this
path exports the whole model, inserts observers where the x86 quantizer says (convolutions, Linear layers
and their fused ReLU/add), calibrates, converts to a quantize/dequantize graph, and lets inductor fuse each
(dequantize → op → quantize) into one oneDNN int8 kernel with prepacked weights: at small batches the
per-layer quantize/dequantize steps that dominate eager int8 go away. Needs a model torch.export can capture.

Saved models are rebuilt without pickled code (`keiryo.load` → `rebuild`): the plan records the example's
shapes and every per-tensor activation (scale, zero point) that calibration chose; at load the float model is
exported again, prepared with those ranges fixed and converted, and the int8 weights load from the file.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from keiryo import inputs
from keiryo.devices import frozen
from keiryo.optional import import_torchao

BATCH = 64  # calibration inputs per forward


class Pt2eInt8(nn.Module):
    """A PT2E int8 program (a converted `torch.fx.GraphModule`), run compiled by inductor with freezing.

    `program` holds the int8 weights and scales (its state_dict is what a keiryo model file stores); the
    compiled callable is made on first use, one compile per input shape (seconds each)."""

    def __init__(self, program: torch.fx.GraphModule) -> None:
        super().__init__()
        self.program = program
        self._compiled = None

    def forward(self, *args: object, **kwargs: object) -> object:
        if self._compiled is None:
            # kept out of the module tree: the state_dict is the program's alone
            object.__setattr__(self, "_compiled", torch.compile(self.program, dynamic=False))
        with torch.no_grad(), frozen():
            return self._compiled(*args, **kwargs)

    def train(self, mode: bool = True) -> Pt2eInt8:
        """Only the flag: an exported program has no train mode (torchao refuses `.eval()` on it)."""
        self.training = mode
        return self

    def __deepcopy__(self, memo: dict) -> Pt2eInt8:
        fresh = Pt2eInt8(copy.deepcopy(self.program, memo))
        fresh.__dict__.update({k: v for k, v in self.__dict__.items() if k.startswith("_keiryo")})
        return fresh


def example_spec(example: inputs.Example) -> dict:
    """One sample's input shapes and dtypes, as plain data (recorded to export the model again at load)."""

    def one(t: Tensor) -> list:
        return [list(t.shape[1:]), str(t.dtype).removeprefix("torch.")]

    if isinstance(example, Tensor):
        return {"tensor": one(example)}
    if isinstance(example, dict):
        return {"kwargs": {k: one(v) for k, v in example.items()}}
    return {"args": [one(t) for t in example]}


def _zeros(spec: dict, batch: int) -> inputs.Example:
    def make(entry: list) -> Tensor:
        return torch.zeros([batch, *entry[0]], dtype=getattr(torch, entry[1]))

    if "tensor" in spec:
        return make(spec["tensor"])
    if "kwargs" in spec:
        return {k: make(v) for k, v in spec["kwargs"].items()}
    return tuple(make(v) for v in spec["args"])


def _prepared(model: nn.Module, example: inputs.Example, reduce_range: bool) -> torch.fx.GraphModule:
    """The model exported (batch dimension dynamic) with the x86 quantizer's observers inserted."""
    import_torchao()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    args, kwargs = inputs.args_kwargs(example)
    batch = {0: torch.export.Dim.AUTO}  # any batch size, unless the model fixes it
    dims = tuple(batch if isinstance(a, Tensor) else None for a in (*args, *kwargs.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model.eval(), args, kwargs, dynamic_shapes=dims)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    try:
        return prepare_pt2e(exported.module(), quantizer)
    except (IndexError, KeyError, TypeError, AttributeError) as exc:
        # the quantizer's pattern matching fails on some graphs (a raw BERT: IndexError in its linear
        # fusion): this backend does not take the model, which `quantize` reports as one line
        raise NotImplementedError(
            f"torchao's X86InductorQuantizer cannot annotate this model ({type(exc).__name__}: {exc})"
        ) from exc


def _converted(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Convert to the quantize/dequantize graph; drop the float weights it no longer reads (int8 copies
    replaced them), so the file and memory hold int8 weights only."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    program = convert_pt2e(prepared)
    read = {n.target for n in program.graph.nodes if n.op == "get_attr"}
    read |= {f"{n.target}" for n in program.graph.nodes if n.op == "call_module"}
    for name, module in list(program.named_modules()):
        for key in list(module._parameters):
            full = f"{name}.{key}" if name else key
            if full not in read and not any(r.startswith(full) for r in read):
                del module._parameters[key]
    return program


def activation_ranges(prepared: torch.fx.GraphModule) -> dict[str, list]:
    """Each per-tensor observer's calibrated [scale, zero point] (the activations' ranges), as plain data."""
    ranges = {}
    for name, module in prepared.named_children():
        if name.startswith("activation_post_process") and module.qscheme in (
            torch.per_tensor_affine,
            torch.per_tensor_symmetric,
        ):
            scale, zero_point = module.calculate_qparams()
            ranges[name] = [float(scale.flatten()[0]), int(zero_point.flatten()[0])]
    return ranges


def quantize_pt2e(model: nn.Module, calibration: inputs.Example, reduce_range: bool) -> tuple[Pt2eInt8, dict]:
    """`model` (float, BatchNorms folded) as a PT2E int8 program calibrated on `calibration`; returns it and
    what `rebuild` needs (the example's shapes, the activation ranges, `reduce_range`)."""
    prepared = _prepared(model, inputs.take(calibration, 0, 2), reduce_range)
    with torch.no_grad():
        for i in range(0, inputs.batch_size(calibration), BATCH):
            inputs.call(prepared, inputs.take(calibration, i, i + BATCH))
    record = {
        "example": example_spec(calibration),
        "ranges": activation_ranges(prepared),
        "reduce_range": reduce_range,
    }
    return Pt2eInt8(_converted(prepared)), record


def rebuild(model: nn.Module, record: dict) -> Pt2eInt8:
    """The same program on a freshly built float model, without data: exported again, its activation
    ranges fixed as recorded, converted (the int8 weights and their scales are loaded afterwards)."""
    from torchao.quantization.pt2e.observer import FixedQParamsObserver

    example = _zeros(record["example"], 2)
    prepared = _prepared(model, example, bool(record["reduce_range"]))
    with torch.no_grad():
        inputs.call(prepared, example)  # weight observers learn their shapes
    for name, (scale, zero_point) in record["ranges"].items():
        old = prepared.get_submodule(name)
        fixed = FixedQParamsObserver(scale, zero_point, old.dtype, old.qscheme, old.quant_min, old.quant_max)
        setattr(prepared, name, fixed)
    return Pt2eInt8(_converted(prepared))
