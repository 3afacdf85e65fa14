"""Optional heavy dependencies, imported quietly and only when a feature needs them.

torchao's CUDA-only extensions cannot load on a CPU build and say so at length on import; keiryo imports it
here so that noise is silenced in one place.
"""

from __future__ import annotations

import logging
import warnings


class _TorchaoEnums(logging.Filter):
    """Drops torch's notice that an Enum need not be registered with pytree when the Enum is torchao's (it
    does so on import; the notice is for torchao's authors, not keiryo's users). Other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (args and str(getattr(args[0], "__module__", "")).startswith("torchao"))


def quiet_torchao() -> None:
    """Silence what torchao makes the logs say when it is imported (by keiryo, or by transformers): its
    CUDA-only extensions failing to load on a CPU build, and torch's pytree notices about its Enums."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    pytree = logging.getLogger("torch.utils._pytree")
    if not any(isinstance(f, _TorchaoEnums) for f in pytree.filters):
        pytree.addFilter(_TorchaoEnums())


def import_torchao() -> None:
    """Import torchao quietly (its CUDA-only extensions cannot load on this build, and it says so at length).

    Importing it also allowlists its quantized tensor classes for `torch.load(weights_only=True)`.
    """
    quiet_torchao()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao.prototype.quantization.int4  # noqa: F401  (the CPU int4 tensor)
        import torchao.quantization  # noqa: F401
