"""int8 weights and int8 activations (W8A8) for a causal LM, with SmoothQuant's smoothing (Xiao et al. 2023).

Activations of LLMs have a few input channels whose values are 10-100× the others; one int8 scale per
tensor then rounds every other channel to a handful of levels. SmoothQuant moves that range into the weights,
exactly: for a Linear fed by a normalisation (or by another Linear), divide input channel j by

    s_j = max|X_j|^α / max|W_:,j|^(1-α)

in the producer (the norm's weight, or the producing Linear's output row j) and multiply column j of every
consuming Linear's weight by s_j. The model computes the same function in float; its activations are flatter
and its weights a little less so. α = 0.5 is the paper's default for most models.

Where it is applied (the producer → consumers pairs keiryo knows; other layers are quantized unsmoothed):
Llama / Qwen2 / Mistral-style blocks: input_layernorm → q, k, v; post_attention_layernorm → gate, up;
up → down (the SwiGLU product is linear in up's output). GPT-2: ln_1 → c_attn; ln_2 → c_fc.
The output head stays int8 weight-only, as in the weight-only methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from keiryo.errors import ConfigError
from keiryo.lm.calibrate import Progress, block_linears, check_batch_size, each_block
from keiryo.lm.kernels import W8A8Linear
from keiryo.lm.quant import int8_rtn, quantize_head

# producer → consumers inside one decoder block, by attribute path
PAIRS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
    ("ln_1", ("attn.c_attn",)),
    ("ln_2", ("mlp.c_fc",)),
)


@dataclass(frozen=True)
class SmoothQuant:
    """W8A8 for a causal LM: `alpha` is SmoothQuant's migration strength in [0, 1] (None: no smoothing, plain
    W8A8 — no calibration needed), `per_token` activation scales (else one per call, as torch.ao's dynamic
    quantization), `batch_size` that of the calibration windows."""

    alpha: float | None = 0.5
    per_token: bool = True
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.alpha is not None and (isinstance(self.alpha, bool) or not 0.0 <= self.alpha <= 1.0):
            raise ConfigError(
                f"SmoothQuant's alpha must be in [0, 1] (or None: no smoothing), got {self.alpha!r}"
            )
        if not isinstance(self.per_token, bool):
            raise ConfigError(f"per_token must be true or false, got {self.per_token!r}")
        check_batch_size(self.batch_size)

    @property
    def statistic(self) -> str | None:
        """What calibration measures (each Linear input's largest |x| per channel); None: no smoothing."""
        return None if self.alpha is None else "absmax"


def smooth_quantize(
    model: nn.Module, config: SmoothQuant, calibration: Tensor | None, progress: Progress
) -> None:
    """`keiryo.lm.compress`'s handler for `SmoothQuant`: smooth each block on the calibration windows' ranges,
    then its Linears → `W8A8Linear`; the head → int8 weight-only."""

    def step(index: int, block: nn.Module, ranges: dict[str, Tensor] | None) -> None:
        if ranges is not None:
            smooth_block(block, ranges, config.alpha)
        for name, linear in block_linears(block).items():
            layer = W8A8Linear(*int8_rtn(linear.weight.float()), linear.bias, per_token=config.per_token)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, layer)

    each_block(model, calibration, step, config, progress)
    quantize_head(model)


@torch.no_grad()
def smooth_block(block: nn.Module, ranges: dict[str, Tensor], alpha: float) -> int:
    """Apply SmoothQuant's scales to every known producer → consumers pair of `block` (`ranges`: each
    Linear's largest |input| per channel). Returns how many pairs were smoothed."""
    smoothed = 0
    for producer_name, consumer_names in PAIRS:
        producer = _find(block, producer_name)
        consumers = [_find(block, name) for name in consumer_names]
        if producer is None or any(c is None for c in consumers) or consumer_names[0] not in ranges:
            continue
        weight_range = torch.stack([c.weight.abs().amax(0) for c in consumers]).amax(0).float()
        act_range = ranges[consumer_names[0]].float()
        scales = (act_range.clamp(min=1e-5) ** alpha / weight_range.clamp(min=1e-5) ** (1 - alpha)).clamp(
            min=1e-5
        )
        _divide_outputs(producer, scales)
        for consumer in consumers:
            consumer.weight.mul_(scales.to(consumer.weight.dtype).unsqueeze(0))
        smoothed += 1
    return smoothed


def _find(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _divide_outputs(producer: nn.Module, scales: Tensor) -> None:
    """Scale the producer's output channel j by 1/s_j: a norm's weight (and bias), or a Linear's row j."""
    if isinstance(producer, nn.Linear):
        producer.weight.div_(scales.to(producer.weight.dtype).unsqueeze(1))
    elif getattr(producer, "weight", None) is not None and producer.weight.shape == scales.shape:
        producer.weight.div_(scales.to(producer.weight.dtype))
    else:
        raise ConfigError(f"cannot smooth into {type(producer).__name__}: it has no per-channel weight")
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(scales.to(producer.bias.dtype))
