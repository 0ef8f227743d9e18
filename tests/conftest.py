"""Fixtures shared by the test modules (plain helpers live in helpers.py)."""

import pytest
from helpers import LogRecorder

from minercore.miner import neuron


@pytest.fixture
def logs(monkeypatch) -> LogRecorder:
    """What the miner logs, by level (``logs.at("error")``), instead of bittensor's logger."""
    recorder = LogRecorder()
    monkeypatch.setattr(neuron, "log", recorder)
    return recorder
