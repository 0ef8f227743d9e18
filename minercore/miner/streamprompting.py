"""StreamPrompting, the text-prompting subnet's synapse, on the wire as an unmodified bittensor-10 Dendrite
speaks it: the request's ``roles``/``messages`` fields, the ``bt_header_*`` synapse headers the dendrite takes its
status from, and the answer as raw UTF-8 in chunks of whole characters (``TextStream``)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ..contract.generation import (
    FINISH_CANCELLED,
    FINISH_DEADLINE,
    GenerationError,
    GenerationRequest,
    InvalidRequest,
    Piece,
    check_messages,
)
from ..contract.observe import RequestTimer, disconnected, next_piece
from ..serve.metrics import Metrics
from .admission import Refusal
from .auth import DendriteCaller
from .config import ServerSettings

log = logging.getLogger(__name__)

STREAMPROMPTING = "StreamPrompting"
_MAX_MESSAGE_CHARS = 300  # of a refusal's message in a response header


def v10_headers(settings: ServerSettings, request: Request, caller: DendriteCaller | None, status: int,
                message: str) -> dict[str, str]:
    """The synapse headers a v10 dendrite merges into its synapse: it takes its status from the axon's."""
    headers = {
        "name": STREAMPROMPTING,
        "timeout": request.headers.get("timeout", "12.0") if caller is None else str(caller.timeout),
        "total_size": "0",
        "header_size": "0",
        "bt_header_axon_status_code": str(status),
        "bt_header_axon_status_message": header_text(message),
        "bt_header_axon_hotkey": settings.hotkey,
        "bt_header_axon_ip": settings.external_ip,
        "bt_header_axon_port": str(settings.external_port),
        "bt_header_axon_version": str(settings.version),
    }
    if caller is not None:  # only what was verified goes back
        headers.update({"bt_header_dendrite_hotkey": caller.hotkey, "bt_header_dendrite_uuid": caller.uuid,
                        "bt_header_dendrite_nonce": str(caller.nonce),
                        "bt_header_dendrite_version": str(caller.version)})
        if request.client is not None:
            headers["bt_header_dendrite_ip"] = request.client.host
    return headers


def v10_error(settings: ServerSettings, request: Request, refusal: Refusal) -> Response:
    """A refusal as a v10 dendrite reads it: the status in the synapse headers too."""
    headers = v10_headers(settings, request, None, refusal.status, refusal.message)
    if refusal.status in (429, 503):
        headers["retry-after"] = "1"
    return JSONResponse({"message": refusal.message}, status_code=refusal.status, headers=headers)


class TextStream(Response):
    """One StreamPrompting answer: status and headers once the first piece is known, then the text as it comes.

    Errors before any text get their own status (the dendrite reads it); afterwards the stream either ends
    normally (finished, or cut short by the deadline) or, for a fault, without HTTP's end-of-body marker.
    The caller's disconnect cancels the generation at once.
    """

    def __init__(self, backend: Any, settings: ServerSettings, metrics: Metrics | None,
                 generation: GenerationRequest, timer: RequestTimer, headers: dict[str, str], ends_at: float) -> None:
        # No body to render: Response.__init__ would declare "content-length: 0" for it.
        self.status_code = 200
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers(headers)
        self.v10_headers = headers
        self.ends_at = ends_at  # time.monotonic() at which the answer ends, whatever the backend is doing
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.generation = generation
        self.timer = timer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pieces = self.backend.generate(self.generation)
        stream = asyncio.ensure_future(self._stream(pieces, send))
        watch = asyncio.ensure_future(disconnected(receive))
        try:
            await asyncio.wait((stream, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            stream.cancel()
            await asyncio.wait((stream, watch))
            await pieces.aclose()  # frees the engine slot of a stream that ended early
            if stream.cancelled() and self.timer.outcome is None:
                self.timer.outcome = "disconnected"
                log.info(f"{self.generation.request_id}: the caller disconnected; generation cancelled")
            self.timer.report(self.metrics)

    async def _stream(self, pieces: AsyncIterator[Piece], send: Send) -> None:
        timer = self.timer
        request_id = self.generation.request_id
        try:
            piece = await next_piece(pieces, self.ends_at)
        except GenerationError as exc:  # nothing was accepted: the caller gets the reason with its own status
            timer.outcome = exc.outcome
            if exc.http_status >= 500:  # the miner's problem (overload, a failed backend), not the caller's
                log.warning(f"{request_id}: {exc.outcome} before any text: {exc}")
            await self._refuse(send, exc.http_status, str(exc))
            return
        if not piece.text and piece.finish_reason == FINISH_CANCELLED:  # shut down before it began
            timer.ended(piece)
            await self._refuse(send, 503, "miner is shutting down")
            return
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        suffix = self.settings.chunk_suffix
        sent = 0
        try:
            while True:
                if piece.text:
                    await send({"type": "http.response.body", "body": (piece.text + suffix).encode(),
                                "more_body": True})
                    sent += len(piece.text)
                    timer.text_sent()
                if piece.finish_reason is not None:
                    break
                piece = await next_piece(pieces, self.ends_at)
        except GenerationError as exc:
            timer.outcome = exc.outcome
            log.error(f"{request_id}: generation failed after {sent} characters were streamed; cutting the "
                      f"connection so that the caller sees an incomplete answer: {exc}")
            return  # no end-of-body marker: the server closes the connection
        timer.ended(piece)
        if piece.finish_reason == FINISH_CANCELLED:
            log.warning(f"{request_id}: cancelled at shutdown after {sent} characters; cutting the connection so "
                        "that the caller sees an incomplete answer")
            return
        if piece.finish_reason == FINISH_DEADLINE:
            log.info(f"{request_id}: ended at the deadline after {sent} characters, "
                     f"{self.settings.deadline_margin:g}s before the caller's timeout")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _refuse(self, send: Send, status: int, message: str) -> None:
        headers = {**self.v10_headers, "bt_header_axon_status_code": str(status),
                   "bt_header_axon_status_message": header_text(message)}
        if status == 503:
            headers["retry-after"] = "1"
        body = json.dumps({"message": message}).encode()
        raw = [(key.encode("latin-1"), value.encode("latin-1")) for key, value in headers.items()]
        await send({"type": "http.response.start", "status": status,
                    "headers": [*raw, (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise Refusal(400, "the request body is not a JSON document", "invalid") from None
    if not isinstance(document, dict):
        raise Refusal(400, "the request body must be a JSON object of StreamPrompting's fields", "invalid")
    return document


def conversation_of(roles: Any, messages: Any, max_chars: int) -> list[dict[str, str]]:
    """StreamPrompting's parallel ``roles`` and ``messages`` as the contract's conversation, checked."""
    if not isinstance(messages, list) or not all(isinstance(text, str) for text in messages):
        raise Refusal(400, "messages must be a list of strings", "invalid")
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise Refusal(400, "roles must be a list of strings", "invalid")
    if len(roles) != len(messages):
        raise Refusal(400, f"roles has {len(roles)} entries and messages has {len(messages)}: give exactly one "
                           "role per message", "invalid")
    try:
        return check_messages([{"role": role, "content": text} for role, text in zip(roles, messages, strict=True)],
                              max_chars)
    except InvalidRequest as exc:
        raise Refusal(400, str(exc), "invalid") from None


def header_text(text: str) -> str:
    """A header-safe rendering of a message (latin-1 without control characters, bounded)."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text[:_MAX_MESSAGE_CHARS])

