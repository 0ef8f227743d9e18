"""Who may take the miner's time, and how much of it: the checks both routes make before any generation (the
blacklist on the claimed hotkey, the rate limit after the signature, the body's size before it is read), the
caller's deadline, and how a refusal is counted."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from ..serve.metrics import Metrics
from .blacklist import BlacklistPolicy, is_hotkey

log = logging.getLogger(__name__)

ARRIVED = "minercore.arrived"  # the scope key BodyLimit, the app's outermost middleware, stamps arrival under


class Refusal(Exception):
    """A request answered with ``status`` and ``message`` before any generation; ``outcome`` labels it."""

    def __init__(self, status: int, message: str, outcome: str, blacklist_kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.outcome, self.blacklist_kind = status, message, outcome, blacklist_kind


class BodyLimit:
    """ASGI middleware: refuse a body over ``max_body_bytes`` (413) or without a declared length (411) before a
    byte of it is read. (h11 holds the body to its Content-Length.)"""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # The caller's clock started earlier still; from here on every wait the loop makes counts.
            scope[ARRIVED] = time.monotonic()
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = Headers(scope=scope)
            length = headers.get("content-length")
            refusal = None
            if length is None and "transfer-encoding" in headers:
                refusal = 411, "send the request body with a Content-Length header"
            elif length is not None and int(length) > self.max_body_bytes:
                refusal = 413, (f"the request body is {length} bytes; this miner accepts at most "
                                f"{self.max_body_bytes} (--axon.max_body_bytes)")
            if refusal is not None:
                response = JSONResponse({"message": refusal[1]}, status_code=refusal[0],
                                        headers={"connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Admission:
    """The checks shared by the routes, over the blacklist ``policy``; refusals are counted in ``metrics``."""

    def __init__(self, policy: BlacklistPolicy, metrics: Metrics | None, deadline_margin: float) -> None:
        self.policy = policy
        self.metrics = metrics
        self.deadline_margin = deadline_margin

    def admit_unverified(self, hotkey: Any) -> None:
        """The blacklist on the hotkey the caller claims: cheap, and before any signature work. A missing or
        malformed hotkey is left to the authentication, which answers it with 401."""
        if not is_hotkey(hotkey) and not self.policy.closing:
            return
        blacklisted, kind, reason = self.policy.verdict(hotkey)
        if blacklisted:
            status, outcome = (503, "closed") if kind == "shutting_down" else (403, "blacklisted")
            raise Refusal(status, reason, outcome, blacklist_kind=kind)

    def charge(self, hotkey: str) -> None:
        refusal = self.policy.charge(hotkey)  # after the signature: nobody can spend another caller's budget
        if refusal is not None:
            raise Refusal(429, refusal, "rate_limited", blacklist_kind="rate_limit")

    def refused(self, refusal: Refusal, caller_class: str) -> None:
        log.debug(f"refused ({refusal.status}): {refusal.message[:200]}")
        if self.metrics is not None:
            if refusal.blacklist_kind is not None:
                self.metrics.blacklist_rejected(refusal.blacklist_kind)
            self.metrics.observe_request(refusal.outcome, caller_class)

    def budget(self, caller_timeout: float) -> float:
        """Seconds from arrival to the answer's end: ``deadline_margin`` before the caller gives up."""
        return max(0.0, caller_timeout - self.deadline_margin)


def arrival(request: Request) -> float:
    """When the request reached the app (``BodyLimit``'s stamp; now, where the app runs without it)."""
    return request.scope.get(ARRIVED) or time.monotonic()


def client_timeout(raw: str | None, max_timeout: float) -> float:
    """The caller's deadline in seconds. A caller that names none gets ``max_timeout``: accepted work is always
    bounded in time, so an overloaded miner cannot hold a slot for an answer nobody waits for any longer."""
    if raw is None:
        return max_timeout
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= max_timeout:  # also refuses NaN
        raise Refusal(400, f"the X-Client-Timeout header must be a number of seconds in (0, {max_timeout:g}]",
                      "invalid")
    return seconds
