"""The kernels behind `keiryo.quantize`: one function per (method, backend), each changing a model in place.

`compress/quantize.py` chooses among these and records what it did; every function here that needs no data
also runs on a freshly built float model at load time, so a saved model gets its quantized classes back
without calibration data: scales and zero points come from the state_dict.

Two libraries do the work. torchao (`quantize_` with a config) for int8 dynamic, int8 and int4 weight-only on
Linear layers. `torch.ao.quantization` (deprecated, x86/fbgemm engine) for three things torchao does not do as
well on a CPU: its dynamic int8 Linear is the fastest kernel here (1.29 ms vs torchao's 2.53 ms eager at batch
64 on a 4x1024 Linear stack), and it is the only one with static int8 kernels for convolutions and Linear with
calibrated activation ranges, which `int8-static` and `qat` need. Each use is in one function below.
"""

from __future__ import annotations

import collections
import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keiryo.optional import import_torchao

LINEAR = (nn.Linear,)
CONV = (nn.Conv1d, nn.Conv2d)
INT4_GROUP_SIZES = (32, 64, 128)


# --- which layers ------------------------------------------------------------------------------------------


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2): a Linear whose weight is stored (in, out); quantized as a Linear."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def target_layers(model: nn.Module, kinds: tuple[type, ...], skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the modules of exactly `kinds` (Linear includes GPT-2's Conv1D) not named in `skip` (a
    skipped name covers its children). Layers whose weights are tied to another module's (a language
    model's output head sharing the input embedding) stay out: quantizing one would untie them."""
    owners = collections.Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    names = []
    for name, module in model.named_modules():
        if not name or not (type(module) in kinds or (nn.Linear in kinds and is_conv1d(module))):
            continue
        if any(owners[id(p)] > 1 for p in module.parameters(recurse=False)):
            continue
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        names.append(name)
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` was."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# --- precision casts (fp32, fp16, bf16) --------------------------------------------------------------------


def _cast_inputs(dtype: torch.dtype, module: nn.Module, args: tuple) -> tuple:
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def _cast_output(dtype: torch.dtype, module: nn.Module, args: tuple, output: object) -> object:
    return output.to(dtype) if isinstance(output, Tensor) and output.is_floating_point() else output


def add_cast_hooks(module: nn.Module, inner: torch.dtype, outer: torch.dtype = torch.float32) -> None:
    """Cast floating inputs to `inner` before `module` runs and its output back to `outer` after."""
    module.register_forward_pre_hook(functools.partial(_cast_inputs, inner))
    module.register_forward_hook(functools.partial(_cast_output, outer))


def cast_precision(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and buffers to `dtype`; float32 inputs and outputs still work (hooks)."""
    model.to(dtype)
    add_cast_hooks(model, dtype)


# --- int8 weights for torch.ao (fbgemm): dynamic here, static and QAT in quant_static.py ------------------


def weight_qscheme(per_channel: bool, symmetric: bool) -> torch.qscheme:
    """torch's quantization scheme for int8 weights of the given granularity and symmetry."""
    if per_channel:
        return torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    return torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine


def weight_observer(per_channel: bool, symmetric: bool):
    """A torch.ao observer class (with args) for int8 weights of the given granularity and scheme."""
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    scheme = weight_qscheme(per_channel, symmetric)
    if per_channel:
        return PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=scheme, ch_axis=0)
    return MinMaxObserver.with_args(dtype=torch.qint8, qscheme=scheme)


# --- int8 dynamic with torch.ao (fbgemm) -------------------------------------------------------------------


def fbgemm_dynamic(model: nn.Module, layers: list[str], per_channel: bool, symmetric: bool) -> None:
    """Linear layers → torch.ao dynamic int8 (weights int8, activations quantized per batch), in place.

    Deprecated API, used because its fbgemm kernel is the fastest dynamic int8 Linear on x86 CPUs (see top).
    """
    from torch.ao.quantization import QConfig, quantize_dynamic
    from torch.ao.quantization.observer import PlaceholderObserver

    activation = PlaceholderObserver.with_args(dtype=torch.quint8, is_dynamic=True)
    qconfig = QConfig(activation=activation, weight=weight_observer(per_channel, symmetric))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {name: qconfig for name in layers}, dtype=torch.qint8, inplace=True)


# --- torchao: int8 dynamic, int8 weight-only, int4 weight-only --------------------------------------------


def torchao_config(method: str, per_channel: bool, group_size: int) -> object:
    """The torchao config that does `method` (per-row weights for per-channel, else per-tensor)."""
    import_torchao()
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        PerTensor,
    )

    granularity = PerRow() if per_channel else PerTensor()
    if method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig(granularity=granularity, set_inductor_config=False)
    if method == "int8-weight-only":
        return Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
    if method == "int4-weight-only":
        # torchao 0.18's Int4WeightOnlyConfig needs CUDA or mslk for every packing format; its CPU path is the
        # prototype Int4OpaqueTensor on aten's `_weight_int4pack_mm_for_cpu` (tinygemm) kernel.
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
    raise ValueError(f"torchao has no config for {method}")


def torchao_linear(model: nn.Module, layers: list[str], config: object, *, bf16: bool = False) -> None:
    """Swap the weights of the named Linear layers for torchao quantized tensors, in place.

    `bf16`: run those layers in bfloat16 (int4: the CPU kernel is ~30x slower with float32 activations).
    """
    import_torchao()
    from torchao.quantization import quantize_

    wanted = set(layers)
    for name in layers:
        layer = model.get_submodule(name)
        if bf16:
            layer.to(torch.bfloat16)
            add_cast_hooks(layer, torch.bfloat16)
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in wanted)


def int4_kernel_fits(layer: nn.Module, group_size: int) -> bool:
    """Whether torchao's CPU int4 kernel takes this Linear (inputs a multiple of the group, outputs of 16)."""
    return (
        isinstance(layer, nn.Linear) and layer.in_features % group_size == 0 and layer.out_features % 16 == 0
    )


# --- int4 weight-only storage for layers without an int4 kernel (convolutions, odd shapes) -----------------


class PackedInt4(nn.Module):
    """A Linear or Conv whose weight is stored as grouped uint4 (two per byte) and expanded at each call.

    This is about size, not speed: the computation runs in float. Asymmetric min-max per group of
    `group_size` weights along the flattened input dimension; scale and zero point in bfloat16.
    """

    def __init__(self, layer: nn.Module, group_size: int) -> None:
        super().__init__()
        self.kind = "linear" if isinstance(layer, nn.Linear) else f"conv{layer.weight.dim() - 2}d"
        self.shape = list(layer.weight.shape)
        self.group_size = group_size
        self.conv = (
            dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            if self.kind != "linear"
            else {}
        )
        weight = layer.weight.detach().float().reshape(self.shape[0], -1)
        columns = weight.shape[1]
        padded = -(-columns // group_size) * group_size
        weight = F.pad(weight, (0, padded - columns))
        groups = weight.reshape(self.shape[0], -1, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16)
        low = low.to(torch.bfloat16)
        codes = ((groups - low.float()) / scale.float()).round().clamp(0, 15).to(torch.uint8).reshape(-1)
        self.register_buffer("packed", codes[0::2] | (codes[1::2] << 4))
        self.register_buffer("scale", scale.squeeze(-1))
        self.register_buffer("low", low.squeeze(-1))
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def weight(self) -> Tensor:
        """The dequantized float weight (also what `measure.count_parameters` counts)."""
        codes = torch.stack([self.packed & 15, self.packed >> 4], dim=1).reshape(
            self.shape[0], -1, self.group_size
        )
        groups = codes.float() * self.scale.float().unsqueeze(-1) + self.low.float().unsqueeze(-1)
        columns = math.prod(self.shape[1:])
        return groups.reshape(self.shape[0], -1)[:, :columns].reshape(self.shape)

    # Models read their layers' shapes in forward (e.g. the head size from `qkv.out_features`).
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def in_channels(self) -> int:
        return self.shape[1] * self.conv.get("groups", 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, self.weight(), self.bias)
        conv = F.conv1d if self.kind == "conv1d" else F.conv2d
        return conv(x, self.weight(), self.bias, **self.conv)


# --- int8 embedding tables (every int8 method; no library kernel is both small and fast here) ---------------


class Int8Embedding(nn.Module):
    """An `nn.Embedding` table stored as int8 with one float scale per row (symmetric): 4× smaller, and a
    lookup dequantizes only the rows it reads. torchao's IntxWeightOnlyConfig on an embedding dequantizes the
    whole table at each call (250 ms for MiniLM's 30522×384 table here) and torch.ao's quantized Embedding
    keeps a packed object in the file; this is two index lookups and a multiply."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        weight = table.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        self.register_buffer("weight", (weight / scale).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = table.padding_idx

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight).float() * F.embedding(ids, self.scale)

    def dequantize(self) -> Tensor:
        """The float table (what `measure.count_parameters` and exports read)."""
        return self.weight.float() * self.scale


def embedding_tables(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """The plain embedding tables int8 can store: `nn.Embedding` without max_norm, not tied to another
    layer (a language model's output head sharing it stays float), not skipped."""
    return [
        name
        for name in target_layers(model, (nn.Embedding,), skip)
        if model.get_submodule(name).max_norm is None
    ]


def int8_embeddings(model: nn.Module, names: list[str]) -> None:
    """Replace the named embedding tables by Int8Embedding, in place (also at load: the file's int8 rows
    and scales then replace what was computed from the fresh weights)."""
    for name in names:
        replace_module(model, name, Int8Embedding(model.get_submodule(name)))
