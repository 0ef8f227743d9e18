"""Group ``e2e``: what the extra HTTP hop costs: UpstreamBackend -> ``minercore serve`` versus the engine in-process.

``impl`` is ``upstream`` (``python -m minercore serve`` in a subprocess, as vLLM would be, streamed from over
loopback HTTP) or ``engine`` (the same engine options, called directly). The workload is the echo of a mixed
~500-token prompt at concurrency ``streams``. tokens/s = extra_info["tokens"] / mean; extra_info["ttft_median_s"]
is the median time to first piece over every stream of the timed rounds.
"""

import asyncio
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx
import pytest

from minercore.backends.upstream import UpstreamBackend
from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import GenerationRequest, SamplingParams
from minercore.engine import Engine

WORDS = ("Streams of text", "ça coule très bien", "流れる文字", "🚰💬", "naïve café", "κόσμε", "and more words\n")
PROMPT = " ".join(WORDS[k % len(WORDS)] for k in range(84))  # 504 GPT-2 tokens
OPTIONS = EngineOptions(max_batch=8, max_queue=64)


class ServeProcess:
    """``python -m minercore serve`` with the engine options above, on a free loopback port."""

    def __enter__(self) -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "minercore", "serve", "--port", str(port), "--compile", "off",
             "--max-batch", str(OPTIONS.max_batch), "--max-queue", str(OPTIONS.max_queue), "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up and self.process.poll() is None:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    return url
            except httpx.TransportError:
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"minercore serve did not come up: {self.process.stdout.read().decode()}")

    def __exit__(self, *_) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def echo(backend, ttfts: list[float]) -> int:
    began = time.perf_counter()
    parts, tokens = [], 0
    async for piece in backend.generate(GenerationRequest(prompt=PROMPT, sampling=SamplingParams(max_new_tokens=4096))):
        if not parts:
            ttfts.append(time.perf_counter() - began)
        parts.append(piece.text)
        if piece.stats is not None:
            tokens = piece.stats.tokens
    assert "".join(parts) == PROMPT
    return tokens


@pytest.fixture(scope="module")
def backends():
    loop = asyncio.new_event_loop()
    with ServeProcess() as url:
        upstream = UpstreamBackend(ModelOptions(backend="upstream", upstream_url=url + "/v1"), OPTIONS)
        engine = Engine(ModelOptions(preset="tiny", compile="off"), OPTIONS)
        loop.run_until_complete(upstream.start())
        loop.run_until_complete(engine.start())
        yield {"upstream": upstream, "engine": engine}, loop
        loop.run_until_complete(upstream.shutdown(grace=0))
        loop.run_until_complete(engine.shutdown(grace=0))
    loop.close()


@pytest.mark.parametrize("impl", ["upstream", "engine"])
@pytest.mark.parametrize("streams", [1, 8])
def test_upstream_hop(benchmark, backends, impl, streams):
    by_impl, loop = backends
    backend = by_impl[impl]
    ttfts: list[float] = []

    def run() -> int:
        async def round_() -> int:
            return sum(await asyncio.gather(*(echo(backend, ttfts) for _ in range(streams))))
        return loop.run_until_complete(round_())

    if not benchmark.disabled:  # plain pytest runs it once, untimed: no warm-up needed there
        run()  # connections, caches
        ttfts.clear()
    benchmark.group = "e2e"
    tokens = benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info.update(impl=impl, streams=streams, tokens=tokens, ttft_median_s=statistics.median(ttfts))
