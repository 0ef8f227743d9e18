"""``minercore serve``: the official openai client against the real engine (tiny preset, echo mode), in-process."""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import pytest_asyncio
from helpers import free_port
from runner_wrappers import SlowRunner

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import (
    EngineClosed,
    EngineStats,
    GenerationFailed,
    GenerationRequest,
    Piece,
    RequestStats,
)
from minercore.engine import Engine
from minercore.runtime.device import dtype_name, select
from minercore.serve.server import create_app, serving

pytestmark = pytest.mark.asyncio(loop_scope="module")

NAME = "minercore-tiny"
MIXED = ("Héllo, wörld! Ça va très bien. 世界你好，今天天气很好。 👩‍👩‍👧‍👦 family 🇫🇷 🙂\n"
         "line two\r\n\ttabbed — naïve café «quotes» κόσμε مرحبا e\u0301 <|endoftext|> stays text ✓")
LONG = (MIXED + "\n") * 20  # about 2,100 tokens: seconds of echo on a CPU, within the 4,096 context


def client(base: str, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", **kwargs)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    engine = Engine(ModelOptions(preset="tiny", compile="off"), EngineOptions(max_batch=8, max_queue=8))
    yield engine
    await engine.shutdown(grace=0)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def base(engine):
    async with serving(create_app(engine, NAME)) as url:
        yield url


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def api(base):
    async with client(base) as api:
        yield api


async def wait_idle(engine, seconds: float = 10.0) -> EngineStats:
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        stats = engine.stats()
        if stats.active == 0 and stats.queued == 0:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine still busy: {engine.stats()}")


async def test_streamed_completion_is_exact(api):
    chunks = [c async for c in await api.completions.create(
        model=NAME, prompt=MIXED, max_tokens=4096, stream=True)]
    assert "".join(c.choices[0].text for c in chunks) == MIXED
    assert {c.object for c in chunks} == {"text_completion"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert {c.model for c in chunks} == {NAME}
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


async def test_streamed_chat_is_exact_with_role_and_usage(api):
    stream = await api.chat.completions.create(
        model=NAME, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": MIXED}],
        stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.prompt_tokens > 0
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + usage.usage.completion_tokens
    chunks = chunks[:-1]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == MIXED
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


async def test_raw_event_stream_shape(base):
    async with httpx.AsyncClient(base_url=base) as http, http.stream(
            "POST", "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi ✓"}], "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = (await response.aread()).decode("utf-8")
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    first, last = payloads[0], payloads[-1]
    assert set(first) == {"id", "object", "created", "model", "choices"}
    assert first["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                   "logprobs": None, "finish_reason": None}  # the first token goes out at once
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads) == "hi ✓"
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


async def test_whole_responses_with_usage(api):
    completion = await api.completions.create(model=NAME, prompt=MIXED, max_tokens=4096)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == MIXED and completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == completion.usage.prompt_tokens + 1  # the echo, then EOS
    chat = await api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": MIXED}])
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == MIXED
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


async def test_sampling_fields_reach_the_engine(api):
    short = await api.completions.create(model=NAME, prompt=MIXED, max_tokens=3, temperature=0, top_p=0.9,
                                         seed=7, extra_body={"top_k": 5})
    assert short.choices[0].finish_reason == "length" and MIXED.startswith(short.choices[0].text)
    assert short.usage.completion_tokens == 3
    default = await api.completions.create(model=NAME, prompt=LONG)  # OpenAI's default of 16 tokens
    assert default.usage.completion_tokens == 16 and default.choices[0].finish_reason == "length"
    stopped = await api.completions.create(model=NAME, prompt="alpha STOP beta", max_tokens=100, stop=["STOP", "x"])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("alpha ", "stop")
    kept = await api.completions.create(model=NAME, prompt="alpha STOP beta", max_tokens=100, stop="STOP",
                                        extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == "alpha STOP"
    ids = await api.completions.create(model=NAME, prompt=[15496, 11, 995], max_tokens=10)
    assert ids.choices[0].text == "Hello, world"


async def test_deadline_header_cuts_the_stream_short(api):
    stream = await api.completions.create(model=NAME, prompt=LONG, max_tokens=4096, stream=True,
                                          extra_headers={"X-Minercore-Timeout": "0.3"})
    chunks = [c async for c in stream]
    # The engine ends a cut-short stream with U+FFFD when the deadline splits a multi-byte character.
    text = "".join(c.choices[0].text for c in chunks).removesuffix("\ufffd")
    assert LONG.startswith(text) and len(text) < len(LONG)
    assert chunks[-1].choices[0].finish_reason == "length"  # deadline maps to "length" (documented)


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "logprobs": 3}, "logprobs"),
    ({"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({}, "prompt"),
])
async def test_bad_parameters_are_400_in_openai_shape(base, body, param):
    async with httpx.AsyncClient(base_url=base) as http:
        response = await http.post("/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


async def test_engine_validation_errors_and_the_openai_client(base, api):
    async with httpx.AsyncClient(base_url=base) as http:
        empty = await http.post("/v1/completions", json={"prompt": "", "stream": True})
        junk = await http.post("/v1/chat/completions", content=b"{not json")
        unknown = await http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": []})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    assert junk.status_code == 400 and "JSON" in junk.json()["error"]["message"]
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        await api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                                   temperature=-0.5, stream=True)


async def test_models_and_health(base, api):
    async with httpx.AsyncClient(base_url=base) as http:
        health = (await http.get("/health")).json()
    assert health["status"] == "ok" and health["model"] == NAME and "tiny" in health["runner"]
    assert health["backend"] == "native"
    memory = {key: health["serving"].pop(key) for key in ("weights_bytes", "kv_cache_bytes")}
    assert health["serving"] == {"backend": "native", "format": "random (tiny preset)", "architecture": "gpt2",
                                 "checkpoint_quantization": "none", "quantization": "none",
                                 "dtype": dtype_name(select("cpu", "auto")[1]), "device": "cpu", "kv_cache": "paged"}
    assert 0 < memory["weights_bytes"] < 2**27 and 0 < memory["kv_cache_bytes"] <= 2**30
    assert set(health["stats"]) >= {"active", "queued", "completed", "tokens", "tokens_per_s"}
    models = await api.models.list()
    assert [m.id for m in models.data] == [NAME]


async def test_disconnect_mid_stream_frees_the_slot(base, engine):
    await wait_idle(engine)
    cancelled = engine.stats().cancelled
    async with httpx.AsyncClient(base_url=base) as http, http.stream(
            "POST", "/v1/completions", json={"prompt": LONG, "max_tokens": 4096, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                break
        assert engine.stats().active == 1
    stats = await wait_idle(engine)
    assert stats.cancelled == cancelled + 1


async def test_openai_client_abandoning_a_stream_frees_the_slot(api, engine):
    await wait_idle(engine)
    cancelled = engine.stats().cancelled
    stream = await api.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": LONG}], stream=True)
    async for _ in stream:
        break
    await stream.close()
    stats = await wait_idle(engine)
    assert stats.cancelled == cancelled + 1


@contextlib.asynccontextmanager
async def small_server():
    """One slot and one queue place, slowed down: room for exactly two requests."""
    from minercore.runtime.build import build_runner

    model = ModelOptions(preset="tiny", compile="off")
    engine = Engine(model, EngineOptions(max_batch=1, max_queue=1),
                    runner=SlowRunner(build_runner(model, max_batch=1, eos_id=50256)))
    async with serving(create_app(engine, NAME)) as url:
        yield engine, url


async def test_overload_is_429_and_a_queued_client_leaving_is_cancelled():
    async with small_server() as (engine, url), httpx.AsyncClient(base_url=url, timeout=30) as http:
        body = {"prompt": LONG, "max_tokens": 4096, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as running:
            lines = running.aiter_lines()
            while not (await anext(lines)).startswith("data: {"):
                pass
            queued = asyncio.create_task(http.post("/v1/completions", json=body))
            while engine.stats().queued == 0:
                await asyncio.sleep(0.005)
            rejected = await http.post("/v1/completions", json=body)
            assert rejected.status_code == 429 and rejected.headers["retry-after"] == "1"
            assert rejected.json()["error"]["code"] == "engine_overloaded"
            async with client(url, max_retries=0) as api:
                with pytest.raises(openai.RateLimitError):
                    await api.completions.create(model=NAME, prompt="x")
            queued.cancel()  # the client gives up while its request waits for the slot
            with contextlib.suppress(asyncio.CancelledError):
                await queued
            give_up = time.monotonic() + 5
            while engine.stats().queued and time.monotonic() < give_up:
                await asyncio.sleep(0.01)
            assert engine.stats().queued == 0 and engine.stats().cancelled == 1
        stats = await wait_idle(engine)
        assert stats.cancelled == 2 and stats.rejected == 2


class FakeBackend:
    """Scripted pieces, then an optional failure: what the real engine does only under faults."""

    stream_loop = "fake"
    backend_name = "fake"
    runner_description = "fake"
    warmup_seconds = 0.0

    def __init__(self, texts=("one ", "two "), fail=None, fail_first=None):
        self.texts, self.fail, self.fail_first = texts, fail, fail_first

    async def start(self):
        pass

    async def shutdown(self, grace=5.0):
        pass

    def stats(self):
        return EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0)

    async def generate(self, request: GenerationRequest):
        if self.fail_first is not None:
            raise self.fail_first
        for text in self.texts:
            yield Piece(text)
        if self.fail is not None:
            raise self.fail
        yield Piece("", "eos", RequestStats(request.request_id, 1, len(self.texts), 0.0, 0.0, 0.0, "eos"))


async def test_failure_mid_stream_sends_an_error_event_then_done():
    app = create_app(FakeBackend(fail=GenerationFailed("model step failed: CUDA out of memory")), NAME)
    async with serving(app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            raw = (await http.post("/v1/completions", json={"prompt": "x", "stream": True})).text
        events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
        assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["one ", "two "]
        assert json.loads(events[2])["error"]["code"] == "generation_failed"
        assert "out of memory" in json.loads(events[2])["error"]["message"]
        assert events[3:] == ["[DONE]"]
        async with client(url) as api:
            with pytest.raises(openai.APIError, match="out of memory"):
                async for _ in await api.completions.create(model=NAME, prompt="x", stream=True):
                    pass


@pytest.mark.parametrize(("error", "status"), [(EngineClosed("engine is shutting down"), 503),
                                               (GenerationFailed("prefill failed: boom"), 500)])
async def test_failure_before_any_text_has_its_status(error, status):
    async with serving(create_app(FakeBackend(fail_first=error), NAME)) as url, \
            httpx.AsyncClient(base_url=url) as http:
        for stream in (True, False):
            response = await http.post("/v1/chat/completions",
                                       json={"messages": [{"role": "user", "content": "x"}], "stream": stream})
            assert response.status_code == status
            assert response.json()["error"]["message"] == str(error)



async def test_the_serve_command():
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "minercore", "serve", "--port", str(port), "--compile", "off", "--max-batch", "4",
         "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base) as http:
            give_up = time.monotonic() + 120
            while True:
                assert process.poll() is None, process.stdout.read().decode()
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/health")).status_code == 200:
                        break
                assert time.monotonic() < give_up, "minercore serve did not come up"
                await asyncio.sleep(0.2)
        async with client(base) as api:
            stream = await api.chat.completions.create(
                model="minercore-tiny", messages=[{"role": "user", "content": MIXED}], stream=True)
            assert "".join([c.choices[0].delta.content or "" async for c in stream]) == MIXED
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0].decode()
    assert process.returncode == 0, output


async def test_a_bug_still_answers_in_openai_shape():
    async with serving(create_app(FakeBackend(fail_first=RuntimeError("a bug")), NAME)) as url, \
            httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "internal error: RuntimeError", "type": "server_error",
                                         "param": None, "code": "internal_error"}


async def test_an_idle_keep_alive_connection_outlives_the_clients_pools(base):
    """A pooled connection reused after 6 s of idling still answers: the server closes idle connections only
    after the clients' pools have dropped them (a server that closes first loses a request sent as it closes)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = f"GET /health HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
    try:
        for pause in (0.0, 6.0):  # uvicorn's own default closes an idle connection after 5 s
            await asyncio.sleep(pause)
            writer.write(request)
            status = await asyncio.wait_for(reader.readline(), 10)
            assert status.startswith(b"HTTP/1.1 200"), status
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
    finally:
        writer.close()
