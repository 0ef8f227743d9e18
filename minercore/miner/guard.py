"""The axon's HTTP-level defences, below bittensor's middleware: body size, body shape, dropped connections and
streams that fail after their status line went out.

* ``RequestGuard`` wraps the axon's ASGI app. Before a byte of the body is read, it refuses bodies over the
  limit (413) or without a length (411), bodies not declared as JSON (415), and headers that do not parse into
  the route's synapse (400); bittensor's middleware would answer the last two with 500 "Internal Server Error".
  It also breaks off the connection of a stream marked as failed, so that the caller's HTTP client reports an
  incomplete body instead of a clean end that would pass for the whole answer.
* ``WatchedStreamingResponse`` is the streaming response the miner returns. bittensor's ``BTStreamingResponse``
  never listens to the connection, and uvicorn (ASGI spec 2.3) silently drops sends after a disconnect, so a
  stream whose caller left would run on until the engine finished it; this one cancels the stream as soon as the
  server reports ``http.disconnect``.
* ``body_checker`` replaces the axon's body-integrity dependency: the same check (the body parses into the
  synapse and matches the signed body hash), but a malformed body gets 400 with the reason instead of 500.
  (FastAPI itself answers bodies that are not JSON, with 422 or 400, before this check runs.)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import bittensor as bt
import pydantic
from bittensor.core.errors import SynapseException, SynapseParsingError
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..observe import disconnected

# Where RequestGuard leaves its per-request state in the ASGI scope, which every layer down to the endpoint
# shares (bittensor's middleware passes the same scope dict on).
_EXCHANGE_KEY = "minercore.exchange"
_MAX_ERRORS_LISTED = 4
_MAX_ERROR_CHARS = 120  # of each error's description: some validators quote the value they refused


class MalformedBody(SynapseException, SynapseParsingError):
    """The request body cannot be the route's synapse. The axon's middleware answers a ``SynapseException`` with
    its message, and a ``SynapseParsingError`` with 400 (a plain ``SynapseParsingError`` would get 500)."""


class StreamBroken(Exception):
    """Raised by a token streamer that cannot finish its answer after the status line (200) went out."""


class _Exchange:
    """One HTTP request as RequestGuard sees it."""

    __slots__ = ("broken",)

    def __init__(self) -> None:
        self.broken = False


class RequestGuard:
    """ASGI middleware: refuse oversized bodies and unparseable headers up front, and cut the connection of
    streams marked broken. ``synapse_types`` maps route names to synapse classes (the axon's
    ``forward_class_types``, read per request)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, synapse_types: Mapping[str, type[bt.Synapse]]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.synapse_types = synapse_types

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _send_error(send, *refusal)
            return
        exchange = _Exchange()
        scope[_EXCHANGE_KEY] = exchange

        async def guarded_send(message: Message) -> None:
            if exchange.broken and message["type"] == "http.response.body" and not message.get("more_body"):
                # Withhold HTTP's end-of-body marker: the app returns with the response incomplete, uvicorn closes
                # the connection, and the caller's client raises instead of taking the text as complete.
                return
            await send(message)

        await self.app(scope, receive, guarded_send)

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is None and "transfer-encoding" in headers:
            # Without a declared length the body's size is only known once read; every dendrite sends one.
            return 411, "send the request body with a Content-Length header"
        # h11 has already checked that a Content-Length is a decimal number, and it holds the body to it.
        if length is not None and int(length) > self.max_body_bytes:
            return 413, (f"the request body is {length} bytes; this miner accepts at most {self.max_body_bytes} "
                         "(--axon.max_body_bytes)")
        name = scope["path"].split("/")[1]  # uvicorn's paths start with "/"
        synapse_type = self.synapse_types.get(name)
        if synapse_type is not None:
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json" and not media_type.endswith("+json"):
                # FastAPI would hand the raw bytes to the synapse's validators, which fail with a TypeError: 500.
                return 415, f"send the request body as application/json, not {media_type or 'without a type'}"
            try:
                synapse_type.from_headers(headers)
            except (pydantic.ValidationError, TypeError, ValueError) as exc:
                return 400, f"the request headers do not fit {name}: {_describe(exc)}"
        return None


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class WatchedStreamingResponse(bt.StreamingSynapse.BTStreamingResponse):
    """``BTStreamingResponse`` that stops streaming when the caller disconnects, and ends a stream whose token
    streamer raised ``StreamBroken`` without the end-of-body marker (through ``RequestGuard``; without the guard
    the body just ends)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.create_task(self._stream(scope, send))
        watch = asyncio.create_task(disconnected(receive))
        try:
            await asyncio.wait((stream, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Cancelling the stream runs the token streamer's cleanup, which hands its engine slot back.
            watch.cancel()
            stream.cancel()
            await asyncio.wait((stream, watch))
        if not stream.cancelled():
            stream.result()  # the stream's own failure (a send that raised), as without the watch

    async def _stream(self, scope: Scope, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), *self.raw_headers]})
        try:
            await self.token_streamer(send)
        except StreamBroken:
            exchange = scope.get(_EXCHANGE_KEY)
            if exchange is not None:
                exchange.broken = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def body_checker(synapse_types: Mapping[str, type[bt.Synapse]]) -> Callable[[Request], Awaitable[dict[str, Any]]]:
    """A replacement for ``bt.Axon.verify_body_integrity`` (set on the axon before ``attach``): the body must
    parse into the route's synapse and match the ``computed_body_hash`` header the caller signed. Any failure is a
    ``MalformedBody``, which the axon answers with 400 and the reason; bittensor's own check lets pydantic
    and JSON errors through, which become 500 "Internal Server Error"."""

    async def verify_body_integrity(request: Request) -> dict[str, Any]:
        name = request.url.path.split("/")[1]
        synapse_type = synapse_types[name]  # the route exists, so the name is known
        try:
            document = await request.json()  # FastAPI parsed it already, and refused what does not parse
        except (ValueError, RecursionError) as exc:
            raise MalformedBody("the request body is not a JSON document") from exc
        if not isinstance(document, dict):
            raise MalformedBody(f"the request body must be a JSON object of {name}'s fields")
        try:
            synapse = synapse_type(**document)
        except (pydantic.ValidationError, TypeError) as exc:
            raise MalformedBody(f"the request body does not fit {name}: {_describe(exc)}") from exc
        if synapse.body_hash != request.headers.get("computed_body_hash", ""):
            raise MalformedBody("the request body does not match the computed_body_hash header its signature "
                                "covers (changed in transit?)")
        return document

    return verify_body_integrity


def _describe(exc: Exception) -> str:
    """Which fields are wrong and how, without echoing their values (they may be long, or private)."""
    if not isinstance(exc, pydantic.ValidationError):
        return type(exc).__name__
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = [f"{'.'.join(str(part) for part in error['loc'])[:64] or 'body'}: {error['msg'][:_MAX_ERROR_CHARS]}"
             for error in errors[:_MAX_ERRORS_LISTED]]
    if len(errors) > _MAX_ERRORS_LISTED:
        parts.append(f"{len(errors) - _MAX_ERRORS_LISTED} more errors")
    return "; ".join(parts)


def prune_nonces(nonces: MutableMapping[str, int], max_age_s: float) -> int:
    """Forget the last nonce of every caller endpoint (hotkey and dendrite uuid) not heard from in ``max_age_s``.

    The axon keeps one entry per endpoint forever, and a caller can make a new endpoint per request. Forgetting is
    safe once ``max_age_s`` covers the oldest nonce bittensor accepts from an endpoint it does not know (4 s plus
    the request's timeout, which ``verify`` bounds): any replay of a forgotten nonce is older than that.
    Returns how many entries were dropped.
    """
    oldest = time.time_ns() - int(max_age_s * 1e9)
    stale = [key for key, nonce in nonces.items() if nonce < oldest]
    for key in stale:
        del nonces[key]
    return len(stale)
