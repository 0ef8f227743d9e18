"""What the front ends (the HTTP server, the miner) learn about a request while they answer it: its timings and
outcome for the metrics (``RequestTimer``), whether the caller is still there (``disconnected``), and whether
its time is up (``next_piece``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

from .generation import FINISH_DEADLINE, Piece


class RequestSink(Protocol):
    """Where a finished request is recorded (``serve.metrics.Metrics``): declared here so the contract needs no
    front end."""

    def observe_request(self, outcome: str, caller_class: str, ttft_s: float | None = None,
                        chunk_gaps: Iterable[float] = (), tokens: int = 0) -> None: ...


class RequestTimer:
    """One request's caller class, time to first text, gaps between later texts, tokens and outcome.

    ``outcome`` starts as given (None: decided at the end) and ends as the stream's finish reason
    (``ended``) or a front end's own label (a failure's ``outcome``, "disconnected", ...).
    """

    __slots__ = ("caller", "arrived", "first_at", "last_at", "gaps", "outcome", "tokens")

    def __init__(self, caller: str, arrived: float | None = None, outcome: str | None = None) -> None:
        self.caller = caller
        self.arrived = time.monotonic() if arrived is None else arrived
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.gaps: list[float] = []
        self.outcome = outcome
        self.tokens = 0

    def text_sent(self) -> None:
        """Text went out to the caller now."""
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        else:
            self.gaps.append(now - self.last_at)
        self.last_at = now

    def ended(self, last: Piece) -> None:
        """The stream ended on its own with ``last``, its final piece."""
        self.outcome = last.finish_reason
        self.tokens = last.stats.tokens if last.stats is not None else 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.arrived

    def report(self, metrics: RequestSink | None) -> None:
        """Record the request (an outcome never decided reads "failed"); nothing without metrics."""
        if metrics is not None:
            metrics.observe_request(self.outcome or "failed", self.caller, ttft_s=self.ttft_s, chunk_gaps=self.gaps,
                                    tokens=self.tokens)


async def disconnected(receive: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
    """Return once the ASGI server reports that the caller has gone (``http.disconnect``); call it after the
    request body was read, since it consumes the messages ``receive`` yields.

    If ``receive`` fails instead, never return: a stream that cannot be watched still runs to its end.
    """
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - losing the watch must not cut a healthy stream
        await asyncio.get_running_loop().create_future()


async def next_piece(pieces: AsyncIterator[Piece], ends_at: float | None) -> Piece:
    """The backend's next piece, or an empty ``deadline`` piece once ``time.monotonic()`` passes ``ends_at``.

    Backends check their deadlines between model steps, which grow long under load (a batch of long prefills);
    a caller's timeout does not wait for them, so a front end holds its answer's deadline itself. The caller
    closes ``pieces`` afterwards, which cancels the request in the backend.
    """
    if ends_at is None:
        return await anext(pieces)
    remaining = ends_at - time.monotonic()
    try:
        if remaining <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(anext(pieces), remaining)
    except asyncio.TimeoutError:
        return Piece("", FINISH_DEADLINE)
