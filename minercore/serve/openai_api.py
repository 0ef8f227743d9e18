"""The OpenAI completions wire protocol over a ``Backend``: request parsing, generation, streaming (server-sent
events or one JSON) and metrics, shared by both front ends that speak it: ``minercore serve`` (``server.py``) and
the miner's server (``miner/app.py``, after its own authentication).

One choice per request (``n`` = 1). Finish reasons map to OpenAI's: eos and stop become "stop"; length, deadline
(the request's time budget ran out) and cancelled (the server shut down mid-stream) become "length", since each
means the text was cut short. A per-request time budget in seconds may be given in the ``X-Minercore-Timeout``
header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..backends import Backend
from ..contract.generation import (
    EngineClosed,
    EngineOverloaded,
    GenerationError,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    Piece,
    SamplingParams,
)
from ..contract.observe import RequestTimer, disconnected, next_piece

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-minercore-timeout"
CALLER_CLASS = "http"
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "deadline": "length", "cancelled": "length"}
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
_CHAT_DEFAULT_MAX_TOKENS = 1 << 30  # chat has no small default: the backend clamps it to its ceiling and context
_UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias")
_PENALTIES = ("presence_penalty", "frequency_penalty")

T = TypeVar("T")


class ApiError(Exception):
    """Becomes ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        # Overload and shutdown are transient: tell clients (the openai client honours it) when to retry.
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.payload(), status_code=self.status, headers=headers)


class _ClientGone(Exception):
    pass


# OpenAI's error type and code for each failure. The status is the contract's, except that an overload answers
# 429, which OpenAI clients retry (after Retry-After), where the miner answers the contract's 503.
_ERROR_KINDS: dict[type[GenerationError], tuple[str, str]] = {
    InvalidRequest: ("invalid_request_error", "invalid_request"),
    EngineOverloaded: ("overloaded_error", "engine_overloaded"),
    EngineClosed: ("service_unavailable_error", "engine_closed"),
}
_OVERLOADED_STATUS = 429


def _backend_error(exc: GenerationError) -> ApiError:
    """The API error for a backend exception (its outcome label for the metrics is ``exc.outcome``)."""
    type_, code = _ERROR_KINDS.get(type(exc), ("server_error", "generation_failed"))
    status = _OVERLOADED_STATUS if isinstance(exc, EngineOverloaded) else exc.http_status
    return ApiError(status, str(exc), type_, code=code)


def _bad(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param, code="invalid_value")


# ---- request parsing ------------------------------------------------------------------------------------
def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"{name} must be a number", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer", name)
    return value


def _sampling(body: dict[str, Any], default_max_tokens: int) -> SamplingParams:
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, 0, "", [], {}):
            raise _bad(f"{name} is not supported by this server", name)
    for name in _PENALTIES:
        if _number(body, name, 0.0) != 0.0:
            raise _bad(f"{name} is not supported by this server (only 0)", name)
    if _integer(body, "n", 1) != 1 or _integer(body, "best_of", 1) != 1:
        raise _bad("only one choice per request is supported (n = best_of = 1)", "n")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, max_name, default_max_tokens)
    if max_tokens < 1:
        raise _bad(f"{max_name} must be at least 1", max_name)
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise _bad("temperature must be >= 0", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise _bad("top_p must be in (0, 1]", "top_p")
    top_k = _integer(body, "top_k", 0)
    if top_k < -1:
        raise _bad("top_k must be >= 0 (0 or -1 disables it)", "top_k")
    seed = _integer(body, "seed", None)
    if seed is not None and seed < 0:
        raise _bad("seed must be >= 0", "seed")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop must be a non-empty string or a list of them", "stop")
    include_stop = body.get("include_stop_str_in_output", False)
    if not isinstance(include_stop, bool):
        raise _bad("include_stop_str_in_output must be a boolean", "include_stop_str_in_output")
    min_tokens = _integer(body, "min_tokens", 0)
    if not 0 <= min_tokens <= max_tokens:
        raise _bad(f"min_tokens must be in [0, {max_name} = {max_tokens}]", "min_tokens")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos must be a boolean", "ignore_eos")
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=max(0, top_k), top_p=top_p,
                          seed=seed, stop=tuple(stop), include_stop=include_stop, min_tokens=min_tokens,
                          ignore_eos=ignore_eos)


def _prompt(body: dict[str, Any]) -> dict[str, Any]:
    """GenerationRequest fields for a completions prompt: one string, or one list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return {"prompt_ids": prompt}
    raise _bad("prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    flat = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad("each message must be an object with a role", "messages")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad("only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise _bad("message content must be a string or a list of text parts", "messages")
        flat.append({"role": message["role"], "content": content})
    return flat


def header_timeout(request: Request) -> float | None:
    """The request's time budget from ``X-Minercore-Timeout`` (seconds), or None."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise _bad(f"the {TIMEOUT_HEADER} header must be a positive number of seconds", TIMEOUT_HEADER)
    return seconds


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _bad(f"the body is not valid JSON: {exc}", None) from exc
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object", None)
    return body


# ---- client disconnects ---------------------------------------------------------------------------------
async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or ``_ClientGone`` (with ``work`` cancelled) if the client leaves first.

    Needed until the response starts: afterwards Starlette itself watches for the disconnect.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected(request.receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # its cleanup frees the backend's slot
    if task.cancelled():
        raise _ClientGone
    return task.result()


async def _all(pieces: AsyncIterator[Piece], timer: RequestTimer, ends_at: float | None) -> tuple[str, Piece]:
    parts = []
    while True:
        try:
            piece = await next_piece(pieces, ends_at)
        except StopAsyncIteration:
            raise GenerationFailed("the backend ended the stream without a finish reason") from None
        if piece.text:
            timer.text_sent()
        parts.append(piece.text)
        if piece.finish_reason is not None:
            return "".join(parts), piece


class _EventStream(StreamingResponse):
    """Runs ``done`` however the response ends, even when the client's disconnect cancels it before or while
    streaming: the backend request is cancelled now rather than whenever its generator is garbage-collected."""

    def __init__(self, body: AsyncIterator[bytes], done: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._body = body
        self._done = done

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()  # type: ignore[attr-defined]
                await self._done()


def model_list(served_model_name: str, created: int) -> dict[str, Any]:
    """``GET /v1/models``: the one model served."""
    return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": created,
                                        "owned_by": "minercore"}]}


