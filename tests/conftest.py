"""Fixtures shared by the test modules (plain helpers live in helpers.py)."""

import pytest
from helpers import LogRecorder

from minercore.miner import admission, neuron, streamprompting


@pytest.fixture
def logs(monkeypatch) -> LogRecorder:
    """What the miner (its lifecycle and its HTTP server) logs, by level (``logs.at("error")``)."""
    recorder = LogRecorder()
    monkeypatch.setattr(neuron, "log", recorder)
    monkeypatch.setattr(admission, "log", recorder)
    monkeypatch.setattr(streamprompting, "log", recorder)
    return recorder
