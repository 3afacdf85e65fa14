"""`keiryo env`: what a bug report needs."""

from __future__ import annotations

from importlib.metadata import version

from keiryo import devices
from keiryo.cli.outputs import console


def env() -> None:
    """Print what a bug report needs: versions, threads, accelerators."""
    console.print(f"keiryo: {version('keiryo')}")
    for key, value in devices.describe().items():
        console.print(f"{key}: {value}")
