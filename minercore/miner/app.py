"""The miner's HTTP server, on minercore's own ASGI app whichever bittensor SDK is installed.

Routes:

* ``POST /StreamPrompting``: what an unmodified bittensor-10 Dendrite sends. The v10 signature, freshness and
  replay are checked as bt.Axon checks them (``auth.DendriteVerifier``), then the blacklist, the rate limit and
  the priority; the answer is the completion as raw UTF-8 in chunks of whole characters, with the
  ``bt_header_axon_*`` response headers the dendrite reads its status from.
* ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models``: the OpenAI shapes of
  ``minercore serve`` (``openai_api.OpenAIApi``), signed with btauth/1 by a hotkey the blacklist admits, for this
  miner's hotkey.
  ``X-Client-Timeout`` (seconds, ``max_timeout`` when absent) is the caller's deadline.
* ``GET /health``; ``GET /metrics`` (Prometheus) when the miner keeps metrics.

Statuses before an answer starts: 400 malformed request, 401 failed authentication, 403 refused by the blacklist,
411/413 body without a length or too large, 415 not JSON, 429 over the rate limit (and, on the OpenAI routes,
a full queue), 503 shutting down or overloaded (nothing was accepted), 500 the backend failed before any text.
Once a request is accepted its answer is a 200: an answer that cannot finish before the caller's deadline (minus
``deadline_margin``) ends early with the exact text so far and a normal end of stream (outcome ``deadline``). On
StreamPrompting only a fault after the first byte (the model failed, the miner shut down mid-answer) cuts the
connection, so that the caller's HTTP client reports an incomplete answer instead of taking it for a whole one;
the OpenAI routes answer as ``minercore serve`` does (an error event, or finish reason ``length``, then
``[DONE]``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from ..contract.generation import (
    FINISH_CANCELLED,
    FINISH_DEADLINE,
    GenerationError,
    GenerationRequest,
    InvalidRequest,
    Piece,
    SamplingParams,
    check_messages,
)
from ..contract.observe import RequestTimer, disconnected, next_piece
from ..serve.metrics import Metrics
from ..serve.openai_api import OpenAIApi, model_list
from .auth import AuthError, BtAuthVerifier, DendriteCaller, DendriteVerifier
from .blacklist import BlacklistPolicy, is_hotkey
from .config import DEFAULT_DEADLINE_MARGIN_S

log = logging.getLogger("minercore.miner")

STREAMPROMPTING = "StreamPrompting"
CLIENT_TIMEOUT_HEADER = "x-client-timeout"
_MAX_MESSAGE_CHARS = 300  # of a refusal's message in a response header
ARRIVED = "minercore.arrived"  # the scope key BodyLimit, the app's outermost middleware, stamps arrival under


@dataclass(frozen=True)
class ServerSettings:
    """What the app needs from the miner's options."""

    hotkey: str  # this miner's: the receiver of every signed request
    external_ip: str
    external_port: int
    max_body_bytes: int
    max_timeout: float  # largest timeout a StreamPrompting caller may ask for (it widens the nonce window)
    max_prompt_chars: int
    max_new_tokens: int
    deadline_margin: float = DEFAULT_DEADLINE_MARGIN_S
    chunk_suffix: str = ""  # "\n" for --stream.framing newline
    served_model_name: str = "minercore"
    version: int = 10_005_000  # the axon version reported to v10 dendrites


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


