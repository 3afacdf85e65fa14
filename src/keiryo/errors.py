"""Errors a user can cause, and the limits that keep a small malicious file from exhausting memory.

The CLI catches `KeiryoError` once and prints its one-line message with exit status 2. This module imports
nothing from keiryo: every other module may use it.
"""

from __future__ import annotations

import math
import os

from keiryo.units import human_bytes


class KeiryoError(Exception):
    """Base of every error caused by user input; its message is one line that says what to fix."""


class DataError(KeiryoError):
    """A data set could not be read: missing file, wrong format, mismatched shapes, non-finite values."""


class ModelError(KeiryoError):
    """A model could not be built or does not fit the data."""


class ArtifactError(KeiryoError):
    """A model file is missing, corrupt, foreign, or needs code that was not trusted."""


class ConfigError(KeiryoError):
    """An option or recipe value is invalid."""


class TrustError(KeiryoError):
    """A file asks keiryo to import or run code, and the user did not pass --trust-code / trust_code=True."""


class ResourceError(KeiryoError):
    """Reading an input would allocate more memory than `KEIRYO_MAX_BYTES` allows."""


class MissingDependency(KeiryoError):
    """An optional extra a feature needs is not installed; the message names the pip command."""


class TrainingError(KeiryoError):
    """Training cannot go on: the loss became NaN/inf, or a worker failed, hung or was interrupted."""


DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: far above digits/MiniLM/SmolLM2-135M, far below this machine's RAM


def max_bytes() -> int:
    """The most bytes one input (a data array, a recipe, a model's recorded tensors) may unpack to.

    Set `KEIRYO_MAX_BYTES` (a number of bytes, or with a K/M/G suffix) to raise it for bigger inputs.
    """
    raw = os.environ.get("KEIRYO_MAX_BYTES", "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(raw[-1].upper(), 1)
    number = raw[:-1] if scale > 1 else raw
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise ConfigError(f"KEIRYO_MAX_BYTES='{raw}' is not a size (use e.g. 4G or 4294967296)") from None
    if value <= 0:
        raise ConfigError(f"KEIRYO_MAX_BYTES='{raw}' must be positive")
    return value


def check_bytes(nbytes: int, what: str) -> None:
    """Refuse, before allocating, anything that would unpack to more than `max_bytes()`."""
    limit = max_bytes()
    if nbytes > limit:
        raise ResourceError(
            f"{what} would need {human_bytes(nbytes)} of memory, above the limit of {human_bytes(limit)}; "
            "set KEIRYO_MAX_BYTES (e.g. KEIRYO_MAX_BYTES=8G) if you trust it"
        )


def check_whole(name: str, value: object, least: int | None = None) -> None:
    """Refuse anything but a whole number (not a bool) of at least `least` (ConfigError naming `name`)."""
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        bound = f" ≥ {least}" if least is not None else ""
        raise ConfigError(f"{name} must be a whole number{bound}, got {value}")


def is_finite(value: object) -> bool:
    """Whether `value` is a finite int or float (not a bool, not NaN or infinite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(value: object, choices: tuple[str, ...] | list[str], what: str) -> None:
    """Refuse a value that is not one of `choices` (ConfigError "unknown {what} 'x' (choose a, b)"), so every
    config and option says the same thing about a typo."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"unknown {what} {value!r} (choose {', '.join(choices)})")


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception as one short line: a keiryo error's own message, else its type and first line."""
    text = " ".join(str(error).split()) if isinstance(error, KeiryoError) else _first_line(error)
    if not isinstance(error, KeiryoError):
        text = f"{type(error).__name__}: {text}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else ""
