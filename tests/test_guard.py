"""guard.py, the axon's HTTP-level defences, unit by unit: the body check (the route's dependency), the request
guard (body size, content type, headers, broken streams), the watched streaming response, and nonce pruning."""

import asyncio
import json
import time

import pytest
from bittensor.core.stream import BTStreamingResponseModel
from starlette.requests import Request

from minercore.miner.config import DEFAULT_MAX_BODY_BYTES, build_config
from minercore.miner.guard import (
    MalformedBody,
    RequestGuard,
    StreamBroken,
    WatchedStreamingResponse,
    body_checker,
    prune_nonces,
)
from minercore.miner.protocol import StreamPrompting

TYPES = {"StreamPrompting": StreamPrompting}


# ---- the body check (the route's dependency) ------------------------------------------------------------------
def http_request(body: bytes, headers: dict[str, str], path: str = "/StreamPrompting") -> Request:
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    raw = [(k.lower().encode(), v.encode()) for k, v in {"content-type": "application/json", **headers}.items()]
    return Request({"type": "http", "method": "POST", "path": path, "headers": raw, "query_string": b""}, receive)


def honest(synapse: StreamPrompting) -> tuple[bytes, dict[str, str]]:
    return json.dumps(synapse.model_dump()).encode(), {"computed_body_hash": synapse.body_hash}


async def test_the_body_check_returns_the_body_of_an_honest_request():
    body, headers = honest(StreamPrompting(roles=["user"], messages=["hi 👋"]))
    document = await body_checker(TYPES)(http_request(body, headers))
    assert document["messages"] == ["hi 👋"]


@pytest.mark.parametrize("body, message", [
    (b"{not json", "the request body is not a JSON document"),
    (b"[" * 50_000 + b"]" * 50_000, "the request body is not a JSON document"),
    (b'"a string"', "the request body must be a JSON object of StreamPrompting's fields"),
    (b'{"roles": ["user"], "messages": [1]}', "does not fit StreamPrompting: messages.0: Input should be a valid "
                                              "string"),
    (b'{"roles": [null], "messages": ["a"]}', "roles.0: Input should be a valid string"),
    (b'{"roles": ["user"]}', "messages: Field required"),
    (b'{"roles": "user", "messages": {"a": 1}}', "roles: Input should be a valid list; messages: Input should be"),
    (b'{"roles": ["user"], "messages": ' + json.dumps(list(range(10))).encode() + b"}", "6 more errors"),
    (b'{"roles": ["user"], "messages": ["tampered"]}', "does not match the computed_body_hash header"),
])
async def test_the_body_check_refuses_with_a_reason(body, message):
    _, headers = honest(StreamPrompting(roles=["user"], messages=["original"]))
    with pytest.raises(MalformedBody, match=message.replace("(", r"\(")) as refused:
        await body_checker(TYPES)(http_request(body, headers))
    assert "1," not in str(refused.value)  # names the wrong fields, never echoes their values


# ---- the request guard ---------------------------------------------------------------------------------------
class App:
    """An ASGI app that records that it ran and answers with the given messages."""

    def __init__(self, *messages: dict) -> None:
        self.messages = messages or ({"type": "http.response.start", "status": 200, "headers": []},
                                     {"type": "http.response.body", "body": b"ok", "more_body": False})
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        for message in self.messages:
            if message.get("break"):
                scope["minercore.exchange"].broken = True
                continue
            await send(message)


async def through_guard(app: App, headers: dict[str, str], path: str = "/StreamPrompting",
                        max_body_bytes: int = 1000) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        raise AssertionError("the guard must not read the body")

    async def send(message):
        sent.append(message)

    synapse_headers = StreamPrompting(roles=["user"], messages=["hi"]).to_headers()
    raw = [(k.lower().encode(), v.encode()) for k, v in {**synapse_headers, **headers}.items()]
    scope = {"type": "http", "method": "POST", "path": path, "headers": raw}
    await RequestGuard(app, max_body_bytes, TYPES)(scope, receive, send)
    return sent


def refusal(sent: list[dict]) -> tuple[int, str]:
    assert sent[-1]["more_body"] is False
    return sent[0]["status"], json.loads(sent[1]["body"])["message"]


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("headers, status, message", [
    ({**JSON, "content-length": "1001"}, 413,
     "the request body is 1001 bytes; this miner accepts at most 1000 (--axon.max_body_bytes)"),
    ({**JSON, "transfer-encoding": "chunked"}, 411, "send the request body with a Content-Length header"),
    ({"content-type": "text/plain", "content-length": "10"}, 415, "as application/json, not text/plain"),
    ({"content-length": "10"}, 415, "as application/json, not without a type"),
    ({**JSON, "content-length": "10", "timeout": "soon"}, 400,
     "the request headers do not fit StreamPrompting: timeout: Value error, could not convert string to float"),
    ({**JSON, "content-length": "10", "bt_header_input_obj_messages": "IiI="}, 400,
     "the request headers do not fit StreamPrompting: messages: Input should be a valid list"),
])
async def test_the_guard_refuses_before_the_app_runs(headers, status, message):
    app = App()
    got_status, got_message = refusal(await through_guard(app, headers))
    assert got_status == status and message in got_message, got_message
    assert app.calls == 0


