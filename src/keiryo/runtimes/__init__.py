"""Deployment runtimes as keiryo models: ONNX Runtime, OpenVINO (with NNCF int8) and ExecuTorch (XNNPACK)
programs built from a PyTorch model, run through a `Runner` that every keiryo measurement takes like any
model, saved as the runtime's own artifact with a JSON sidecar, and loaded back with `load_runtime`."""

from keiryo.runtimes.build import RUNTIME_CANDIDATES, build, load_runtime, require
from keiryo.runtimes.runner import Runner

__all__ = ["RUNTIME_CANDIDATES", "Runner", "build", "load_runtime", "require"]
