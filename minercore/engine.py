"""The engine: one decode loop for every concurrent stream (continuous batching), off the event loop.

``async for piece in engine.generate(request)`` yields ``Piece`` objects; the last one carries the
finish reason. Errors reach only the request they concern, as the exceptions defined here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_DEADLINE = "deadline"
FINISH_CANCELLED = "cancelled"

_request_ids = itertools.count(1)


class InvalidRequest(ValueError):
    """The request itself is wrong (empty prompt, too long, absurd parameters); nothing was generated."""


class EngineOverloaded(RuntimeError):
    """Every slot is busy and the waiting queue is full; the request was rejected at once."""


class GenerationFailed(RuntimeError):
    """A model step failed (an exception, CUDA out-of-memory); the request ended with this error."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or stopped and accepts no new requests."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_stop: bool = False


@dataclass
class GenerationRequest:
    """Exactly one of ``prompt`` (text), ``prompt_ids`` or ``messages`` ([{"role": ..., "content": ...}])."""

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    timeout: float | None = None  # seconds from submission; past it the stream ends with FINISH_DEADLINE
    priority: float = 0.0  # higher is admitted first when requests wait for a slot
    request_id: str = field(default_factory=lambda: f"req-{next(_request_ids)}")


@dataclass(frozen=True)
class Piece:
    text: str
    finish_reason: str | None = None  # set on the last piece only
