"""Optional heavy dependencies, imported quietly and only when a feature needs them.

torchao's CUDA-only extensions cannot load on a CPU build and say so at length on import; keiryo imports it
here so that noise is silenced in one place.
"""

from __future__ import annotations

import logging
import warnings


def import_torchao() -> None:
    """Import torchao quietly (its CUDA-only extensions cannot load on this build, and it says so at length).

    Importing it also allowlists its quantized tensor classes for `torch.load(weights_only=True)`.
    """
    logging.getLogger("torchao").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao.prototype.quantization.int4  # noqa: F401  (the CPU int4 tensor)
        import torchao.quantization  # noqa: F401
