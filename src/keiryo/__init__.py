"""keiryo: faster PyTorch training and lighter models, with the measurements to prove both.

The public API is the names below. They load on first use (PEP 562), so `import keiryo` imports no torch: the
command line installs its Ctrl-C handler before anything heavy runs, and `keiryo --help` starts quickly.
Internal code imports from the submodules (`from keiryo.compress.prune import prune`).
"""

from importlib import import_module
from importlib.metadata import version
from typing import Any

__version__ = version("keiryo")

# public name -> the module that defines it
_API = {
    "KeiryoError": "keiryo.errors",
    "train": "keiryo.training",
    "TrainConfig": "keiryo.loop",
    "Single": "keiryo.parallel.config",
    "DDP": "keiryo.parallel.config",
    "FSDP": "keiryo.parallel.config",
    "Pipeline": "keiryo.parallel.config",
    "Async": "keiryo.parallel.config",
    "quantize": "keiryo.compress.quantize",
    "Fp32": "keiryo.compress.qconfig",
    "Fp16": "keiryo.compress.qconfig",
    "Bf16": "keiryo.compress.qconfig",
    "Int8Dynamic": "keiryo.compress.qconfig",
    "Int8WeightOnly": "keiryo.compress.qconfig",
    "Int4WeightOnly": "keiryo.compress.qconfig",
    "Int8Static": "keiryo.compress.qconfig",
    "QAT": "keiryo.compress.qconfig",
    "Policy": "keiryo.compress.qconfig",
    "prune": "keiryo.compress.prune",
    "Structured": "keiryo.compress.prune_config",
    "Unstructured": "keiryo.compress.prune_config",
    "distill": "keiryo.compress.distill",
    "Distill": "keiryo.compress.distill",
    "measure": "keiryo.measuring",
    "compare": "keiryo.measuring",
    "Timing": "keiryo.metrics",
    "save": "keiryo.artifacts",
    "load": "keiryo.artifacts",
    "run": "keiryo.steps",
    "deploy": "keiryo.deployment",
    "DeployConfig": "keiryo.deployment",
    "load_runtime": "keiryo.runtimes",
    "load_deployed": "keiryo.deploy_files",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first use, and keep the name here."""
    if name not in _API:
        raise AttributeError(f"module 'keiryo' has no attribute '{name}'")
    value = getattr(import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
