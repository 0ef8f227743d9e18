"""The miner's own HTTP server on loopback, on whichever SDK is installed: StreamPrompting from hand-built
bittensor-10 requests, the btauth/1-signed OpenAI routes, refusals (401/403/429) that leave the miner healthy,
the deadline margin (exact text so far, a normal end, counted as ``deadline``) and faults after the first byte
(the connection is cut)."""

import asyncio
import contextlib
import json
import time

import httpx
import pytest
from helpers import MIXED, FakeEngine, mixed_prompt, tiny_engine
from prometheus_client import generate_latest
from v10_signing import v10_request

from minercore.miner import auth, client, sdk
from minercore.miner.app import MinerServer
from minercore.miner.blacklist import BlacklistOptions, BlacklistPolicy
from minercore.miner.config import ServerSettings
from minercore.runtime.device import dtype_name, select
from minercore.serve.metrics import Metrics
from minercore.serve.server import serving

LONG = (MIXED + "\n") * 60
MIXED_2K = mixed_prompt(1900)  # the ~1,900-token mixed prompt: prose, accents, CJK, emoji, the detokenizer corpus


@contextlib.asynccontextmanager
async def miner_server(engine=None, *, options: BlacklistOptions | None = None, metrics=None, **settings):
    """The app over ``engine`` on a free loopback port; yields (base url, miner keypair, server)."""
    engine = engine or FakeEngine()
    miner_key = sdk.new_keypair()
    policy = BlacklistPolicy(options or BlacklistOptions(allow_unregistered=True))
    values = {"hotkey": miner_key.ss58_address, "external_ip": "127.0.0.1", "external_port": 0,
              "max_body_bytes": 4 << 20, "max_timeout": 600.0, "max_prompt_chars": 1 << 20,
              "max_new_tokens": 4096, **settings}
    server = MinerServer(engine, policy, ServerSettings(**values), metrics=metrics)
    await engine.start()
    try:
        async with serving(server.build()) as url:
            yield url, miner_key, server
    finally:
        await engine.shutdown(0.1)


async def post_v10(url: str, request, *, body: bytes | None = None, timeout: float = 30.0) -> httpx.Response:
    async with httpx.AsyncClient(timeout=timeout) as http:
        return await http.post(url + "/StreamPrompting", content=request.body if body is None else body,
                               headers=request.headers)


def sign_openai(caller, miner_key, document, *, path="/v1/chat/completions", **overrides):
    body = json.dumps(document).encode()
    if sdk.http_auth is not None:  # the SDK's own signer where it has one (11.x)
        headers = sdk.http_auth.sign(caller, method="POST", path=path, body=body,
                                     receiver_ss58=overrides.get("receiver", miner_key.ss58_address),
                                     nonce_ns=overrides.get("nonce_ns"))
    else:
        headers = auth.btauth_headers(caller.sign, caller.ss58_address, method="POST", target=path, body=body,
                                      receiver=overrides.get("receiver", miner_key.ss58_address),
                                      nonce_ns=overrides.get("nonce_ns"))
    return body, {**headers, "content-type": "application/json"}


def sse_text(raw: str) -> tuple[str, list[str]]:
    """The streamed text of an OpenAI event stream, and its finish reasons."""
    text, finishes = [], []
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices", ()):
                text.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
                if choice.get("finish_reason"):
                    finishes.append(choice["finish_reason"])
    return "".join(text), finishes


# ---- StreamPrompting ---------------------------------------------------------------------------------------
async def test_a_hand_built_v10_request_is_echoed_exactly():
    async with miner_server() as (url, miner_key, _):
        request = v10_request(sdk.new_keypair(), miner_key.ss58_address, ["first", LONG], timeout=30)
        response = await post_v10(url, request)
        assert response.status_code == 200
        assert response.content.decode("utf-8") == LONG
        assert response.headers["bt_header_axon_status_code"] == "200"
        assert response.headers["bt_header_axon_hotkey"] == miner_key.ss58_address
        assert response.headers["bt_header_dendrite_hotkey"] == request.headers["bt_header_dendrite_hotkey"]


