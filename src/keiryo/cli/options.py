"""Options shared by the commands, and the parsing of option values the API takes in another form.

A bad value is a one-line ConfigError naming the option, raised before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from keiryo.errors import ConfigError, one_line
from keiryo.loop import TrainConfig

MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64-bit seeds
MAX_BATCH = 2**31 - 1
DataOpt = Annotated[
    str, typer.Option("--data", "-d", help="'digits' (built in), or a .npz/.pt/.csv file or an image folder.")
]
SeedOpt = Annotated[
    int, typer.Option(min=0, max=MAX_SEED, help="Seed for the split, the initial weights and the shuffle.")
]
ThreadsOpt = Annotated[int | None, typer.Option(min=1, help="Intra-op threads for the timing.")]
TrustCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code", help="Allow model files and specs that import your code (pkg.mod:fn, file.py:fn)."
    ),
]
ModelOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Where to write the model file.")]
RunsOpt = Annotated[int, typer.Option(min=1, help="Timed runs per batch size in the table.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps.")]
PrecisionOpt = Annotated[str, typer.Option(help="fp32 | bf16 | fp16 (autocast).")]
LrOpt = Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")]
ProgressOpt = Annotated[bool, typer.Option(help="Show the progress bar.")]
WorkersOpt = Annotated[
    int, typer.Option(min=1, help="Local worker processes (under torchrun: its WORLD_SIZE decides).")
]
PatienceOpt = Annotated[
    int,
    typer.Option(
        min=0,
        help="Stop after N epochs without a better validation accuracy, keeping the best epoch's weights "
        "(0: run every epoch, keep the last).",
    ),
]


def training(
    epochs: int | None, patience: int, lr: float, device: str, precision: str, **more: Any
) -> TrainConfig:
    """The TrainConfig of the training options train and distill share (--patience 0: never stop early),
    checked now, before any work; `more` are other TrainConfig fields."""
    return TrainConfig(
        epochs=epochs, patience=patience or None, lr=lr, device=device, precision=precision, **more
    )


def parse_kwargs(pairs: list[str] | None) -> dict:
    """['width=64', 'hidden=[128,64]'] -> {'width': 64, 'hidden': [128, 64]} (values read as YAML)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"model argument '{pair}' must look like name=value")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or one_line(exc)
            raise ConfigError(
                f"model argument '{pair}': the value is not valid YAML ({problem}); e.g. hidden=[128,64]"
            ) from None
    return out


def parse_pair(text: str, option: str) -> tuple[str, str]:
    """'student_layer=teacher_layer' -> the two names."""
    left, sep, right = text.partition("=")
    if not sep or not left.strip() or not right.strip():
        raise ConfigError(f"{option} '{text}' must look like student_layer=teacher_layer")
    return left.strip(), right.strip()


def int_list(text: str, option: str) -> list[int]:
    """'1,64' -> [1, 64]: positive batch sizes."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option} must be positive integers, got '{text}'")
    if max(values) > MAX_BATCH:
        raise ConfigError(f"{option} must be at most {MAX_BATCH}, got '{text}'")
    return values


def float_list(text: str, option: str) -> tuple[float, ...]:
    """'0.25,0.5' -> (0.25, 0.5)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated numbers, got '{text}'") from None
