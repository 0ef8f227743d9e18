"""Group ``peers``: ``minercore serve`` against llama.cpp's ``llama-server`` on the same GGUF (the embedded
SmolLM2-135M-Instruct, Q4_1), the same machine (each with every usable core as its threads: llama-server's
``-t``, minercore's serving default), the same requests, one after the other in one run.

Each server runs as a subprocess on loopback; a round is ``streams`` concurrent streamed chat completions of
"write a long essay about ..." prompts, greedy, ``max_tokens`` tokens each with ``ignore_eos`` (every server
takes it), so every answer has the same length. extra_info: ``server``, ``streams``, ``tokens_per_s`` (answer
tokens of the round / its wall time), ``median_ttft_s``, ``rss_mb`` (the server's resident memory after the
round), ``rss_ready_mb`` (once it first answered /health); on minercore's, ``weights_mb``, ``kv_cache_mb`` and
``ready_over_weights_and_kv_mb`` (what it held ready beyond its weights and KV cache, from its /health), and
``over_llama_cpp`` and ``over_transformers`` (its tokens/s over the peer's at the same streams).
``minercore`` serves with its defaults (the paged KV cache, its pool sized by default); ``minercore-static``
is the same server with the static cache, every slot holding its full context; ``minercore-float`` the same
server with ``--activations float`` (the file's blocks times float rows, exactly, where the defaults round the rows
to int8 per block as llama.cpp does). ``transformers`` is ``peer_transformers.py``: ``generate`` with a
``TextIteratorStreamer`` in a thread per request, on the same GGUF (dequantized by transformers), in minercore's
dtype.

llama-server is found through ``LLAMA_SERVER`` (a path; ``../shared/notes/real-model.md`` says how to build
it here). Without it its entries say so and measure nothing; the others are measured all the same.

Timed (``--benchmark-only``): 128 tokens an answer and minercore as it serves by default (compiled). Untimed
(the test suite's one pass): 8 tokens and no compilation, so that the suite checks the benchmark runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from minercore.models.loading import embedded

ROOT = Path(__file__).resolve().parents[1]
THREADS = max(1, len(os.sched_getaffinity(0)))
TOPICS = ["the history of Paris", "how bridges carry load", "the water cycle", "the printing press",
          "volcanoes", "the Roman roads", "honeybees", "tides", "the first computers", "coffee",
          "the Silk Road", "glaciers", "lighthouses", "the violin", "photosynthesis", "chess openings"]
START_TIMEOUT_S = 900
MEASURED: dict[tuple[str, int], float] = {}
# Setup starts four servers; minercore's two compile their steps, which cold (no inductor cache) took over 7
# minutes on two cores.
pytestmark = pytest.mark.timeout(3600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], port: int, log: Path):
    """Start a server, wait for its /health to answer 200; yield (base URL, process, its resident bytes once
    ready); SIGTERM it after."""
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{command[0]} did not start:\n{log.read_text(errors='replace')[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield base, process, psutil.Process(process.pid).memory_info().rss
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return embedded.resolve("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def timed(request) -> bool:
    return bool(request.config.getoption("benchmark_only"))


@pytest.fixture(scope="module")
def servers(tmp_path_factory, gguf_path, timed):
    logs = tmp_path_factory.mktemp("peers")
    with contextlib.ExitStack() as running:
        port = free_port()
        command = [sys.executable, "-m", "minercore", "serve", "--path", gguf_path, "--mode", "generate",
                   "--port", str(port), "--max-batch", "16", "--max-context", "2048", "--log-level", "warning"]
        if not timed:
            command += ["--compile", "off"]
        found = {"minercore": running.enter_context(server(command, port, logs / "minercore.log"))}
        port = free_port()
        static = [*command[:command.index("--port")], "--port", str(port),
                  *command[command.index("--port") + 2:], "--kv-cache", "static"]
        found["minercore-static"] = running.enter_context(server(static, port, logs / "minercore-static.log"))
        port = free_port()
        exact = [*command[:command.index("--port")], "--port", str(port),
                 *command[command.index("--port") + 2:], "--activations", "float"]
        found["minercore-float"] = running.enter_context(server(exact, port, logs / "minercore-float.log"))
        port = free_port()
        found["transformers"] = running.enter_context(server(
            [sys.executable, str(ROOT / "benchmarks" / "peer_transformers.py"), gguf_path, str(port)], port,
            logs / "transformers.log"))
        binary = os.environ.get("LLAMA_SERVER")
        if binary and Path(binary).is_file():
            port = free_port()
            found["llama.cpp"] = running.enter_context(server(
                [binary, "-m", gguf_path, "-t", str(THREADS), "-np", "16", "-c", str(16 * 2048), "--port",
                 str(port)], port, logs / "llama-server.log"))
        yield found


async def one_stream(http: httpx.AsyncClient, base: str, topic: str, tokens: int) -> tuple[float, str]:
    body = {"messages": [{"role": "user", "content": f"Write a long essay about {topic}."}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start, ttft, finish = time.perf_counter(), None, None
    async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", ()):
                if ttft is None and (choice.get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - start
                finish = choice.get("finish_reason") or finish
    return ttft if ttft is not None else float("nan"), finish


async def round_of(base: str, streams: int, tokens: int) -> tuple[float, list[float]]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(http, base, TOPICS[i % len(TOPICS)], tokens)
                                         for i in range(streams)))
        wall = time.perf_counter() - start
    assert all(finish == "length" for _, finish in results), results  # ignore_eos: every answer is full length
    return wall, [ttft for ttft, _ in results]


@pytest.mark.parametrize("streams", [1, 8, 16])
@pytest.mark.parametrize("name", ["llama.cpp", "transformers", "minercore", "minercore-static", "minercore-float"])
def test_peers(benchmark, servers, timed, name, streams) -> None:
    benchmark.group = "peers"
    threads = {"llama.cpp": THREADS, "transformers": "torch default"}.get(name, "serving default")
    benchmark.extra_info.update(server=name, streams=streams, threads=threads)
    if name not in servers:
        benchmark.extra_info["status"] = "llama-server not installed (set LLAMA_SERVER): nothing measured"
        print(f"\npeers: {benchmark.extra_info['status']}")
        return
    base, process, rss_ready = servers[name]
    tokens = 128 if timed else 8
    if timed:
        asyncio.run(round_of(base, streams, tokens))  # warm-up: this batch size's first steps
    rounds: list[tuple[float, list[float]]] = []
    benchmark.pedantic(lambda: rounds.append(asyncio.run(round_of(base, streams, tokens))), rounds=1,
                       iterations=1)
    wall, ttfts = rounds[-1]
    rate = streams * tokens / wall
    MEASURED[name, streams] = rate
    rss = psutil.Process(process.pid).memory_info().rss
    benchmark.extra_info.update(tokens=streams * tokens, tokens_per_s=round(rate, 1),
                                median_ttft_s=round(statistics.median(ttfts), 3), rss_mb=round(rss / 2**20),
                                rss_ready_mb=round(rss_ready / 2**20))
    if name.startswith("minercore"):
        # What the server holds by design: its weights and its KV cache (the paged pool, or every slot's full
        # context); the rest of its resident memory is the runtime's (torch, compiled code, buffers).
        serving = httpx.get(f"{base}/health", timeout=10).json()["serving"]
        held = serving["weights_bytes"] + serving["kv_cache_bytes"]
        benchmark.extra_info.update(weights_mb=round(serving["weights_bytes"] / 2**20),
                                    kv_cache_mb=round(serving["kv_cache_bytes"] / 2**20),
                                    ready_over_weights_and_kv_mb=round((rss_ready - held) / 2**20))
    if name.startswith("minercore"):
        for peer in ("llama.cpp", "transformers"):
            if (peer, streams) in MEASURED:
                benchmark.extra_info[f"over_{peer.replace('.', '_')}"] = round(rate / MEASURED[peer, streams], 2)
