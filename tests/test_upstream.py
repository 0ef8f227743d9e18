"""UpstreamBackend: against ``minercore serve`` (real engine, echo) and against small scripted aiohttp upstreams.

No bittensor here: the backend is core code and must work without it.
"""

import asyncio
import contextlib
import json
import logging
import socket
import time

import pytest
import pytest_asyncio
from aiohttp import web

from minercore.backends import build_backend
from minercore.backends.upstream import SSEDecoder, TextCoalescer, UpstreamBackend
from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import (
    EngineClosed,
    EngineOverloaded,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
)
from minercore.engine import Engine
from minercore.serve.server import create_app, serving

in_module_loop = pytest.mark.asyncio(loop_scope="module")  # for the tests that share the served engine

MIXED = ["Hello, world!", "Ça va très bien, merci.", "世界你好，今天天气很好。", "👩‍👩‍👧‍👦 family 🇫🇷 flag 👍🏽",
         "مرحبا بالعالم", "line one\nline two\r\n\ttabbed", "e\u0301 combining", "<|endoftext|> is text here"]


def prompt_for(i: int) -> str:
    return f"#{i}: " + " ".join(MIXED[(i + k) % len(MIXED)] for k in range(1 + i % 5))


def upstream(url: str, **model) -> ModelOptions:
    return ModelOptions(backend="upstream", upstream_url=url, **model)


async def collect(backend, request: GenerationRequest):
    pieces = [piece async for piece in backend.generate(request)]
    return "".join(p.text for p in pieces), pieces


@contextlib.asynccontextmanager
async def started(model: ModelOptions, options: EngineOptions | None = None, **kwargs):
    backend = UpstreamBackend(model, options or EngineOptions(), **kwargs)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.shutdown(grace=0)


# ---- the building blocks ------------------------------------------------------------------------------
def test_sse_decoder_survives_any_split():
    text = "é世🙂\n"
    wire = ("data: {\"a\": 1}\n\n: a comment\r\nevent: message\r\ndata: line one\r\ndata: line two\r\n\r\n"
            f"data:{text!r}\r\rid: 7\ndata: [DONE]\n\n").encode()
    expected = ['{"a": 1}', "line one\nline two", repr(text), "[DONE]"]
    for cut in range(len(wire) + 1):
        decoder = SSEDecoder()
        assert decoder.feed(wire[:cut]) + decoder.feed(wire[cut:]) == expected, cut
    decoder = SSEDecoder()
    assert [e for i in range(len(wire)) for e in decoder.feed(wire[i:i + 1])] == expected


def test_coalescer_policy():
    coalescer = TextCoalescer(flush_tokens=3, flush_ms=50)
    assert not coalescer.due(0.0) and coalescer.due_in(0.0) is None
    coalescer.add("a")
    assert coalescer.due(0.0)  # the first text goes out at once
    assert coalescer.take(0.0) == "a"
    coalescer.add("b")
    coalescer.add("c")
    assert not coalescer.due(0.01) and coalescer.due_in(0.01) == pytest.approx(0.04)
    coalescer.add("d")
    assert coalescer.due(0.01)  # three deltas pending
    assert coalescer.take(0.01) == "bcd"
    coalescer.add("e")
    assert not coalescer.due(0.05) and coalescer.due(0.07)  # 50 ms after the last flush
    assert coalescer.take(0.06) == "e"