class OpenAIApi:
    """The completions endpoints over ``backend``: request parsing, generation, streaming and metrics. Both
    front ends answer with it: ``create_app`` here, and the miner's server after its own authentication."""

    def __init__(self, backend: Backend, served_model_name: str, *, metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.served_model_name = served_model_name
        self.metrics = metrics

    def parse(self, request: Request, body: dict[str, Any], chat: bool, timeout: float | None,
              priority: float) -> tuple[GenerationRequest, bool, bool]:
        """The backend request, whether to stream, and whether to add a usage chunk."""
        model = body.get("model")
        if model is not None and model != self.served_model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.served_model_name!r}", "invalid_request_error", param="model",
                           code="model_not_found")
        source = {"messages": _messages(body)} if chat else _prompt(body)
        sampling = _sampling(body, _CHAT_DEFAULT_MAX_TOKENS if chat else _COMPLETIONS_DEFAULT_MAX_TOKENS)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("stream must be a boolean", "stream")
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        generation = GenerationRequest(sampling=sampling, timeout=timeout, priority=priority,
                                       request_id=request.headers.get("x-request-id") or uuid.uuid4().hex,
                                       **source)
        return generation, stream, include_usage

    async def handle(self, request: Request, chat: bool, *, body: bytes | None = None,
                     deadline: Callable[[Request], float | None] = header_timeout, caller_class: str = CALLER_CLASS,
                     priority: float = 0.0, arrived: float | None = None) -> Response:
        """Answer one completions request. ``body`` is the raw body when the caller already read it;
        ``deadline`` reads the request's time budget in seconds (by default from ``X-Minercore-Timeout``),
        counted from ``arrived`` (``time.monotonic()`` when the request came in; default: now)."""
        metrics, name = self.metrics, self.served_model_name
        start = time.monotonic() if arrived is None else arrived
        timer = RequestTimer(caller_class, arrived=start, outcome="cancelled")  # until it ends on its own
        try:
            document = _json_object(await request.body() if body is None else body)
            budget = deadline(request)
            # The answer ends at the request's deadline whatever the backend is doing (observe.next_piece); the
            # backend's own timeout counts from now.
            ends_at = None if budget is None else start + budget
            timeout = None if ends_at is None else max(0.0, ends_at - time.monotonic())
            generation, stream, include_usage = self.parse(request, document, chat, timeout, priority)
        except ApiError as exc:
            timer.outcome = InvalidRequest.outcome
            timer.report(metrics)
            return exc.response()
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        pieces = self.backend.generate(generation)
        try:
            if stream:
                first = await _unless_disconnected(request, next_piece(pieces, ends_at))
            else:
                text, last = await _unless_disconnected(request, _all(pieces, timer, ends_at))
        except _ClientGone:
            timer.report(metrics)
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        except GenerationError as exc:
            await pieces.aclose()
            timer.outcome = exc.outcome
            timer.report(metrics)
            return _backend_error(exc).response()
        if not stream:
            await pieces.aclose()
            timer.ended(last)
            timer.report(metrics)
            return JSONResponse(_whole(chat, ident, name, text, last))

        async def done() -> None:
            await pieces.aclose()
            timer.report(metrics)

        return _EventStream(_events(chat, ident, name, pieces, first, include_usage, timer, ends_at), done)


def _usage(piece: Piece) -> dict[str, int]:
    prompt = piece.stats.prompt_tokens if piece.stats is not None else 0
    completion = piece.stats.tokens if piece.stats is not None else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _whole(chat: bool, ident: str, model: str, text: str, last: Piece) -> dict[str, Any]:
    finish = _FINISH.get(last.finish_reason or "", "stop")
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": _usage(last)}


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


async def _events(chat: bool, ident: str, model: str, pieces: AsyncIterator[Piece], first: Piece,
                  include_usage: bool, timer: RequestTimer, ends_at: float | None) -> AsyncIterator[bytes]:
    """The SSE body; ``timer`` records how it ended (the response closes ``pieces`` in every case)."""
    created = int(time.time())
    head: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": model}
    if include_usage:
        head["usage"] = None  # OpenAI's shape: null on every chunk but the last

    def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
        if chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice]})

    piece = first
    role_sent = False
    try:
        while True:
            if piece.text:
                timer.text_sent()
            if piece.finish_reason is None:
                yield chunk(piece.text, None, role=chat and not role_sent)
                role_sent = True
                piece = await next_piece(pieces, ends_at)
                continue
            finish = _FINISH.get(piece.finish_reason, "stop")
            if chat:
                # The text (with the role if nothing came before), then OpenAI's empty closing delta.
                if piece.text or not role_sent:
                    yield chunk(piece.text, None, role=not role_sent)
                yield chunk(None, finish)
            else:
                yield chunk(piece.text, finish)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(piece)})
            timer.ended(piece)
            yield b"data: [DONE]\n\n"
            return
    except GenerationError as exc:
        # Headers are out: the failure becomes an error event, then the stream ends as usual.
        timer.outcome = exc.outcome
        yield _sse(_backend_error(exc).payload())
        yield b"data: [DONE]\n\n"
