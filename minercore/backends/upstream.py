"""The engine interface over any OpenAI-compatible streaming server (vLLM, SGLang, TGI or ``minercore serve``).

``UpstreamBackend`` lets the miner front a model that does not fit this process: each request becomes one
streamed ``/chat/completions`` (messages) or ``/completions`` (prompt or prompt ids) call, and the upstream's
deltas come back as ``Piece`` objects chunked like the engine's own output. Admission (slots plus a bounded
queue), deadlines, cancellation, the request checks and the exceptions are the engine's (``minercore.generation``),
so callers cannot tell the two apart.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ..contract.config import EngineOptions, ModelOptions
from ..contract.generation import (
    FINISH_CANCELLED,
    FINISH_DEADLINE,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineClosed,
    EngineOverloaded,
    EngineStats,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    Piece,
    RequestStats,
    check_messages,
    check_one_source,
    check_prompt_ids,
    check_prompt_text,
    validated_sampling,
)

log = logging.getLogger(__name__)

_RETRY_BACKOFF_S = (0.05, 0.2)  # one sleep per retry: connection failures before any response byte only
_CONNECT_TIMEOUT_S = 5.0
_IDLE_READ_TIMEOUT_S = 300.0  # a silent upstream must not hold a slot forever when the caller set no deadline
_MAX_EVENT_BYTES = 4 << 20  # an SSE line longer than this means a broken upstream, not a big delta
_MAX_ERROR_BODY = 64 << 10
_RATE_WINDOW_S = 10.0


class ErrorSink(Protocol):
    """What the backend reports failed upstream calls to (``minercore.metrics.Metrics`` fits)."""

    def upstream_error(self, kind: str) -> None: ...


class SSEDecoder:
    """Incremental server-sent-events parser: feed raw bytes as they arrive, get each complete event's data.

    Lines are decoded only once complete, so a network read that splits an event or a multi-byte UTF-8
    character is harmless. Only ``data`` fields matter to OpenAI-compatible streams; others are skipped.
    """

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        data = self._tail + chunk
        hold = b""
        if data.endswith(b"\r"):  # maybe half of a CRLF: decide once the next byte is known
            data, hold = data[:-1], b"\r"
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._tail = lines.pop() + hold
        if len(self._tail) > _MAX_EVENT_BYTES:
            raise ValueError(f"an event line exceeds {_MAX_EVENT_BYTES} bytes")
        events: list[str] = []
        for raw in lines:
            if not raw:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            line = raw.decode("utf-8")
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
        return events


class TextCoalescer:
    """The stream loop's chunking policy for text that arrives as deltas: the first text goes out at once,
    then pending text is flushed once ``flush_tokens`` deltas wait or ``flush_ms`` passed since the last flush."""

    def __init__(self, flush_tokens: int, flush_ms: float) -> None:
        self._flush_tokens = max(1, flush_tokens)
        self._flush_s = max(0.0, flush_ms) / 1000.0
        self._parts: list[str] = []
        self._last_flush: float | None = None

    def add(self, text: str) -> None:
        if text:
            self._parts.append(text)

    def due(self, now: float) -> bool:
        if not self._parts:
            return False
        return (self._last_flush is None or len(self._parts) >= self._flush_tokens
                or now - self._last_flush >= self._flush_s)

    def due_in(self, now: float) -> float | None:
        """Seconds until pending text is due by time alone; None when nothing is pending."""
        if not self._parts:
            return None
        if self._last_flush is None:
            return 0.0
        return max(0.0, self._last_flush + self._flush_s - now)

    def take(self, now: float) -> str:
        text = "".join(self._parts)
        self._parts.clear()
        if text:
            self._last_flush = now
        return text


# max_batch 0: streams open to the upstream at once, what one GPU server batches (runtime.device's CUDA default).
UPSTREAM_AUTO_MAX_BATCH = 256


class UpstreamBackend:
    """``Engine``'s interface (start, generate, stats, shutdown, runner_description, warmup_seconds,
    stream_loop) backed by an OpenAI-compatible server at ``model.upstream_url``.

    ``stats().steps`` counts the upstream's deltas; ``stats().tokens`` counts completion tokens as the
    upstream reports them in ``usage`` (one per delta when it does not). Rates are over the last 10 s.
    """

    stream_loop = "upstream"
    backend_name = "upstream"

    def __init__(self, model: ModelOptions, options: EngineOptions | None = None, *,
                 errors: ErrorSink | None = None) -> None:
        if not model.upstream_url:
            raise ValueError("the upstream backend needs upstream_url (e.g. http://gpu-box:8000/v1)")
        self.model_options = model
        self.options = options or EngineOptions()
        if not self.options.max_batch:
            self.options = dataclasses.replace(self.options, max_batch=UPSTREAM_AUTO_MAX_BATCH)
        self._base = _api_base(model.upstream_url)
        self._safe_base = _without_credentials(self._base)
        self._model = model.upstream_model
        self._errors = errors
        self._headers = {"Accept": "text/event-stream"}
        if model.upstream_api_key_env:
            key = os.environ.get(model.upstream_api_key_env)
            if not key:
                raise ValueError(f"environment variable {model.upstream_api_key_env} (the upstream API key) "
                                 "is not set")
            self._headers["Authorization"] = f"Bearer {key}"
        self._session: aiohttp.ClientSession | None = None
        self._model_lock: asyncio.Lock | None = None
        self._active = 0
        self._queued = 0
        self._waiters: list[tuple[float, int, asyncio.Future[bool]]] = []  # heap; True = slot granted
        self._seq = itertools.count()
        self._live: set[aiohttp.ClientResponse] = set()
        self._closing = False
        self._aborting = False
        self._counts: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, deltas, tokens)
        self.warmup_seconds = 0.0

    def __repr__(self) -> str:  # the default would be harmless too, but make sure headers never show up
        return f"UpstreamBackend({self._safe_base!r}, model={self._model!r})"

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the connection pool and, when no model name was given, ask the upstream for it.

        An unreachable upstream is not fatal here: requests fail with ``GenerationFailed`` until it is back.
        """
        if self._session is not None:
            return
        began = time.monotonic()
        connector = aiohttp.TCPConnector(limit=self.options.max_batch)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT_S,
                                          sock_read=_IDLE_READ_TIMEOUT_S))
        self._model_lock = asyncio.Lock()
        try:
            await self._model_name()
        except GenerationFailed as exc:
            log.warning("upstream not ready at start (%s); requests will retry it", exc)
        self.warmup_seconds = time.monotonic() - began
        log.info("upstream backend ready: %s; pool %d connections, queue %d",
                 self.runner_description, self.options.max_batch, self.options.max_queue)

    @property
    def runner_description(self) -> str:
        return f"upstream {self._safe_base} (model {self._model or 'not resolved yet'})"

    @property
    def serving(self) -> dict[str, Any]:
        # The upstream's format, quantization and dtype are its own; the OpenAI API does not report them.
        return {"backend": "upstream", "model": self._model, "format": None, "architecture": None,
                "quantization": None, "dtype": None}

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop admitting; let running and queued requests finish within ``grace`` s, then cancel the rest."""
        self._closing = True
        deadline = time.monotonic() + grace
        while (self._active or self._queued) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._aborting = True
        waiters, self._waiters = self._waiters, []
        for _, _, waiter in waiters:
            if not waiter.done():
                self._queued -= 1
                waiter.set_result(False)
        for response in list(self._live):
            response.close()  # the stream reading it sees the connection drop and ends as cancelled
        # Streams end as soon as their consumers read on; one that never does must not block the shutdown.
        settle = time.monotonic() + 1.0
        while self._active and time.monotonic() < settle:
            await asyncio.sleep(0.005)
        if self._session is not None:
            await self._session.close()

    # ---- stats -----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        now = time.monotonic()
        recent = [entry for entry in list(self._recent) if now - entry[0] <= _RATE_WINDOW_S]
        counts = self._counts
        return EngineStats(active=self._active, queued=self._queued, completed=counts["completed"],
                           failed=counts["failed"], cancelled=counts["cancelled"], rejected=counts["rejected"],
                           steps=counts["steps"], tokens=counts["tokens"],
                           steps_per_s=sum(d for _, d, _ in recent) / _RATE_WINDOW_S,
                           tokens_per_s=sum(t for _, _, t in recent) / _RATE_WINDOW_S)

    def _record(self, deltas: int, tokens: int) -> None:
        now = time.monotonic()
        self._counts["steps"] += deltas
        self._counts["tokens"] += tokens
        self._recent.append((now, deltas, tokens))
        while self._recent and now - self._recent[0][0] > _RATE_WINDOW_S:
            self._recent.popleft()

    # ---- generation ------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        """Stream ``request``'s text from the upstream. Leaving the loop early closes the upstream call."""
        if self._session is None:
            raise EngineClosed("upstream backend is not started")
        if self._closing:
            raise EngineClosed("upstream backend is shutting down")
        path, body = self._prepare(request)
        submitted = time.monotonic()
        deadline = None if request.timeout is None else submitted + max(0.0, float(request.timeout))
        granted = await self._acquire(float(request.priority), deadline)
        if granted is not True:
            self._counts["completed" if granted == FINISH_DEADLINE else "cancelled"] += 1
            yield Piece("", granted, _request_stats(request.request_id, 0, 0, None, submitted, granted))
            return
        outcome = "cancelled"  # unless the stream ends or fails on its own
        try:
            async for piece in self._stream(request.request_id, path, body, submitted, deadline):
                if piece.finish_reason is not None:
                    outcome = "cancelled" if piece.finish_reason == FINISH_CANCELLED else "completed"
                yield piece
        except EngineOverloaded:
            outcome = "rejected"
            raise
        except (GenerationFailed, InvalidRequest):
            outcome = "failed"
            raise
        finally:
            self._counts[outcome] += 1
            self._release()

    def _prepare(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        # The contract's checks, the engine's too: a request valid for one backend is valid for the other.
        sampling = validated_sampling(request.sampling, self.options.max_new_tokens)
        check_one_source(request)
        body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True},
                                "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                                "top_p": sampling.top_p}
        if sampling.top_k:
            body["top_k"] = sampling.top_k
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.include_stop:
            body["include_stop_str_in_output"] = True  # vLLM's name for it; minercore serve reads it too
        if sampling.min_tokens:
            body["min_tokens"] = sampling.min_tokens  # vLLM's and SGLang's extension, as minercore serve reads it
        if sampling.ignore_eos:
            body["ignore_eos"] = True
        if request.messages is not None:
            body["messages"] = check_messages(request.messages, self.options.max_prompt_chars)
            return "/chat/completions", body
        if request.prompt_ids is not None:
            body["prompt"] = check_prompt_ids(request.prompt_ids)
            return "/completions", body
        body["prompt"] = check_prompt_text(request.prompt, self.options.max_prompt_chars)
        return "/completions", body

    async def _acquire(self, priority: float, deadline: float | None) -> bool | str:
        """True once a slot is held; FINISH_DEADLINE or FINISH_CANCELLED when the request never got one."""
        if self._active + self._queued >= self.options.max_batch + self.options.max_queue:
            self._counts["rejected"] += 1
            raise EngineOverloaded(f"all {self.options.max_batch} upstream slots are busy and "
                                   f"{self.options.max_queue} requests are already waiting")
        if self._active < self.options.max_batch and not self._queued:
            self._active += 1
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._seq), waiter))
        self._queued += 1
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            granted = await asyncio.wait_for(waiter, timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                if waiter.result():
                    self._release()  # the slot was handed over just as the caller gave up: pass it on
            else:
                self._queued -= 1  # still waiting; wait_for cancelled the future, _release skips it
            if isinstance(exc, asyncio.CancelledError):
                raise
            return FINISH_DEADLINE
        return True if granted else FINISH_CANCELLED

    def _release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                self._queued -= 1
                waiter.set_result(True)  # the slot passes straight to the best waiter
                return
        self._active -= 1

    async def _model_name(self) -> str:
        if self._model is not None:
            return self._model
        assert self._model_lock is not None and self._session is not None
        async with self._model_lock:
            if self._model is None:
                try:
                    # Bounded as a whole: an upstream that accepts connections but never answers must not hold
                    # start-up (or every request queued on the lock) for the 300 s idle read timeout.
                    async with self._session.get(self._base + "/models",
                                                 timeout=aiohttp.ClientTimeout(total=_CONNECT_TIMEOUT_S)) as response:
                        if response.status >= 400:
                            raise GenerationFailed(f"upstream {self._safe_base} returned {response.status} "
                                                   f"for /models: {await _error_message(response)}")
                        listing = await response.json(content_type=None)
                    self._model = str(listing["data"][0]["id"])
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    self._report("connect")
                    raise GenerationFailed(f"upstream {self._safe_base} unreachable: {_describe(exc)}") from exc
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    self._report("protocol")
                    raise GenerationFailed(f"upstream {self._safe_base} lists no model in /models; "
                                           "set upstream_model") from exc
                log.info("upstream serves model %s", self._model)
        return self._model

    async def _open(self, request_id: str, path: str, body: dict[str, Any],
                    deadline: float | None) -> aiohttp.ClientResponse | None:
        """POST, retrying connection failures before any response byte; None when the deadline passed first."""
        assert self._session is not None
        body["model"] = await self._model_name()
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        url = self._base + path
        for attempt in range(len(_RETRY_BACKOFF_S) + 1):
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                return None
            try:
                return await asyncio.wait_for(self._session.post(url, data=payload, headers=headers), timeout)
            except aiohttp.ServerTimeoutError as exc:  # aiohttp's own connect or read timeout, not our deadline
                failure: BaseException = exc
            except asyncio.TimeoutError:
                return None
            except (aiohttp.ClientConnectionError, OSError) as exc:
                failure = exc
            self._report("connect")
            if attempt == len(_RETRY_BACKOFF_S) or self._aborting:
                raise GenerationFailed(f"upstream {self._safe_base} unreachable: {_describe(failure)}")
            log.debug("upstream attempt %d for %s failed (%s); retrying", attempt + 1, request_id, failure)
            await asyncio.sleep(_RETRY_BACKOFF_S[attempt])
        raise AssertionError("unreachable")

    async def _stream(self, request_id: str, path: str, body: dict[str, Any], submitted: float,
                      deadline: float | None) -> AsyncIterator[Piece]:
        response = await self._open(request_id, path, body, deadline)
        if response is None:
            yield Piece("", FINISH_DEADLINE, _request_stats(request_id, 0, 0, None, submitted, FINISH_DEADLINE))
            return
        self._live.add(response)
        clean = False
        deltas = 0
        tokens: int | None = None  # as the upstream reports them, once it has finished
        try:
            if response.status >= 400:
                raise await self._http_error(response)
            decoder, coalescer = SSEDecoder(), TextCoalescer(self.options.flush_tokens, self.options.flush_ms)
            reason: str | None = None
            usage: dict[str, Any] = {}
            first_text_at: float | None = None
            done = False
            while not done:
                now = time.monotonic()
                # Once the upstream says it finished, pending text waits for the last piece, not for a timer.
                flush_in = coalescer.due_in(now) if reason is None else None
                waits = [w for w in (flush_in, None if deadline is None else deadline - now) if w is not None]
                chunk = await self._read(response, min(waits) if waits else None)
                now = time.monotonic()
                if chunk is None:  # a timer: the deadline, or pending text that is due
                    if deadline is not None and now >= deadline:
                        reason = FINISH_DEADLINE
                        break
                    if coalescer.due(now):
                        first_text_at = first_text_at or now
                        yield Piece(coalescer.take(now))
                    continue
                if not chunk:
                    if self._aborting and reason is None:
                        reason = FINISH_CANCELLED
                    elif reason is None:
                        self._report("disconnect")
                        raise GenerationFailed(f"upstream {self._safe_base} closed the stream before it finished")
                    break  # finished without [DONE]: some servers simply end the body
                try:
                    events = decoder.feed(chunk)
                except ValueError as exc:  # includes UnicodeDecodeError
                    self._report("protocol")
                    raise GenerationFailed(f"upstream {self._safe_base} sent a malformed stream: {exc}") from exc
                for data in events:
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        text, event_reason, event_usage, error = _parse_event(data)
                    except (ValueError, TypeError, AttributeError, KeyError) as exc:
                        self._report("protocol")
                        raise GenerationFailed(f"upstream {self._safe_base} sent a malformed event: {exc}") from exc
                    if error is not None:
                        self._report("stream_error")
                        pending = coalescer.take(now)
                        if pending:
                            yield Piece(pending)
                        raise GenerationFailed(f"upstream {self._safe_base} failed mid-stream: {error}")
                    if text:
                        coalescer.add(text)
                        deltas += 1
                    reason = event_reason or reason
                    usage = event_usage or usage
                if not done and reason is None and coalescer.due(now):
                    first_text_at = first_text_at or now
                    yield Piece(coalescer.take(now))
            clean = done or reason not in (FINISH_DEADLINE, FINISH_CANCELLED)
            finish = reason or FINISH_EOS
            tokens = _count(usage.get("completion_tokens"), deltas) if clean else deltas
            now = time.monotonic()
            text = coalescer.take(now)
            if text and first_text_at is None:
                first_text_at = now
            yield Piece(text, finish, _request_stats(request_id, _count(usage.get("prompt_tokens"), 0), tokens,
                                                     first_text_at, submitted, finish))
        finally:
            self._record(deltas, deltas if tokens is None else tokens)
            self._live.discard(response)
            if clean:
                response.release()  # back to the pool when the body was read to its end (closed otherwise)
            else:
                response.close()  # the upstream sees the disconnect and frees its own slot

    async def _read(self, response: aiohttp.ClientResponse, timeout: float | None) -> bytes | None:
        """The next bytes of the body (b"" at its end), or None when ``timeout`` passed first."""
        try:
            if timeout is None:
                return await response.content.readany()
            return await asyncio.wait_for(response.content.readany(), max(0.0, timeout))
        except aiohttp.ServerTimeoutError as exc:
            self._report("timeout")
            raise GenerationFailed(f"upstream {self._safe_base} sent nothing for {_IDLE_READ_TIMEOUT_S:g} s") \
                from exc
        except asyncio.TimeoutError:
            return None
        except (aiohttp.ClientError, OSError) as exc:
            if self._aborting:
                return b""
            self._report("disconnect")
            raise GenerationFailed(f"upstream {self._safe_base} dropped the stream: {_describe(exc)}") from exc

    async def _http_error(self, response: aiohttp.ClientResponse) -> Exception:
        message = await _error_message(response)
        status = response.status
        if status == 429:
            self._report("http_429")
            return EngineOverloaded(f"upstream {self._safe_base} is overloaded: {message}")
        if status in (400, 413, 422):
            self._report("http_4xx")
            return InvalidRequest(f"upstream rejected the request ({status}): {message}")
        if status < 500:
            # 401/403/404 and the like: the miner's upstream settings (key, model name, URL) are wrong, not the
            # caller's request.
            self._report("http_4xx")
            log.error("upstream %s refused the miner (%d): %s; check --model.upstream_*", self._safe_base, status,
                      message)
            return GenerationFailed(f"upstream {self._safe_base} refused the miner ({status}): {message}")
        self._report("http_5xx")
        return GenerationFailed(f"upstream {self._safe_base} returned {status}: {message}")

    def _report(self, kind: str) -> None:
        if self._errors is not None:
            self._errors.upstream_error(kind)


def _count(value: Any, default: int) -> int:
    """A token count from the upstream's usage block, which some servers send as null."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _parse_event(data: str) -> tuple[str, str | None, dict[str, Any] | None, str | None]:
    """(text delta, mapped finish reason, usage, error message) of one streamed chunk."""
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"an event is not JSON: {data[:200]!r}") from exc
    if not isinstance(event, dict):
        raise ValueError(f"an event is not a JSON object: {data[:200]!r}")
    error = event.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else None
        return "", None, None, str(message or error)
    text, reason = "", None
    choices = event.get("choices") or []
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        text = (delta.get("content") if isinstance(delta, dict) else choice.get("text")) or ""
        reason = _finish_reason(choice)
    usage = event.get("usage")
    return text, reason, usage if isinstance(usage, dict) else None, None


def _finish_reason(choice: dict[str, Any]) -> str | None:
    reason = choice.get("finish_reason")
    if reason is None:
        return None
    if reason == "length":
        return FINISH_LENGTH
    # OpenAI's "stop" covers both the end-of-sequence token and a stop string; vLLM and SGLang tell them apart
    # with a string stop_reason (the matched stop string).
    if isinstance(choice.get("stop_reason"), str) or isinstance(choice.get("matched_stop"), str):
        return FINISH_STOP
    return FINISH_EOS


def _request_stats(request_id: str, prompt_tokens: int, tokens: int, first_text_at: float | None,
                   submitted: float, reason: str) -> RequestStats:
    duration = time.monotonic() - submitted
    return RequestStats(request_id=request_id, prompt_tokens=prompt_tokens, tokens=tokens,
                        ttft_s=None if first_text_at is None else first_text_at - submitted,
                        duration_s=duration, tokens_per_s=tokens / duration if duration > 0 else 0.0,
                        finish_reason=reason)


async def _error_message(response: aiohttp.ClientResponse) -> str:
    raw = await response.content.read(_MAX_ERROR_BODY)
    text = raw.decode("utf-8", "replace").strip()
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text[:500] or response.reason or "no details"
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(error or text[:500])


def _api_base(url: str) -> str:
    """``http://host:8000`` and ``http://host:8000/v1/`` both mean the ``/v1`` API of that server."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"upstream_url must be an http(s) URL, got {url!r}")
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