def test_options_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="upstream_url"):
        UpstreamBackend(ModelOptions(backend="upstream"))
    with pytest.raises(ValueError, match="http"):
        UpstreamBackend(upstream("ftp://host/v1"))
    monkeypatch.delenv("MINERCORE_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="MINERCORE_TEST_KEY"):
        UpstreamBackend(upstream("http://127.0.0.1:1", upstream_api_key_env="MINERCORE_TEST_KEY"))
    with pytest.raises(ValueError, match="backend must be one of"):
        build_backend(ModelOptions(backend="vllm"), EngineOptions())
    assert isinstance(build_backend(upstream("http://h:1"), EngineOptions()), UpstreamBackend)
    assert isinstance(build_backend(ModelOptions(), EngineOptions()), Engine)
    # What /health and the miner's start-up line report, before anything is built.
    assert build_backend(upstream("http://h:1"), EngineOptions()).backend_name == "upstream"
    assert build_backend(ModelOptions(), EngineOptions()).backend_name == "native"
    assert build_backend(ModelOptions(backend="simulated"), EngineOptions()).backend_name == "native"
    assert build_backend(ModelOptions(backend="hf", path="/m"), EngineOptions()).backend_name == "hf"
    assert "h:1/v1" in UpstreamBackend(upstream("http://user:pw@h:1")).runner_description
    assert "pw" not in UpstreamBackend(upstream("http://user:pw@h:1")).runner_description
    # max_batch 0 (the default): as many open streams as a GPU server batches; a number given is kept
    assert UpstreamBackend(upstream("http://h:1")).options.max_batch == 256
    assert UpstreamBackend(upstream("http://h:1"), EngineOptions(max_batch=8)).options.max_batch == 8


# ---- against minercore serve (the real engine) ---------------------------------------------------------
@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def serve_engine():
    engine = Engine(ModelOptions(preset="tiny", compile="off"), EngineOptions(max_batch=16))
    async with serving(create_app(engine, "minercore-tiny")) as url:
        yield engine, url


@in_module_loop
async def test_echo_through_minercore_serve_is_exact(serve_engine):
    engine, url = serve_engine
    async with started(upstream(url), EngineOptions(max_batch=8, flush_tokens=4)) as backend:
        assert "minercore-tiny" in backend.runner_description  # found through /v1/models
        requests = [GenerationRequest(prompt=prompt_for(i), sampling=SamplingParams(max_new_tokens=4096))
                    for i in range(6)]
        requests += [GenerationRequest(messages=[{"role": "system", "content": "ignored by echo"},
                                                 {"role": "user", "content": prompt_for(i)}]) for i in (6, 7)]
        results = await asyncio.gather(*(collect(backend, r) for r in requests))
        for i, (text, pieces) in enumerate(results):
            assert text == prompt_for(i)
            last = pieces[-1]
            assert last.finish_reason == "eos"
            assert all(p.finish_reason is None and p.stats is None for p in pieces[:-1])
            assert last.stats.tokens == last.stats.prompt_tokens + 1  # usage from the upstream: echo, then EOS
            assert last.stats.ttft_s is not None and 0 < last.stats.ttft_s <= last.stats.duration_s
        ids, _ = await collect(backend, GenerationRequest(prompt_ids=[15496, 11, 995]))
        assert ids == "Hello, world"
        short, pieces = await collect(backend, GenerationRequest(prompt=prompt_for(3),
                                                                 sampling=SamplingParams(max_new_tokens=2)))
        assert prompt_for(3).startswith(short) and pieces[-1].finish_reason == "length"
        stats = backend.stats()
        assert (stats.active, stats.queued, stats.completed, stats.failed) == (0, 0, 10, 0)
        assert stats.tokens >= sum(len(prompt_for(i)) // 8 for i in range(8)) and stats.tokens_per_s > 0


@in_module_loop
async def test_upstream_4xx_blames_the_right_party(serve_engine):
    _, url = serve_engine
    async with started(upstream(url, upstream_model="no-such-model")) as backend:
        # A wrong model name is the miner's configuration, not the caller's request.
        with pytest.raises(GenerationFailed, match=r"refused the miner \(404\).*does not exist"):
            await collect(backend, GenerationRequest(prompt="x"))
        with pytest.raises(InvalidRequest, match="temperature"):  # caught here, before any call
            await collect(backend, GenerationRequest(prompt="x", sampling=SamplingParams(temperature=-1)))
        assert backend.stats().failed == 1
    async with started(upstream(url)) as backend:
        with pytest.raises(InvalidRequest, match=r"upstream rejected the request \(400\).*context"):
            await collect(backend, GenerationRequest(prompt="word " * 5000))


@in_module_loop
async def test_leaving_early_frees_the_upstream_engine_slot(serve_engine):
    engine, url = serve_engine
    cancelled = engine.stats().cancelled
    async with started(upstream(url)) as backend:
        long = " ".join(MIXED) * 25
        async with contextlib.aclosing(backend.generate(GenerationRequest(prompt=long))) as stream:
            first = await anext(stream)
            assert long.startswith(first.text) and engine.stats().active == 1
        assert backend.stats().active == 0 and backend.stats().cancelled == 1
        give_up = time.monotonic() + 10
        while engine.stats().active and time.monotonic() < give_up:
            await asyncio.sleep(0.01)
        assert engine.stats().active == 0 and engine.stats().cancelled == cancelled + 1


# ---- scripted upstreams ---------------------------------------------------------------------------------
def chunk(text: str | None = None, finish: str | None = None, chat: bool = False) -> bytes:
    choice = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {} if text is None else {"content": text}
    else:
        choice["text"] = text or ""
    return f"data: {json.dumps({'choices': [choice]}, ensure_ascii=False)}\n\n".encode()


class Scripted:
    """An aiohttp upstream whose completions handler is the given coroutine; counts calls and disconnects."""

    def __init__(self, handler):
        self.handler, self.calls, self.requests, self.url = handler, 0, [], None

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        self.requests.append((dict(request.headers), await request.json()))
        return await self.handler(self, request)

    @contextlib.asynccontextmanager
    async def running(self, port: int = 0):
        app = web.Application()
        app.router.add_post("/v1/completions", self.dispatch)
        app.router.add_post("/v1/chat/completions", self.dispatch)
        app.router.add_get("/v1/models", lambda _: web.json_response({"data": [{"id": "scripted"}]}))
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        try:
            yield self.url
        finally:
            await runner.cleanup()


async def sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


async def test_byte_by_byte_stream_is_exact_and_coalesced():
    deltas = ["Ça ", "va ", "世界", "🙂", "\n", "é", "x", "y", "z", "!"]
    wire = b"".join(chunk(d, chat=True) for d in deltas) + chunk(None, "stop", chat=True) + b"data: [DONE]\n\n"

    async def trickle(_, request):
        response = await sse(request)
        for i in range(len(wire)):  # every event and every multi-byte character split across reads
            await response.write(wire[i:i + 1])
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    async with Scripted(trickle).running() as url, \
            started(upstream(url), EngineOptions(flush_tokens=4, flush_ms=10_000)) as backend:
        text, pieces = await collect(backend, GenerationRequest(messages=[{"role": "user", "content": "hi"}]))
    assert text == "".join(deltas)
    assert [p.text for p in pieces] == ["Ça ", "va 世界🙂\n", "éxyz", "!"]  # first at once, then every 4 deltas
    assert pieces[-1].finish_reason == "eos" and pieces[-1].stats.tokens == len(deltas)  # no usage: deltas


async def test_time_flush_and_finish_mapping():
    async def bursty(_, request):
        response = await sse(request)
        for text, pause in (("a", 0.005), ("b", 0.3), ("c", 0.05)):
            await response.write(chunk(text))
            await asyncio.sleep(pause)
        await response.write(b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "stop", '
                             b'"stop_reason": "END"}], "usage": {"prompt_tokens": 3, "completion_tokens": 9}}\n\n')
        await response.write(b"data: [DONE]\n\n")
        return response

    async with Scripted(bursty).running() as url, \
            started(upstream(url), EngineOptions(flush_tokens=16, flush_ms=20)) as backend:
        pieces, times = [], []
        async for piece in backend.generate(GenerationRequest(prompt="p")):
            pieces.append(piece)
            times.append(time.monotonic())
    assert [p.text for p in pieces] == ["a", "b", "c", ""]
    assert times[1] - times[0] < 0.15  # "b" left on the 20 ms timer, not with the next delta 300 ms later
    assert pieces[-1].finish_reason == "stop"  # a string stop_reason means a stop string matched
    assert (pieces[-1].stats.prompt_tokens, pieces[-1].stats.tokens) == (3, 9)


async def test_upstream_down_fails_fast_then_recovers():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes

    class Errors:
        def __init__(self):
            self.kinds = []

        def upstream_error(self, kind):
            self.kinds.append(kind)

    async def fine(_, request):
        response = await sse(request)
        await response.write(chunk("back ✓") + chunk(None, "stop") + b"data: [DONE]\n\n")
        return response

    errors = Errors()
    async with started(upstream(f"http://127.0.0.1:{port}/v1", upstream_model="scripted"), errors=errors) as backend:
        began = time.monotonic()
        with pytest.raises(GenerationFailed, match=f"upstream http://127.0.0.1:{port}/v1 unreachable"):
            await collect(backend, GenerationRequest(prompt="x"))
        assert time.monotonic() - began < 2.0
        assert errors.kinds == ["connect"] * 3  # the first try and two retries
        assert backend.stats().failed == 1 and backend.stats().active == 0
        async with Scripted(fine).running(port):
            assert (await collect(backend, GenerationRequest(prompt="x")))[0] == "back ✓"


async def test_retries_only_before_the_first_byte():
    async def drop_first_connection(upstream_, request):
        if upstream_.calls == 1:
            request.transport.close()  # no status line: the client retries
            return web.Response()
        response = await sse(request)
        await response.write(chunk("second try"))
        await response.write(chunk(None, "length") + b"data: [DONE]\n\n")
        return response

    scripted = Scripted(drop_first_connection)
    async with scripted.running() as url, started(upstream(url)) as backend:
        text, pieces = await collect(backend, GenerationRequest(prompt="x"))
    assert (text, pieces[-1].finish_reason, scripted.calls) == ("second try", "length", 2)

    async def die_mid_stream(_, request):
        response = await sse(request)
        await response.write(chunk("partial"))
        await asyncio.sleep(0.05)
        request.transport.close()
        return response

    scripted = Scripted(die_mid_stream)
    async with scripted.running() as url, started(upstream(url)) as backend:
        seen = []
        with pytest.raises(GenerationFailed, match="upstream .* (dropped|closed) the stream"):
            async for piece in backend.generate(GenerationRequest(prompt="x")):
                seen.append(piece.text)
    assert (seen, scripted.calls) == (["partial"], 1)  # bytes had arrived: no retry


@pytest.mark.parametrize(("status", "error", "match"), [
    (400, InvalidRequest, "upstream rejected the request \\(400\\): max_tokens is too large"),
    (429, EngineOverloaded, "overloaded: max_tokens is too large"),
    (500, GenerationFailed, "returned 500: max_tokens is too large"),
])
async def test_http_errors_map_to_engine_exceptions(status, error, match):
    async def refuse(_, request):
        return web.json_response({"error": {"message": "max_tokens is too large", "type": "x", "param": None,
                                            "code": None}}, status=status)

    async with Scripted(refuse).running() as url, started(upstream(url)) as backend:
        with pytest.raises(error, match=match):
            await collect(backend, GenerationRequest(prompt="x"))
        assert backend.stats().active == 0


async def test_error_event_mid_stream_fails_after_the_text_so_far():
    async def fail(_, request):
        response = await sse(request)
        await response.write(chunk("ok so far"))
        await response.write(b'data: {"error": {"message": "CUDA out of memory", "code": "generation_failed"}}\n\n'
                             b"data: [DONE]\n\n")
        return response

    async with Scripted(fail).running() as url, started(upstream(url)) as backend:
        seen = []
        with pytest.raises(GenerationFailed, match="failed mid-stream: CUDA out of memory"):
            async for piece in backend.generate(GenerationRequest(prompt="x")):
                seen.append(piece.text)
        assert "".join(seen) == "ok so far" and backend.stats().failed == 1


def forever(disconnected: asyncio.Event, headers: bool = True):
    async def handler(_, request):
        if not headers:
            await asyncio.sleep(30)
        response = await sse(request)
        try:
            while True:
                await response.write(chunk("tick "))
                await asyncio.sleep(0.02)
        except ConnectionError:  # the client went away: what these tests wait for
            disconnected.set()
            return response
    return handler


async def test_deadline_ends_the_stream_and_the_upstream_call():
    disconnected = asyncio.Event()
    async with Scripted(forever(disconnected)).running() as url, started(upstream(url)) as backend:
        began = time.monotonic()
        text, pieces = await collect(backend, GenerationRequest(prompt="x", timeout=0.3))
        assert 0.3 <= time.monotonic() - began < 1.0
        assert pieces[-1].finish_reason == "deadline" and text.startswith("tick ")
        await asyncio.wait_for(disconnected.wait(), 5)
        silent = asyncio.Event()
    async with Scripted(forever(silent, headers=False)).running() as url, started(upstream(url)) as backend:
        text, pieces = await collect(backend, GenerationRequest(prompt="x", timeout=0.2))
        assert (text, pieces[-1].finish_reason) == ("", "deadline")
        assert backend.stats().completed == 1


async def test_cancel_closes_the_upstream_call_and_frees_the_slot():
    disconnected = asyncio.Event()
    async with Scripted(forever(disconnected)).running() as url, started(upstream(url)) as backend:
        async with contextlib.aclosing(backend.generate(GenerationRequest(prompt="x"))) as stream:
            await anext(stream)
        await asyncio.wait_for(disconnected.wait(), 5)
        stats = backend.stats()
        assert (stats.active, stats.cancelled) == (0, 1)


async def test_admission_is_bounded_and_by_priority():
    disconnected = asyncio.Event()
    async with Scripted(forever(disconnected)).running() as url, \
            started(upstream(url), EngineOptions(max_batch=1, max_queue=2)) as backend:
        holder = backend.generate(GenerationRequest(prompt="hold"))
        await anext(holder)
        order = []

        async def queued(name, priority):
            async with contextlib.aclosing(backend.generate(GenerationRequest(prompt=name, priority=priority))) as s:
                await anext(s)
                order.append(name)

        low = asyncio.create_task(queued("low", 0.0))
        high = asyncio.create_task(queued("high", 1.0))
        while backend.stats().queued < 2:
            await asyncio.sleep(0.005)
        with pytest.raises(EngineOverloaded, match="1 upstream slots are busy and 2 requests"):
            await collect(backend, GenerationRequest(prompt="too many"))
        await holder.aclose()
        await asyncio.gather(low, high)
        assert order == ["high", "low"]
        stats = backend.stats()
        assert (stats.active, stats.queued, stats.rejected, stats.cancelled) == (0, 0, 1, 3)


async def test_queued_request_past_its_deadline_gets_deadline():
    disconnected = asyncio.Event()
    async with Scripted(forever(disconnected)).running() as url, \
            started(upstream(url), EngineOptions(max_batch=1, max_queue=1)) as backend, \
            contextlib.aclosing(backend.generate(GenerationRequest(prompt="hold"))) as holder:
        await anext(holder)
        text, pieces = await collect(backend, GenerationRequest(prompt="late", timeout=0.05))
        assert (text, pieces[-1].finish_reason) == ("", "deadline")
        assert backend.stats().queued == 0


async def test_shutdown_cancels_what_is_left():
    disconnected = asyncio.Event()
    async with Scripted(forever(disconnected)).running() as url:
        backend = UpstreamBackend(upstream(url), EngineOptions(max_batch=1))
        await backend.start()
        running = backend.generate(GenerationRequest(prompt="x"))
        await anext(running)
        waiting = asyncio.create_task(collect(backend, GenerationRequest(prompt="y")))
        while backend.stats().queued == 0:
            await asyncio.sleep(0.005)
        closing = asyncio.create_task(backend.shutdown(grace=0))
        rest = [piece async for piece in running]
        await closing
        assert rest[-1].finish_reason == "cancelled"
        assert (await waiting)[1][-1].finish_reason == "cancelled"
        with pytest.raises(EngineClosed):
            await collect(backend, GenerationRequest(prompt="z"))


async def test_api_key_is_sent_and_never_logged(monkeypatch, caplog):
    secret = "sk-test-0123456789"
    monkeypatch.setenv("MINERCORE_TEST_KEY", secret)

    async def fine(_, request):
        response = await sse(request)
        await response.write(chunk("ok") + chunk(None, "stop") + b"data: [DONE]\n\n")
        return response

    scripted = Scripted(fine)
    caplog.set_level(logging.DEBUG)
    async with scripted.running() as url, \
            started(upstream(url, upstream_api_key_env="MINERCORE_TEST_KEY")) as backend:
        assert (await collect(backend, GenerationRequest(prompt="x", sampling=SamplingParams(
            max_new_tokens=5, temperature=0.7, top_k=40, top_p=0.9, seed=3, stop=("\n",)))))[0] == "ok"
        assert secret not in repr(backend) and secret not in backend.runner_description
    headers, body = scripted.requests[0]
    assert headers["Authorization"] == f"Bearer {secret}"
    assert body == {"model": "scripted", "prompt": "x", "stream": True, "stream_options": {"include_usage": True},
                    "max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3, "stop": ["\n"]}
    assert secret not in caplog.text