class MinerServer:
    """The routes over ``backend``, admitting callers through ``policy`` (whose view the miner refreshes)."""

    def __init__(self, backend: Any, policy: BlacklistPolicy, settings: ServerSettings, *,
                 metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.policy = policy
        self.settings = settings
        self.metrics = metrics
        self.dendrites = DendriteVerifier(settings.hotkey, max_timeout=settings.max_timeout)
        self.btauth = BtAuthVerifier(settings.hotkey)
        self.sampling = SamplingParams(max_new_tokens=settings.max_new_tokens)
        self.openai = OpenAIApi(backend, settings.served_model_name, metrics=metrics)
        self._started = int(time.time())

    def build(self) -> FastAPI:
        app = FastAPI(title="minercore miner", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(BodyLimit, max_body_bytes=self.settings.max_body_bytes)
        app.add_api_route(f"/{STREAMPROMPTING}", self.stream_prompting, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        if self.metrics is not None:
            app.add_api_route("/metrics", self.prometheus, methods=["GET"])
        return app

    # ---- shared admission -------------------------------------------------------------------------------
    def _admit_unverified(self, hotkey: Any) -> None:
        """The blacklist on the hotkey the caller claims: cheap, and before any signature work. A missing or
        malformed hotkey is left to the authentication, which answers it with 401."""
        if not is_hotkey(hotkey) and not self.policy.closing:
            return
        blacklisted, kind, reason = self.policy.verdict(hotkey)
        if blacklisted:
            status, outcome = (503, "closed") if kind == "shutting_down" else (403, "blacklisted")
            raise Refusal(status, reason, outcome, blacklist_kind=kind)

    def _charge(self, hotkey: str) -> None:
        refusal = self.policy.charge(hotkey)  # after the signature: nobody can spend another caller's budget
        if refusal is not None:
            raise Refusal(429, refusal, "rate_limited", blacklist_kind="rate_limit")

    def _refused(self, refusal: Refusal, caller_class: str) -> None:
        log.debug(f"refused ({refusal.status}): {refusal.message[:200]}")
        if self.metrics is not None:
            if refusal.blacklist_kind is not None:
                self.metrics.blacklist_rejected(refusal.blacklist_kind)
            self.metrics.observe_request(refusal.outcome, caller_class)

    def _budget(self, caller_timeout: float) -> float:
        """Seconds from arrival to the answer's end: ``deadline_margin`` before the caller gives up."""
        return max(0.0, caller_timeout - self.settings.deadline_margin)

    # ---- StreamPrompting (bittensor 10 Dendrites) -----------------------------------------------------------
    async def stream_prompting(self, request: Request) -> Response:
        arrived = _arrival(request)
        caller_class = "unverified"
        try:
            headers = request.headers
            self._admit_unverified(headers.get("bt_header_dendrite_hotkey"))
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json" and not media_type.endswith("+json"):
                raise Refusal(415, f"send the request body as application/json, not {media_type or 'no type'}",
                              "invalid")
            document = _json_object(await request.body())
            roles, messages = document.get("roles"), document.get("messages")
            conversation = conversation_of(roles, messages, self.settings.max_prompt_chars)
            try:
                caller = self.dendrites.verify(headers, messages)
            except AuthError as exc:
                raise Refusal(401, f"Not Verified with error: {exc}", "unauthorized",
                              blacklist_kind=exc.kind) from None
            caller_class = self.policy.caller_class(caller.hotkey)
            self._charge(caller.hotkey)
        except Refusal as refusal:
            self._refused(refusal, caller_class)
            return self._v10_error(request, refusal)
        ends_at = arrived + self._budget(caller.timeout)
        generation = GenerationRequest(messages=conversation, sampling=self.sampling,
                                       timeout=max(0.0, ends_at - time.monotonic()),  # the engine's counts from now
                                       priority=self.policy.priority(caller.hotkey))
        timer = RequestTimer(caller_class, arrived=arrived)
        return _TextStream(self, generation, timer, self._v10_headers(request, caller, 200, "Success"), ends_at)

    def _v10_headers(self, request: Request, caller: DendriteCaller | None, status: int, message: str) -> dict:
        """The synapse headers a v10 dendrite merges into its synapse: it takes its status from the axon's."""
        settings = self.settings
        headers = {
            "name": STREAMPROMPTING,
            "timeout": request.headers.get("timeout", "12.0") if caller is None else str(caller.timeout),
            "total_size": "0",
            "header_size": "0",
            "bt_header_axon_status_code": str(status),
            "bt_header_axon_status_message": _header_text(message),
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

    def _v10_error(self, request: Request, refusal: Refusal) -> Response:
        headers = self._v10_headers(request, None, refusal.status, refusal.message)
        if refusal.status in (429, 503):
            headers["retry-after"] = "1"
        return JSONResponse({"message": refusal.message}, status_code=refusal.status, headers=headers)

    # ---- OpenAI shapes (btauth/1) -------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._openai(request, chat=False)

    async def models(self, request: Request) -> Response:
        try:
            await self._btauth_caller(request)
        except Refusal as refusal:
            self._refused(refusal, "unverified")
            return _openai_refusal(refusal)
        return JSONResponse(model_list(self.settings.served_model_name, self._started))

    async def _btauth_caller(self, request: Request) -> tuple[str, bytes]:
        """The verified, admitted and charged hotkey of a btauth/1 request, and its body; Refusal otherwise."""
        self._admit_unverified(request.headers.get("x-bittensor-hotkey"))
        body = await request.body()
        target = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
        if request.scope.get("query_string"):
            target += "?" + request.scope["query_string"].decode("latin-1")
        try:
            hotkey = self.btauth.verify(request.headers, body, method=request.method, target=target)
        except AuthError as exc:
            raise Refusal(401, str(exc), "unauthorized", blacklist_kind=exc.kind) from None
        self._charge(hotkey)
        return hotkey, body

    async def _openai(self, request: Request, chat: bool) -> Response:
        arrived = _arrival(request)
        caller_class = "unverified"
        try:
            hotkey, body = await self._btauth_caller(request)
            caller_class = self.policy.caller_class(hotkey)
            timeout = _client_timeout(request.headers.get(CLIENT_TIMEOUT_HEADER), self.settings.max_timeout)
        except Refusal as refusal:
            self._refused(refusal, caller_class)
            return _openai_refusal(refusal)
        budget = self._budget(timeout)
        return await self.openai.handle(request, chat, body=body, deadline=lambda _: budget,
                                        caller_class=caller_class, priority=self.policy.priority(hotkey),
                                        arrived=arrived)

    # ---- health and metrics -----------------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        backend = self.backend
        return {"status": "closing" if self.policy.closing else "ok", "hotkey": self.settings.hotkey,
                "model": self.settings.served_model_name, "runner": backend.runner_description,
                "serving": backend.serving, "stream_loop": backend.stream_loop,
                "stats": backend.stats().as_dict()}

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _arrival(request: Request) -> float:
    """When the request reached the app (``BodyLimit``'s stamp; now, where the app runs without it)."""
    return request.scope.get(ARRIVED) or time.monotonic()


def _openai_refusal(refusal: Refusal) -> Response:
    headers = {"retry-after": "1"} if refusal.status in (429, 503) else None
    return JSONResponse({"error": {"message": refusal.message, "type": refusal.outcome, "param": None,
                                   "code": refusal.outcome}}, status_code=refusal.status, headers=headers)


class _TextStream(Response):
    """One StreamPrompting answer: status and headers once the first piece is known, then the text as it comes.

    Errors before any text get their own status (the dendrite reads it); afterwards the stream either ends
    normally (finished, or cut short by the deadline) or, for a fault, without HTTP's end-of-body marker.
    The caller's disconnect cancels the generation at once.
    """

    def __init__(self, server: MinerServer, generation: GenerationRequest, timer: RequestTimer,
                 headers: dict[str, str], ends_at: float) -> None:
        # No body to render: Response.__init__ would declare "content-length: 0" for it.
        self.status_code = 200
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers(headers)
        self.v10_headers = headers
        self.ends_at = ends_at  # time.monotonic() at which the answer ends, whatever the backend is doing
        self.server = server
        self.generation = generation
        self.timer = timer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pieces = self.server.backend.generate(self.generation)
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
            self.timer.report(self.server.metrics)

    async def _stream(self, pieces: AsyncIterator[Piece], send: Send) -> None:
        server, timer = self.server, self.timer
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
        suffix = server.settings.chunk_suffix
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
                     f"{server.settings.deadline_margin:g}s before the caller's timeout")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _refuse(self, send: Send, status: int, message: str) -> None:
        headers = {**self.v10_headers, "bt_header_axon_status_code": str(status),
                   "bt_header_axon_status_message": _header_text(message)}
        if status == 503:
            headers["retry-after"] = "1"
        body = json.dumps({"message": message}).encode()
        raw = [(key.encode("latin-1"), value.encode("latin-1")) for key, value in headers.items()]
        await send({"type": "http.response.start", "status": status,
                    "headers": [*raw, (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _json_object(body: bytes) -> dict[str, Any]:
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


def _client_timeout(raw: str | None, max_timeout: float) -> float:
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


def _header_text(text: str) -> str:
    """A header-safe rendering of a message (latin-1 without control characters, bounded)."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text[:_MAX_MESSAGE_CHARS])

