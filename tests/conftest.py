"""Shared fixtures: small seeded data and models, so every test file stays fast."""

from __future__ import annotations

import os

import pytest
import torch

from keiryo.data import DataSplits, load_data

# A local Ray started by the tests listens on 127.0.0.1 only (Ray reads this when it is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(autouse=True)
def _two_threads():
    """Tests run with the machine's two threads and a fixed seed, whatever ran before."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits() -> DataSplits:
    return load_data("digits", seed=0)
