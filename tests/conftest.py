"""Shared fixtures: small seeded data and models, so every test file stays fast."""

from __future__ import annotations

import pytest
import torch

from keiryo.data import DataSplits, load_data


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