@pytest.mark.parametrize(("case", "status", "message"), [
    ("tampered_body", 401, "computed_body_hash"),
    ("forged_signature", 401, "signature"),
    ("replayed", 401, "a newer one was last processed"),
    ("wrong_axon_hotkey", 401, "different axon hotkey"),
    ("signed_for_another_axon", 401, "signature"),
    ("unsigned", 401, "missing"),
    ("denied", 403, "deny list"),
    ("not_json", 400, "not a JSON document"),
    ("roles_mismatch", 400, "one role per message"),
])
async def test_stream_prompting_refusals_leave_the_miner_healthy(case, status, message):
    caller = sdk.new_keypair()
    denied = sdk.new_keypair()
    options = BlacklistOptions(allow_unregistered=True, deny=frozenset({denied.ss58_address}))
    async with miner_server(options=options) as (url, miner_key, server):
        own = miner_key.ss58_address
        request = v10_request(denied if case == "denied" else caller, own, ["hello"])
        body = None
        if case == "tampered_body":
            request.document["messages"] = ["hellO"]
        elif case == "forged_signature":
            request.resign(sdk.new_keypair())
        elif case == "replayed":
            assert (await post_v10(url, request)).status_code == 200
        elif case == "wrong_axon_hotkey":
            request.headers["bt_header_axon_hotkey"] = caller.ss58_address
            request.resign(caller)
        elif case == "signed_for_another_axon":
            request.resign(caller, axon_hotkey=caller.ss58_address)
        elif case == "unsigned":
            del request.headers["bt_header_dendrite_signature"]
        elif case == "not_json":
            body = b"{not json"
        elif case == "roles_mismatch":
            request.document["roles"] = ["user", "user"]
        response = await post_v10(url, request, body=body)
        assert response.status_code == status
        assert message in response.json()["message"]
        assert response.headers["bt_header_axon_status_code"] == str(status)
        healthy = v10_request(caller, own, [MIXED])
        after = await post_v10(url, healthy)
        assert (after.status_code, after.text) == (200, MIXED)


async def test_the_rate_limit_answers_429_after_the_signature():
    options = BlacklistOptions(allow_unregistered=True, rate_limit=2, rate_window=60.0)
    async with miner_server(options=options) as (url, miner_key, _):
        caller = sdk.new_keypair()
        forged = v10_request(caller, miner_key.ss58_address, ["x"])
        forged.resign(sdk.new_keypair())
        for _ in range(3):  # forged requests in the caller's name spend nothing
            assert (await post_v10(url, forged)).status_code == 401
        statuses = [(await post_v10(url, v10_request(caller, miner_key.ss58_address, ["x"]))).status_code
                    for _ in range(3)]
        assert statuses == [200, 200, 429]


async def test_bodies_over_the_limit_are_refused_before_reading():
    async with miner_server(max_body_bytes=1000) as (url, miner_key, _):
        request = v10_request(sdk.new_keypair(), miner_key.ss58_address, ["x" * 2000])
        response = await post_v10(url, request)
        assert response.status_code == 413 and "at most 1000" in response.json()["message"]


async def test_a_fault_after_the_first_byte_cuts_the_connection():
    engine = FakeEngine(chunk=4)
    engine.fail_after = 2
    async with miner_server(engine) as (url, miner_key, _):
        request = v10_request(sdk.new_keypair(), miner_key.ss58_address, [MIXED])
        received = bytearray()
        with pytest.raises(httpx.RemoteProtocolError):
            async with httpx.AsyncClient(timeout=30) as http, \
                    http.stream("POST", url + "/StreamPrompting", content=request.body,
                                headers=request.headers) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_bytes():
                    received += chunk
        assert received.decode() == MIXED[:8]


async def test_an_answer_past_the_deadline_ends_cleanly_with_the_text_so_far():
    metrics = Metrics()
    engine = DeadlineEngine(delay=0.05)
    async with miner_server(engine, metrics=metrics, deadline_margin=0.5) as (url, miner_key, _):
        request = v10_request(sdk.new_keypair(), miner_key.ss58_address, [LONG], timeout=2.0)
        started = time.monotonic()
        response = await post_v10(url, request)
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert response.text and LONG.startswith(response.text) and response.text != LONG
        assert elapsed < 2.0  # ended before the caller's timeout, by the margin
        assert engine.timeouts[0] is not None and engine.timeouts[0] <= 1.5
        assert 'minercore_requests_total{caller_class="unregistered",outcome="deadline"} 1.0' in generate_latest(
            metrics.registry).decode()


