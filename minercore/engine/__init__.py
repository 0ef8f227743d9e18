"""The engine: continuous batching over one runner, on a model thread, off the event loop."""

from .loop import Engine

__all__ = ["Engine"]