async def test_the_guard_lets_acceptable_requests_and_other_routes_through():
    for headers, path in (({**JSON, "content-length": "1000"}, "/StreamPrompting"),
                          ({**JSON, "content-type": "application/vnd.minercore+json; charset=utf-8"},
                           "/StreamPrompting"),
                          ({"content-type": "text/plain", "timeout": "soon"}, "/Unknown")):  # bittensor: 404
        app = App()
        sent = await through_guard(app, headers, path)
        assert app.calls == 1 and sent[-1] == {"type": "http.response.body", "body": b"ok", "more_body": False}


async def test_the_guard_withholds_the_end_of_a_broken_stream():
    start = {"type": "http.response.start", "status": 200, "headers": []}
    text = {"type": "http.response.body", "body": b"partial", "more_body": True}
    end = {"type": "http.response.body", "body": b"", "more_body": False}
    assert await through_guard(App(start, text, end), JSON) == [start, text, end]
    assert await through_guard(App(start, text, {"break": True}, end), JSON) == [start, text]


def test_the_body_limit_is_configurable():
    assert build_config(["--offline"]).axon.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 4 * 1024 * 1024
    assert build_config(["--offline", "--axon.max_body_bytes", "65536"]).axon.max_body_bytes == 65536


# ---- the watched streaming response -------------------------------------------------------------------------
def watched(streamer) -> WatchedStreamingResponse:
    return WatchedStreamingResponse(BTStreamingResponseModel(token_streamer=streamer),
                                    synapse=StreamPrompting(roles=["user"], messages=["hi"]))


async def test_a_disconnect_cancels_the_streamer_at_once():
    disconnect = asyncio.Event()
    cleaned_up = asyncio.Event()
    sent: list[dict] = []

    async def streamer(send):
        try:
            await send({"type": "http.response.body", "body": b"a", "more_body": True})
            disconnect.set()
            await asyncio.sleep(3600)  # a generation that would run on
        finally:
            cleaned_up.set()

    async def receive():
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(watched(streamer)({"type": "http"}, receive, send), 5)
    assert cleaned_up.is_set()
    assert [m.get("body") for m in sent[1:]] == [b"a"]  # no end-of-body after a disconnect


async def test_a_finished_stream_stops_watching_and_ends_the_body():
    receiving = asyncio.Event()
    sent: list[dict] = []

    async def streamer(send):
        await receiving.wait()
        await send({"type": "http.response.body", "body": b"all", "more_body": True})

    async def receive():
        receiving.set()
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    exchange = type("Exchange", (), {"broken": False})()
    await asyncio.wait_for(watched(streamer)({"type": "http", "minercore.exchange": exchange}, receive, send), 5)
    assert sent[0]["status"] == 200 and [m["body"] for m in sent[1:]] == [b"all", b""]
    assert not exchange.broken


async def test_a_broken_stream_is_marked_and_other_failures_propagate():
    async def broken(send):
        raise StreamBroken("model step failed")

    async def failing(send):
        raise OSError("connection reset")

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        pass

    exchange = type("Exchange", (), {"broken": False})()
    await watched(broken)({"type": "http", "minercore.exchange": exchange}, receive, send)
    assert exchange.broken
    with pytest.raises(OSError, match="connection reset"):
        await watched(failing)({"type": "http"}, receive, send)


async def test_a_connection_that_cannot_be_watched_still_streams_to_the_end():
    sent: list[dict] = []

    async def streamer(send):
        for _ in range(3):
            await asyncio.sleep(0.01)  # the watch fails meanwhile
            await send({"type": "http.response.body", "body": b"x", "more_body": True})

    async def receive():
        raise RuntimeError("Unexpected message received: http.request")

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(watched(streamer)({"type": "http"}, receive, send), 5)
    assert [m["body"] for m in sent[1:]] == [b"x", b"x", b"x", b""]


# ---- forgetting old nonces ------------------------------------------------------------------------------------
def test_prune_nonces_keeps_what_is_recent():
    now = time.time_ns()
    nonces = {"old": now - 100 * 10**9, "edge": now - 59 * 10**9, "new": now, "future": now + 10**12}
    assert prune_nonces(nonces, 60.0) == 1
    assert set(nonces) == {"edge", "new", "future"}