async def test_a_slow_upload_does_not_shorten_the_answer_twice(monkeypatch):
    """The caller's timeout runs from its request's arrival: time spent reading and verifying the body comes off
    the engine's budget once, and the answer's end stays at arrival + timeout - margin."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from minercore.miner import admission, app

    miner_key = sdk.new_keypair()
    settings = ServerSettings(hotkey=miner_key.ss58_address, external_ip="127.0.0.1", external_port=0,
                              max_body_bytes=1 << 20, max_timeout=600.0, max_prompt_chars=1 << 20,
                              max_new_tokens=64, deadline_margin=0.5)
    server = MinerServer(FakeEngine(), BlacklistPolicy(BlacklistOptions(allow_unregistered=True)), settings)
    request = v10_request(sdk.new_keypair(), miner_key.ss58_address, [MIXED], timeout=10.0)
    readings = iter([100.0])  # arrival; every later reading is 3 s on (the body took that long to come)
    clock = SimpleNamespace(monotonic=lambda: next(readings, 103.0))
    monkeypatch.setattr(admission, "time", clock)
    monkeypatch.setattr(app, "time", clock)

    async def receive():
        return {"type": "http.request", "body": request.body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/StreamPrompting", "query_string": b"",
             "headers": [(k.lower().encode(), str(v).encode()) for k, v in request.headers.items()]}
    answer = await server.stream_prompting(Request(scope, receive))
    assert answer.status_code == 200
    assert answer.generation.timeout == 10.0 - 0.5 - 3.0
    assert answer.ends_at == 100.0 + 10.0 - 0.5


class DeadlineEngine(FakeEngine):
    """A fake engine that honours ``request.timeout`` as the real one does: past it, the stream ends with
    ``deadline`` after the text it has."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.timeouts = []

    async def generate(self, request):
        from minercore.contract.generation import FINISH_DEADLINE, Piece

        self.timeouts.append(request.timeout)
        ends = None if request.timeout is None else time.monotonic() + request.timeout
        async for piece in super().generate(request):
            if ends is not None and time.monotonic() >= ends:
                yield Piece("", FINISH_DEADLINE)
                return
            yield piece


