"""One verb for compressing a causal LM, as torchao's `quantize_(model, config)`: `compress(model, config,
calibration)`, with one small config per method and its handler in the dict below.

- `WeightQuant` (int8 / int4 weight-only, round-to-nearest or GPTQ) — `quant.py`;
- `SmoothQuant` (int8 weights and activations, smoothed or not) — `smooth.py`;
- `Sparsify` (50% unstructured or 2:4, by magnitude or Wanda) — `sparsity.py`;
- `Structured` (heads by key/value group, FFN width, whole blocks; activation-ranked; the layers reading
  pruned heads/neurons optionally refit by least squares; the changed blocks optionally retrained,
  `Reconstruct`) — `prune.py`, `reconstruct.py`.

A config's `statistic` says what calibration it needs (GPTQ's Hessians, Wanda's norms, SmoothQuant's ranges);
methods that need none run without calibration text.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from keiryo.errors import ConfigError, check_choice
from keiryo.lm.calibrate import Progress, linearize
from keiryo.lm.gguf_export import BLOCK
from keiryo.lm.prune import Structured, input_widths, structured_prune
from keiryo.lm.quant import WeightQuant, quantize_weights
from keiryo.lm.reconstruct import Reconstruct
from keiryo.lm.smooth import SmoothQuant, smooth_quantize
from keiryo.lm.sparsity import Sparsify, prune_weights

Config = WeightQuant | Sparsify | SmoothQuant | Structured
HANDLERS = {
    WeightQuant: quantize_weights,
    Sparsify: prune_weights,
    SmoothQuant: smooth_quantize,
    Structured: structured_prune,
}
NAMES = {  # the method names a command line or a recipe uses, as configs with their defaults
    "int8": WeightQuant("int8"),
    "int4": WeightQuant("int4"),
    "gptq": WeightQuant("int4", "gptq"),
    "magnitude": Sparsify("magnitude"),
    "wanda": Sparsify("wanda"),
    "magnitude-2:4": Sparsify("magnitude", "2:4"),
    "wanda-2:4": Sparsify("wanda", "2:4"),
    "smoothquant": SmoothQuant(),
    "w8a8": SmoothQuant(alpha=None),
    "structured": Structured(heads=1 / 3, ffn=0.25, layers=4),
    "depth": Structured(layers=0.25, reconstruct=Reconstruct()),
    # half the feed-forward neurons, shared out between blocks by what each block's narrowing costs the
    # model's loss (in multiples of 64: whole int4 groups and GGUF blocks), refit, then every block retrained
    # in runs of 6, 2 windows a step (BENCHMARKS.md: the same half kept uniformly lost 2.9 points more
    # perplexity; 45% uniformly was slower and at the +15% bound)
    "width": Structured(
        ffn=0.5,
        ffn_multiple=64,
        refit=True,
        ffn_widths="measured",
        reconstruct=Reconstruct(around=6, lr=5e-4, batch_size=2),
    ),
}
# (windows, tokens each) a method learns from, where not (16, 512): reconstruction wants many tokens
CALIBRATION = {"depth": (768, 256), "width": (512, 256)}
DEFAULT_CALIBRATION = (16, 512)
RETRAIN_PRECISIONS = ("fp32", "bf16")  # fp16 would need a gradient scaler, which reconstruction does not use


def config_of(method: Config | str) -> Config:
    """A config from a config or a method name (see `NAMES`)."""
    if isinstance(method, str):
        check_choice(method, tuple(NAMES), "language-model compression")
        return NAMES[method]
    if type(method) not in HANDLERS:
        raise ConfigError(f"not a language-model compression config: {type(method).__name__}")
    return method


def chain_of(method: str, layers: float | None = None, precision: str = "fp32") -> list[tuple[str, Config]]:
    """The methods of a chain (names joined by '+': structured ones first, then at most one other, as
    `width+int8`), each with its config; `layers` (blocks removed: a count, or a share in (0, 1)) and the
    retraining's `precision` applied to the structured ones that take them. What `keiryo lm compress
    --method` and a recipe's lm-compress step accept."""
    check_choice(precision, RETRAIN_PRECISIONS, "retraining precision")
    if not isinstance(method, str) or not method:
        raise ConfigError(f"method is a name such as width or width+int8, got {method!r}")
    steps = [(name, config_of(name)) for name in method.split("+")]
    if any(not isinstance(config, Structured) for _, config in steps[:-1]):
        raise ConfigError(f"method {method}: only structured, depth or width can come before another method")
    if layers is not None and not any(isinstance(config, Structured) for _, config in steps):
        raise ConfigError(f"layers is for methods structured, depth or width, not {method}")
    retrained = [n for n, c in steps if isinstance(c, Structured) and c.reconstruct is not None]
    if precision != "fp32" and not retrained:
        raise ConfigError(f"precision is for methods depth or width (their retraining), not {method}")
    return [(name, _adjust(config, layers, precision)) for name, config in steps]


def _adjust(config: Config, layers: float | None, precision: str) -> Config:
    """A structured config with `layers` (a whole number as a count; nan and inf refused by `Structured`)
    and its retraining's `precision`; any other config as it is."""
    if not isinstance(config, Structured):
        return config
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, (int, float)):
            raise ConfigError(f"layers is a count of blocks or a share of them, got {layers!r}")
        config = replace(config, layers=int(layers) if float(layers).is_integer() else float(layers))
    if config.reconstruct is not None:
        config = replace(config, reconstruct=replace(config.reconstruct, precision=precision))
    return config


def calibration_shape(name: str, windows: int | None = None, length: int | None = None) -> tuple[int, int]:
    """The calibration (windows, tokens each) method `name` draws: `windows`/`length`, else its default."""
    count, size = CALIBRATION.get(name, DEFAULT_CALIBRATION)
    return windows or count, length or size


def check_chain(model: nn.Module, methods: list[Config | str], gguf: bool = False) -> None:
    """Refuse, in one line and before any work, a chain (structured steps, then one method) whose last
    method cannot take the widths the pruning leaves: int4 groups that do not divide a layer's inputs, or,
    when the result goes to GGUF (`gguf`), int8 rows that are not whole Q8_0 blocks of 32. (GPT-2's Conv1D
    layers are linearized first, as `compress` does.)"""
    configs = [config_of(method) for method in methods]
    last = configs[-1]
    linearize(model)
    widths = sorted(input_widths(model, [c for c in configs if isinstance(c, Structured)]))
    pruned = " once pruned" if len(configs) > 1 else ""
    if isinstance(last, WeightQuant) and last.method == "int4":
        if bad := [w for w in widths if w % last.group_size]:
            raise ConfigError(
                f"int4 groups of {last.group_size} must divide every layer's inputs, but layers{pruned} "
                f"would have {bad[0]}: choose a share that leaves a multiple of {last.group_size}"
            )
    int8 = isinstance(last, SmoothQuant) or (isinstance(last, WeightQuant) and last.method == "int8")
    if gguf and int8 and (bad := [w for w in widths if w % BLOCK]):
        raise ConfigError(
            f"GGUF stores int8 rows in blocks of {BLOCK} values, but layers{pruned} would have "
            f"{bad[0]} inputs: save a keiryo LM file (.pt) instead, or prune to a multiple of {BLOCK}"
        )


@torch.no_grad()
def compress(
    model: nn.Module, method: Config | str, calibration: Tensor | None = None, *, progress: Progress = None
) -> nn.Module:
    """Compress a causal LM in place by `method` (a config or its name); `calibration`: token ids, (count,
    length), for the methods that learn from text. `progress(1)` is called once per decoder block."""
    config = config_of(method)
    if config.statistic is not None and calibration is None:
        raise ConfigError(
            f"{type(config).__name__} as configured needs calibration text: pass calibration= "
            "(token ids, (count, length))"
        )
    linearize(model)
    HANDLERS[type(config)](model, config, calibration, progress)
    return model
