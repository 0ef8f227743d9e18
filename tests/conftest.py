"""Fixtures shared by the test modules (plain helpers live in helpers.py)."""

import pytest
from helpers import LogRecorder

from minercore.miner import app, neuron


@pytest.fixture
def logs(monkeypatch) -> LogRecorder:
    """What the miner (its lifecycle and its HTTP server) logs, by level (``logs.at("error")``)."""
    recorder = LogRecorder()
    monkeypatch.setattr(neuron, "log", recorder)
    monkeypatch.setattr(app, "log", recorder)
    return recorder
