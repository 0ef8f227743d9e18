"""Prometheus metrics: the collectors, the exporter, and the series the server and the upstream backend feed."""

import asyncio
import socket

import httpx
import pytest
from helpers import scrape

from minercore.backends import build_backend
from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import EngineStats, GenerationFailed, GenerationRequest
from minercore.engine import Engine
from minercore.serve.metrics import Metrics
from minercore.serve.server import create_app, serving

MIXED = "Prometheus sees «ça», 世界 and 🙂\n" * 3





class FixedStats:
    def __init__(self, active: int, queued: int, tokens_per_s: float):
        self.value = EngineStats(active, queued, 0, 0, 0, 0, 0, 0, 0.0, tokens_per_s)

    def stats(self) -> EngineStats:
        return self.value


def test_every_series_is_exported_and_registries_are_separate():
    metrics, other = Metrics(), Metrics()  # a second object must not collide with the first
    metrics.observe_request("eos", "validator", ttft_s=0.02, chunk_gaps=[0.01, 0.05], tokens=40)
    metrics.observe_request("overloaded", "unregistered")
    metrics.blacklist_rejected("not_registered")
    metrics.upstream_error("connect")
    metrics.sample(FixedStats(active=3, queued=2, tokens_per_s=123.5))
    port = metrics.start_http(0)
    try:
        with pytest.raises(RuntimeError, match="already running"):
            metrics.start_http(0)
        samples = scrape(port)
    finally:
        metrics.stop_http()
    assert samples['minercore_requests_total{caller_class="validator",outcome="eos"}'] == 1
    assert samples['minercore_requests_total{caller_class="unregistered",outcome="overloaded"}'] == 1
    assert samples['minercore_tokens_total{caller_class="validator"}'] == 40
    assert samples['minercore_ttft_seconds_count{caller_class="validator"}'] == 1
    assert samples['minercore_ttft_seconds_bucket{caller_class="validator",le="0.025"}'] == 1
    assert samples["minercore_chunk_gap_seconds_count"] == 2
    assert samples['minercore_blacklist_rejections_total{reason="not_registered"}'] == 1
    assert samples['minercore_upstream_errors_total{kind="connect"}'] == 1
    assert (samples["minercore_active_streams"], samples["minercore_queued_streams"]) == (3, 2)
    assert samples["minercore_backend_tokens_per_second"] == 123.5
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics")  # stopped
    assert other.registry.get_sample_value("minercore_requests_total",
                                           {"outcome": "eos", "caller_class": "validator"}) is None


async def test_server_traffic_shows_up_on_the_endpoint():
    metrics = Metrics()
    engine = Engine(ModelOptions(preset="tiny", compile="off"), EngineOptions(max_batch=4, flush_tokens=2))
    async with serving(create_app(engine, "minercore-tiny", metrics=metrics)) as url, \
            httpx.AsyncClient(base_url=url) as http:
        for stream in (True, False):
            response = await http.post("/v1/completions", json={"prompt": MIXED, "max_tokens": 500, "stream": stream})
            assert response.status_code == 200
        completion_tokens = response.json()["usage"]["completion_tokens"]  # the same for both
        assert (await http.post("/v1/completions", json={"prompt": "x", "n": 3})).status_code == 400
        async with http.stream("POST", "/v1/completions",
                               json={"prompt": MIXED * 30, "max_tokens": 4000, "stream": True}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    break  # the client leaves mid-stream
        cancelled = {"outcome": "cancelled", "caller_class": "http"}
        for _ in range(500):
            if metrics.registry.get_sample_value("minercore_requests_total", cancelled) == 1:
                break
            await asyncio.sleep(0.01)
        port = metrics.start_http(0)
        try:
            samples = scrape(port)
        finally:
            metrics.stop_http()
    assert samples['minercore_requests_total{caller_class="http",outcome="eos"}'] == 2
    assert samples['minercore_requests_total{caller_class="http",outcome="invalid"}'] == 1
    assert samples['minercore_requests_total{caller_class="http",outcome="cancelled"}'] == 1
    assert samples['minercore_ttft_seconds_count{caller_class="http"}'] == 3
    assert samples["minercore_chunk_gap_seconds_count"] > 2  # many chunks at flush_tokens=2
    assert samples['minercore_tokens_total{caller_class="http"}'] == 2 * completion_tokens  # none when cancelled
    assert samples["minercore_active_streams"] == 0  # read from the engine at scrape time
    assert samples["minercore_queued_streams"] == 0


async def test_upstream_errors_are_counted_by_kind():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends
    metrics = Metrics()
    backend = build_backend(ModelOptions(backend="upstream", upstream_url=f"http://127.0.0.1:{port}",
                                         upstream_model="m"), EngineOptions(), metrics=metrics)
    await backend.start()
    try:
        with pytest.raises(GenerationFailed, match="unreachable"):
            async for _ in backend.generate(GenerationRequest(prompt="x")):
                pass
    finally:
        await backend.shutdown(grace=0)
    assert metrics.registry.get_sample_value("minercore_upstream_errors_total", {"kind": "connect"}) == 3
