"""BatchNorm folded into the convolution or Linear layer before it, for any model (no tracing needed).

In eval mode a BatchNorm is an affine map per channel, so `bn(conv(x))` equals one convolution with scaled
weights and a shifted bias (torch's `fuse_conv_bn_eval`): one layer fewer to run, and the int8 methods
quantize the folded layer. Pairs are found by running the model once on example inputs, not by tracing
(`torch.fx.symbolic_trace` fails on transformers' ResNet, whose BatchNorms then stayed): forward hooks
record each Conv/Linear output, and a `TorchFunctionMode` records every torch call that reads it. A pair is
folded when the BatchNorm's input IS the layer's output (the same tensor object), both modules run once, and
nothing outside the BatchNorm reads that output (no residual, no in-place change). The folded copy is then
checked against the original on the same inputs; a fold that changes the outputs is left unfolded.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from keiryo import inputs, provenance
from keiryo.compress.quant_backends import replace_module

FOLDABLE = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
CHECK_TOLERANCE = 1e-3  # relative output change above which a fold is wrong, not rounding (rounding: ~1e-6)
CHECK_SAMPLES = 4  # example inputs the pairs are found and checked on


def fold_batchnorm(model: nn.Module, example_inputs: inputs.Example) -> nn.Module:
    """An eval-mode copy of `model` with every BatchNorm that directly follows a Conv/Linear folded into it
    (the BatchNorm becomes `nn.Identity`); outputs equal the original's in eval mode up to float rounding.
    The folds are recorded on the copy, so `keiryo.save`/`load` rebuild it."""
    pairs = batchnorm_pairs(model, example_inputs)
    folded = copy.deepcopy(model).eval()
    if pairs:
        provenance.record_transform(folded, "fold_batchnorm", pairs=pairs)
        apply_folds(folded, pairs)
    return folded


def batchnorm_pairs(model: nn.Module, example_inputs: inputs.Example) -> list[list[str]]:
    """[layer, batchnorm] names of the BatchNorms that can be folded into the layer before them, checked to
    leave the outputs unchanged on `example_inputs` (eval mode; the model is not changed)."""
    example = inputs.take(inputs.check_example(example_inputs), 0, CHECK_SAMPLES)
    candidates = _candidate_pairs(model, example)
    if not candidates:
        return []
    reference = _outputs(model, example)
    if _close(_folded_outputs(model, candidates, example), reference):
        return candidates
    # Some fold changes the outputs (a read of the layer's output the recording missed): keep the good ones.
    return [pair for pair in candidates if _close(_folded_outputs(model, [pair], example), reference)]


def apply_folds(model: nn.Module, pairs: list[list[str]]) -> None:
    """Replace each [layer, batchnorm] pair by the layer with the BatchNorm folded in, and an Identity (in
    place; also what `keiryo.load` replays on a freshly built model before loading the folded weights)."""
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        if isinstance(layer, nn.Linear):
            fused = fuse_linear_bn_eval(layer.eval(), bn.eval())
        else:
            fused = fuse_conv_bn_eval(
                layer.eval(), bn.eval(), transpose=type(layer).__name__.startswith("ConvT")
            )
        replace_module(model, layer_name, fused)
        replace_module(model, bn_name, nn.Identity())


def replay(model: nn.Module, pairs: list[list[str]]) -> None:
    """Rebuild recorded folds on a freshly built float model (`keiryo.load`; folded weights load after)."""
    apply_folds(model, [list(map(str, pair)) for pair in pairs])


# --- finding the pairs --------------------------------------------------------------------------------------


class _Reads(TorchFunctionMode):
    """Records, for each watched tensor, the modules that were running when a torch call read its values."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.watched: dict[int, Tensor] = {}  # id -> tensor (kept alive so ids stay unique)
        self.readers: dict[int, list[tuple[str, ...]]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.watched and any(isinstance(r, Tensor) for r in tree_leaves(result)):  # metadata reads aside
            for leaf in tree_leaves((args, kwargs or {})):
                if isinstance(leaf, Tensor) and self.watched.get(id(leaf)) is leaf:
                    self.readers[id(leaf)].append(tuple(self.stack))
        return result


def _candidate_pairs(model: nn.Module, example: inputs.Example) -> list[list[str]]:
    """Pairs whose BatchNorm reads the layer's output object and nothing else reads it, from one forward."""
    modules = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (*FOLDABLE, nn.modules.batchnorm._BatchNorm))
    }
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules.values()):
        return []
    stack: list[str] = []
    reads = _Reads(stack)
    produced: dict[int, str] = {}  # id(output) -> layer name
    bn_input: dict[str, int] = {}  # batchnorm name -> id(its input)
    calls: dict[str, int] = defaultdict(int)
    out_dims: dict[str, int] = {}

    def enter(name, module, args):
        stack.append(name)
        calls[name] += 1
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and args and isinstance(args[0], Tensor):
            bn_input[name] = id(args[0])

    def leave(name, module, args, output):
        stack.pop()
        if isinstance(module, FOLDABLE) and isinstance(output, Tensor):
            produced[id(output)] = name
            reads.watched[id(output)] = output
            out_dims[name] = output.dim()

    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: enter(n, m, a)))
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: leave(n, m, a, o)))
    modes = _modes(model)
    model.eval()
    try:
        with torch.no_grad(), reads:
            inputs.call(model, example)
    finally:
        for handle in handles:
            handle.remove()
        _restore(modes)
    pairs = []
    for bn_name, source in bn_input.items():
        layer_name = produced.get(source)
        if layer_name is None or calls[layer_name] != 1 or calls[bn_name] != 1:
            continue
        layer, bn = modules[layer_name], modules[bn_name]
        if not _foldable(layer, bn, out_dims[layer_name]):
            continue
        if all(bn_name in context for context in reads.readers[source]):
            pairs.append([layer_name, bn_name])
    return pairs


def _foldable(layer: nn.Module, bn: nn.Module, out_dim: int) -> bool:
    """Running statistics to fold, channels that match, and a Linear output the BatchNorm normalizes per
    feature (2-D: (batch, features))."""
    if not bn.track_running_stats or bn.running_mean is None:
        return False
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != channels:
        return False
    return out_dim == 2 if isinstance(layer, nn.Linear) else True


# --- checking them ------------------------------------------------------------------------------------------


def _folded_outputs(model: nn.Module, pairs: list[list[str]], example: inputs.Example) -> Tensor:
    folded = copy.deepcopy(model).eval()
    apply_folds(folded, pairs)
    return _outputs(folded, example)


def _outputs(model: nn.Module, example: inputs.Example) -> Tensor:
    modes = _modes(model)
    model.eval()
    try:
        with torch.no_grad():
            return inputs.forward(model, example).float()
    finally:
        _restore(modes)


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Each module's own train/eval flag: `model.train(flag)` would set them all alike (a wrapper in train
    mode around an eval model would put the inner model's BatchNorms in train mode)."""
    return [(m, m.training) for m in model.modules()]


def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def _close(got: Tensor, want: Tensor) -> bool:
    scale = want.abs().max().clamp(min=1e-12)
    return bool(((got - want).abs().max() / scale) <= CHECK_TOLERANCE)