@pytest.mark.parametrize("route", ["StreamPrompting", "chat stream", "chat whole"])
async def test_the_deadline_holds_while_the_backend_is_stuck_in_a_long_step(route):
    """A backend checks its deadlines between model steps; the answer ends on time whatever it is doing."""
    engine = FakeEngine(chunk=len(MIXED) // 4, delay=1.0)  # a piece at 1 s, the next one past the deadline
    async with miner_server(engine, deadline_margin=1.0) as (url, miner_key, _), \
            httpx.AsyncClient(timeout=30) as http:  # the answer ends 1.5 s in
        if route == "StreamPrompting":
            request = v10_request(sdk.new_keypair(), miner_key.ss58_address, [MIXED], timeout=2.5)
            started = time.monotonic()
            response = await http.post(url + "/StreamPrompting", content=request.body, headers=request.headers)
            text = response.text
        else:
            document = {"messages": [{"role": "user", "content": MIXED}], "stream": route == "chat stream"}
            body, headers = sign_openai(sdk.new_keypair(), miner_key, document)
            started = time.monotonic()
            response = await http.post(url + "/v1/chat/completions", content=body,
                                       headers={**headers, "X-Client-Timeout": "2.5"})
            text = sse_text(response.text)[0] if route == "chat stream" else \
                response.json()["choices"][0]["message"]["content"]
        elapsed = time.monotonic() - started
    assert elapsed < 2.5, elapsed
    assert response.status_code == 200 and text == MIXED[:len(MIXED) // 4]


# ---- OpenAI routes with btauth/1 -----------------------------------------------------------------------------
CHAT = {"messages": [{"role": "user", "content": MIXED}], "stream": True}


async def test_btauth_signed_chat_streams_exactly():
    async with miner_server() as (url, miner_key, _):
        caller = sdk.new_keypair()
        body, headers = sign_openai(caller, miner_key, CHAT)
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(url + "/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 200
        text, finishes = sse_text(response.text)
        assert (text, finishes) == (MIXED, ["stop"])
        completion = {"prompt": MIXED, "stream": True, "max_tokens": 10_000}
        body, headers = sign_openai(caller, miner_key, completion, path="/v1/completions")
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(url + "/v1/completions", content=body, headers=headers)
        assert response.status_code == 200 and sse_text(response.text)[0] == MIXED


async def test_the_client_streams_over_openai():
    async with miner_server() as (url, miner_key, _):
        port = int(url.rsplit(":", 1)[1])
        target = client.Target("127.0.0.1", port, miner_key.ss58_address)
        pieces = []
        result = await client.stream_openai(target, ["first", MIXED], wallet=sdk.new_keypair(), timeout=30,
                                            on_text=pieces.append)
        assert result.ok, result
        assert result.text == "".join(pieces) == MIXED


async def test_models_are_listed_to_signed_callers_only():
    async with miner_server(served_model_name="smollm2-135m-instruct") as (url, miner_key, _):
        port = int(url.rsplit(":", 1)[1])
        target = client.Target("127.0.0.1", port, miner_key.ss58_address)
        assert await client.list_models(target, wallet=sdk.new_keypair()) == ["smollm2-135m-instruct"]
        async with httpx.AsyncClient(timeout=30) as http:
            unsigned = await http.get(url + "/v1/models")
        assert unsigned.status_code == 401 and unsigned.json()["error"]["code"] == "unauthorized"
        stranger = client.Target("127.0.0.1", port, sdk.new_keypair().ss58_address)  # signed for another miner
        with pytest.raises(ConnectionError, match="401"):
            await client.list_models(stranger, wallet=sdk.new_keypair())


@pytest.mark.parametrize("case", ["unsigned", "stale", "future", "wrong_receiver", "replayed", "tampered"])
async def test_btauth_refusals_get_401_and_leave_the_miner_healthy(case):
    async with miner_server() as (url, miner_key, _):
        caller = sdk.new_keypair()
        now = time.time_ns()
        overrides = {"stale": {"nonce_ns": now - 11_000_000_000}, "future": {"nonce_ns": now + 3_000_000_000},
                     "wrong_receiver": {"receiver": caller.ss58_address}}.get(case, {})
        body, headers = sign_openai(caller, miner_key, CHAT, **overrides)
        if case == "unsigned":
            headers = {"content-type": "application/json"}
        elif case == "tampered":
            body = body.replace(b"user", b"system")
        async with httpx.AsyncClient(timeout=30) as http:
            if case == "replayed":
                assert (await http.post(url + "/v1/chat/completions", content=body, headers=headers)).status_code \
                    == 200
            refused = await http.post(url + "/v1/chat/completions", content=body, headers=headers)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["message"]
            body, headers = sign_openai(caller, miner_key, CHAT)
            healthy = await http.post(url + "/v1/chat/completions", content=body, headers=headers)
            assert healthy.status_code == 200 and sse_text(healthy.text)[0] == MIXED


async def test_a_blacklisted_signed_caller_gets_403():
    caller = sdk.new_keypair()
    async with miner_server(options=BlacklistOptions()) as (url, miner_key, _):  # registered callers only
        body, headers = sign_openai(caller, miner_key, CHAT)
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(url + "/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 403 and "not registered" in response.json()["error"]["message"]


async def test_x_client_timeout_is_the_deadline():
    engine = DeadlineEngine(delay=0.05)
    async with miner_server(engine, deadline_margin=0.5) as (url, miner_key, _):
        document = {"messages": [{"role": "user", "content": LONG}], "stream": True}
        body, headers = sign_openai(sdk.new_keypair(), miner_key, document)
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(url + "/v1/chat/completions", content=body,
                                       headers={**headers, "X-Client-Timeout": "2"})
        assert time.monotonic() - started < 2.0
        text, finishes = sse_text(response.text)
        assert response.status_code == 200 and LONG.startswith(text) and text != LONG
        assert finishes == ["length"] and response.text.endswith("data: [DONE]\n\n")


async def test_without_x_client_timeout_the_deadline_is_max_timeout():
    engine = DeadlineEngine(delay=0.05)
    async with miner_server(engine, deadline_margin=0.5, max_timeout=2.0) as (url, miner_key, _):
        document = {"messages": [{"role": "user", "content": LONG}], "stream": True}
        body, headers = sign_openai(sdk.new_keypair(), miner_key, document)
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(url + "/v1/chat/completions", content=body, headers=headers)
        assert time.monotonic() - started < 2.0
        text, finishes = sse_text(response.text)
        assert response.status_code == 200 and LONG.startswith(text) and text != LONG
        assert finishes == ["length"] and response.text.endswith("data: [DONE]\n\n")


async def test_health_and_metrics():
    metrics = Metrics()
    async with miner_server(tiny_engine(), metrics=metrics) as (url, miner_key, _):
        async with httpx.AsyncClient(timeout=30) as http:
            health = (await http.get(url + "/health")).json()
            scraped = await http.get(url + "/metrics")
        assert health["status"] == "ok" and health["hotkey"] == miner_key.ss58_address
        assert health["serving"]["format"] == "random (tiny preset)"
        assert health["serving"]["dtype"] == dtype_name(select("cpu", "auto")[1])  # what dtype auto picks here
        assert scraped.status_code == 200 and "minercore_requests_total" in scraped.text


async def test_concurrent_v10_requests_from_one_endpoint_in_order():
    """One dendrite (one uuid) sending one request after another: each nonce newer than the last."""
    async with miner_server() as (url, miner_key, _):
        caller = sdk.new_keypair()
        for index in range(5):
            request = v10_request(caller, miner_key.ss58_address, [f"{index} {MIXED}"], dendrite_uuid="one")
            response = await post_v10(url, request)
            assert (response.status_code, response.text) == (200, f"{index} {MIXED}")


# ---- overload: every accepted caller gets a 200 with exact text before its timeout ------------------------------
@pytest.mark.slow
async def test_an_overloaded_miner_answers_every_caller_in_time():
    """64 callers, ~2,000-token prompts, 20 s timeouts, the real engine on this CPU: more work than the timeouts
    allow. Every caller gets 200 and an exact prefix of its echo, ended before its timeout."""
    timeout = 20.0
    engine = tiny_engine(max_batch=64, max_context=4096)
    # A 1 s margin: here the 64 callers share the miner's event loop and the 2-core CPU (with whatever else runs).
    async with miner_server(engine, max_new_tokens=4096, deadline_margin=1.0) as (url, miner_key, _):
        prompts = [f"{index}: {MIXED_2K}" for index in range(64)]
        requests = [v10_request(sdk.new_keypair(), miner_key.ss58_address, [prompt], timeout=timeout)
                    for prompt in prompts]
        limits = httpx.Limits(max_connections=len(prompts))

        async def call(http: httpx.AsyncClient, request) -> tuple[int, str, float]:
            started = time.monotonic()
            response = await asyncio.wait_for(
                http.post(url + "/StreamPrompting", content=request.body, headers=request.headers), timeout)
            return response.status_code, response.content.decode("utf-8"), time.monotonic() - started

        async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
            results = await asyncio.gather(*(call(http, request) for request in requests))
    for prompt, (status, text, elapsed) in zip(prompts, results, strict=True):
        assert status == 200, (status, text[:200])
        assert prompt.startswith(text)
        assert elapsed < timeout, elapsed
    assert sum(len(text) for _, text, _ in results) > 0  # the miner answered, not only ended at the deadline


# ---- a real bittensor-10 Dendrite ------------------------------------------------------------------------------
@pytest.mark.bt10
async def test_a_real_v10_dendrite_gets_the_mixed_prompt_exactly():
    async with miner_server() as (url, miner_key, _):
        port = int(url.rsplit(":", 1)[1])
        target = client.axon_info("127.0.0.1", port, miner_key.ss58_address)
        pieces = []
        result = await client.stream_prompt(target, ["first", MIXED_2K], wallet=sdk.new_keypair(), timeout=60,
                                            on_text=pieces.append)
        assert (result.status_code, result.status_message) == (200, "Success"), result
        assert result.text == "".join(pieces) == MIXED_2K
        wrong = client.axon_info("127.0.0.1", port, sdk.new_keypair().ss58_address)
        refused = await client.stream_prompt(wrong, ["x"], wallet=sdk.new_keypair(), timeout=60)
        assert refused.status_code == 401 and "axon hotkey" in refused.status_message
        again = await client.stream_prompt(target, [MIXED], wallet=sdk.new_keypair(), timeout=60)
        assert (again.status_code, again.text) == (200, MIXED)


@pytest.mark.bt10
async def test_a_real_v10_dendrite_sees_refusals_and_deadlines():
    denied = sdk.new_keypair()
    engine = DeadlineEngine(delay=0.05)
    options = BlacklistOptions(allow_unregistered=True, deny=frozenset({denied.ss58_address}))
    async with miner_server(engine, options=options, deadline_margin=0.5) as (url, miner_key, _):
        port = int(url.rsplit(":", 1)[1])
        target = client.axon_info("127.0.0.1", port, miner_key.ss58_address)
        refused = await client.stream_prompt(target, ["x"], wallet=denied, timeout=30)
        assert refused.status_code == 403 and "deny list" in refused.status_message
        started = time.monotonic()
        late = await client.stream_prompt(target, [LONG], wallet=sdk.new_keypair(), timeout=2.0)
        assert time.monotonic() - started < 2.5
        assert late.status_code == 200 and late.text and LONG.startswith(late.text) and late.text != LONG
