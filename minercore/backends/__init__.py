"""What generates text for the miner and the server: the in-process engine or an upstream OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from ..contract.config import EngineOptions, ModelOptions
from ..contract.generation import EngineStats, GenerationRequest, Piece
from ..engine import Engine

if TYPE_CHECKING:
    from .upstream import ErrorSink


class Backend(Protocol):
    """The interface ``Engine`` and ``UpstreamBackend`` share; callers should need nothing else."""

    warmup_seconds: float
    stream_loop: str

    @property
    def backend_name(self) -> str:
        """What generates the text: native (the compiled core), hf (transformers, eager) or upstream."""
        ...

    @property
    def runner_description(self) -> str: ...

    @property
    def serving(self) -> dict[str, Any]:
        """What is served, for /health and start-up lines: backend, format, architecture, quantization, dtype."""
        ...

    async def start(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Piece]: ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self, grace: float = 5.0) -> None: ...


def build_backend(model: ModelOptions, options: EngineOptions, *, metrics: ErrorSink | None = None) -> Backend:
    """``model.backend`` picks: native (alias simulated) and hf run the engine here; upstream forwards to
    ``model.upstream_url``.

    ``metrics`` (a ``minercore.metrics.Metrics``) receives the upstream's failed calls; the engine ignores it.
    """
    if model.backend == "upstream":
        from .upstream import UpstreamBackend  # aiohttp is only needed here

        return UpstreamBackend(model, options, errors=metrics)
    return Engine(model, options)
