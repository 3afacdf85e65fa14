"""Shared fixtures: small seeded data and models, so every test file stays fast."""

from __future__ import annotations

import os

import pytest
import torch

from keiryo.data import DataSplits, load_data

# A local Ray started by the tests listens on 127.0.0.1 only (Ray reads this when it is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


# pytest-xdist runs test files in parallel worker processes (README: `python -m pytest` takes `-n` from
# pyproject's addopts): the machine's cores are shared among them, so no worker oversubscribes them
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 2) // WORKERS))


@pytest.fixture(autouse=True)
def _threads():
    """Tests run with up to two threads (the machine's cores shared among test workers) and a fixed seed,
    whatever ran before."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits() -> DataSplits:
    return load_data("digits", seed=0)
