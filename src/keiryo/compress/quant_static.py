"""Static int8 and QAT for `keiryo.quantize`, on torch.ao's quantized Linear/Conv kernels (x86/fbgemm engine).

`torch.ao.quantization` is deprecated, but it is the only library here with static int8 kernels for both
convolutions and Linear layers with calibrated activation ranges: torchao's static int8 covers Linear only.
Each layer becomes `StaticQuantized`: quantize the input with calibrated (scale, zero point), run the int8
kernel, dequantize. This works on any model without tracing; BatchNorms after convolutions are folded
first (`fold.py`).
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keiryo import inputs
from keiryo.compress.quant_backends import replace_module, weight_observer, weight_qscheme

SHAPE_ATTRIBUTES = ("in_features", "out_features", "in_channels", "out_channels")


class PercentileObserver(nn.Module):
    """Activation range: the mean over batches of the 0.01th and 99.99th percentiles (clips outliers)."""

    def __init__(self, percentile: float = 99.99) -> None:
        super().__init__()
        self.percentile = percentile
        self.lows: list[float] = []
        self.highs: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        flat = x.detach().float().flatten()
        if flat.numel() > 1_000_000:
            flat = flat[torch.randperm(flat.numel())[:1_000_000]]
        q = torch.quantile(flat, torch.tensor([1 - self.percentile / 100, self.percentile / 100]))
        self.lows.append(float(q[0]))
        self.highs.append(float(q[1]))
        return x

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        from torch.ao.quantization.observer import MinMaxObserver

        helper = MinMaxObserver(dtype=torch.quint8, reduce_range=not torch.cpu._is_vnni_supported())
        helper(torch.tensor([sum(self.lows) / len(self.lows), sum(self.highs) / len(self.highs)]))
        return helper.calculate_qparams()


def activation_observer(kind: str) -> nn.Module:
    """An observer of activation ranges: minmax | histogram (torch.ao, minimizes L2 error) | percentile."""
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

    reduce_range = not torch.cpu._is_vnni_supported()  # without VNNI, fbgemm's int16 accumulation overflows
    if kind == "minmax":
        return MinMaxObserver(dtype=torch.quint8, reduce_range=reduce_range)
    if kind == "histogram":
        return HistogramObserver(dtype=torch.quint8, reduce_range=reduce_range)
    return PercentileObserver()


class StaticQuantized(nn.Module):
    """One layer run as static int8: quantize the input with calibrated (scale, zero point), run torch.ao's
    quantized Linear/Conv (int8 weights, int32 accumulation, requantized output), dequantize."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        q = torch.quantize_per_tensor(x, float(self.input_scale), int(self.input_zero_point), torch.quint8)
        return self.inner(q).dequantize()

    def __getattr__(self, name: str) -> object:
        # Models read their layers' shapes in forward (e.g. the head size from `qkv.out_features`).
        if name in SHAPE_ATTRIBUTES:
            return getattr(self.inner, name)
        return super().__getattr__(name)


@functools.cache
def _silence_deprecation() -> None:
    """Once static int8 layers exist in this process, hide torch's deprecation of quantized tensors (known and
    deliberate here, see above): it would otherwise surface at some user's first quantized forward."""
    warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")


def empty_static(layer: nn.Module) -> StaticQuantized:
    """A StaticQuantized shell shaped like the float `layer`, weights and scales to be loaded or set."""
    import torch.ao.nn.quantized as nnq

    _silence_deprecation()

    if isinstance(layer, nn.Linear):
        inner = nnq.Linear(layer.in_features, layer.out_features, bias_=layer.bias is not None)
    else:
        kind = nnq.Conv1d if isinstance(layer, nn.Conv1d) else nnq.Conv2d
        inner = kind(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
        )
    return StaticQuantized(inner)


def make_static(
    layer: nn.Module,
    input_qparams: tuple[Tensor, Tensor],
    output_qparams: tuple[Tensor, Tensor],
    weight_fake_quant: nn.Module,
) -> StaticQuantized:
    """The static int8 version of a float layer, given calibrated activation ranges and a weight observer."""
    _silence_deprecation()
    weight = layer.weight.detach().float()
    weight_fake_quant(weight)
    scale, zero_point = weight_fake_quant.calculate_qparams()
    if weight_fake_quant.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
        qweight = torch.quantize_per_channel(weight, scale.float(), zero_point.long(), 0, torch.qint8)
    else:
        qweight = torch.quantize_per_tensor(weight, float(scale), int(zero_point), torch.qint8)
    module = empty_static(layer)
    module.inner.set_weight_bias(qweight, layer.bias.detach().float() if layer.bias is not None else None)
    module.inner.scale = float(output_qparams[0])
    module.inner.zero_point = int(output_qparams[1])
    module.input_scale.fill_(float(input_qparams[0]))
    module.input_zero_point.fill_(int(input_qparams[1]))
    return module


def calibrate_static(
    model: nn.Module,
    layers: list[str],
    example: inputs.Example,
    observer: str,
    per_channel: bool,
    symmetric: bool,
) -> None:
    """Observe each layer's input and output ranges on `example` (any model input, 64 samples a call), then
    swap the layers for StaticQuantized."""
    observers, handles = {}, []
    for name in layers:
        pair = (activation_observer(observer), activation_observer(observer))
        observers[name] = pair
        hook = functools.partial(_observe, pair)
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, inputs.batch_size(example), 64):
                inputs.call(model, inputs.take(example, i, i + 64))
    finally:
        for handle in handles:
            handle.remove()
    for name in layers:
        seen_in, seen_out = observers[name]
        layer = model.get_submodule(name)
        static = make_static(
            layer,
            seen_in.calculate_qparams(),
            seen_out.calculate_qparams(),
            weight_observer(per_channel, symmetric)(),
        )
        replace_module(model, name, static)


def _observe(pair: tuple[nn.Module, nn.Module], module: nn.Module, args: tuple, output: Tensor) -> None:
    pair[0](args[0].detach())
    pair[1](output.detach())


class FakeQuantized(nn.Module):
    """A float Linear/Conv trained with int8 fake quantization of its input, weight and output (QAT)."""

    def __init__(self, layer: nn.Module, per_channel: bool, symmetric: bool) -> None:
        from torch.ao.quantization import FakeQuantize
        from torch.ao.quantization.observer import (
            MovingAverageMinMaxObserver,
            MovingAveragePerChannelMinMaxObserver,
        )

        super().__init__()
        self.layer = layer
        reduce_range = not torch.cpu._is_vnni_supported()
        act = FakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver,
            quant_min=0,
            quant_max=127 if reduce_range else 255,
            dtype=torch.quint8,
        )
        scheme = weight_qscheme(per_channel, symmetric)
        per_channel_args = {"ch_axis": 0} if per_channel else {}
        observer = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
        weight = FakeQuantize.with_args(
            observer=observer,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=scheme,
            **per_channel_args,
        )
        self.input_fq, self.output_fq, self.weight_fq = act(), act(), weight()

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_fq(x)
        weight = self.weight_fq(self.layer.weight)
        if isinstance(self.layer, nn.Linear):
            out = F.linear(x, weight, self.layer.bias)
        else:
            out = self.layer._conv_forward(x, weight, self.layer.bias)
        return self.output_fq(out)


def prepare_qat(model: nn.Module, layers: list[str], per_channel: bool, symmetric: bool) -> None:
    """Wrap each named layer in FakeQuantized, in place."""
    for name in layers:
        replace_module(model, name, FakeQuantized(model.get_submodule(name), per_channel, symmetric))


def convert_qat(model: nn.Module, layers: list[str]) -> None:
    """Turn each FakeQuantized layer into StaticQuantized with the ranges and weights it learned."""
    for name in layers:
        fq = model.get_submodule(name)
        observer = copy.deepcopy(fq.weight_fq.activation_post_process)
        observer.reset_min_max_vals()
        static = make_static(
            fq.layer, fq.input_fq.calculate_qparams(), fq.output_fq.calculate_qparams(), observer
        )
        replace_module(model, name, static)


def rebuild_static(model: nn.Module, layers: list[str]) -> None:
    """Swap the named layers for empty StaticQuantized shells (load fills them)."""
    for name in layers:
        replace_module(model, name, empty_static(model.get_submodule(name)))
