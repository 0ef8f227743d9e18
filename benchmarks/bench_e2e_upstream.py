"""Group ``e2e``: what the upstream backend's extra hop costs a miner, end to end through real dendrites.

``impl``: ``miner-upstream`` (dendrite -> ``neurons/miner.py --offline --model.backend upstream`` -> ``python -m
minercore serve``, over loopback HTTP, as a miner fronting vLLM would run) or ``miner-engine`` (dendrite ->
``neurons/miner.py --offline`` with the engine in-process). The serve and both miners are subprocesses with the
same model options (tiny preset, echo, the same compile and device choice, default engine options), all started
once and queried by this process's dendrites, one per stream, in the same run.

The workload is the echo of a mixed ~500-token prompt (prose, accents, CJK, emoji, newlines) at 1 and 8
concurrent streams; every text is asserted byte-exact. extra_info: ``impl``, ``streams``, ``tokens`` (GPT-2
tokens of the prompt times streams: what one round delivers), ``median_ttft_s`` (request to first text,
median over every stream of the measured rounds) and ``tokens_per_s`` (tokens / round wall time, median over
rounds). The ``miner-upstream`` entries also carry the hop's cost relative to ``miner-engine`` at the same
concurrency, measured earlier in the same run: ``ttft_vs_engine`` and ``tokens_per_s_vs_engine`` (ratios) and
``ttft_extra_s`` (the difference in median TTFT).

Plain ``pytest`` runs one short round per entry, untimed; ``--benchmark-only`` adds a warm-up round and
times ``ROUNDS``.
"""

import asyncio
import contextlib
import itertools
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from minercore.miner import client
from minercore.text.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300.0  # a compile warm-up on CUDA (compile auto) takes minutes; on CPU, seconds
ROUND_TIMEOUT_S = 600.0
ROUNDS = 7  # a round is seconds on a CPU; more of them steady the medians on a shared machine
# The same for the serve and the engine miner, so that the only difference is the hop. auto: compiled on CUDA,
# eager on a CPU, as each would run in production.
COMPILE = "auto"

# Short lines, so that the prompt can stop close to its token budget (a line of CJK or emoji is dozens of tokens).
LINES = ("A miner may front a bigger model served elsewhere; each request then crosses one more HTTP hop.",
         "Crème brûlée, naïve façade, Zürich, São Paulo, Kraków, Ærøskøbing.",
         "東京は日本の首都です。我们今天去公园吧！한국어 문장입니다.",
         "Emoji: 😀 🎉 👩‍👩‍👧 🇯🇵 👍🏽 🚀",
         "")


def mixed_prompt(max_tokens: int = 500) -> str:
    """Numbered lines of prose, accents, CJK, emoji and blank lines, as many as fit in ``max_tokens``."""
    tokenizer = load_tokenizer("gpt2")
    text = ""
    for i in itertools.count():
        line = LINES[i % len(LINES)]
        longer = f"{text}{i}. {line}\n" if line else f"{text}\n"
        if len(tokenizer.encode(longer)) > max_tokens:
            return text
        text = longer
    raise AssertionError("unreachable")


PROMPT = mixed_prompt()
PROMPT_TOKENS = len(load_tokenizer("gpt2").encode(PROMPT))
assert 450 <= PROMPT_TOKENS <= 500, PROMPT_TOKENS
MEASURED: dict[tuple[str, int], dict[str, float]] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def subprocess_running(command: list[str], log_path: Path, ready, stop_signal: int):
    """Run ``command`` until the block ends; wait until ``ready()`` before entering it."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{' '.join(command[:3])} did not start:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.1)
        yield
    finally:
        if process.poll() is None:
            process.send_signal(stop_signal)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def answers_health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def serve_process(directory: Path):
    """``python -m minercore serve`` (tiny, echo) on a free loopback port; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["-m", "minercore", "serve", "--host", "127.0.0.1", "--port", str(port), "--preset", "tiny",
               "--compile", COMPILE, "--log-level", "warning"]
    # SIGINT: uvicorn's own graceful stop.
    with subprocess_running(command, directory / "serve.log", lambda: answers_health(url), signal.SIGINT):
        yield url


@contextlib.contextmanager
def miner_process(directory: Path, *model_args: str):
    """An offline miner on a free loopback port; yields the dendrite's target once it wrote its info file."""
    info_file = directory / "axon.json"
    command = ["neurons/miner.py", "--offline", "--axon.port", str(free_port()), "--wallet.path",
               str(directory / "wallets"), "--axon.info_file", str(info_file), "--neuron.shutdown_grace", "1",
               *model_args]
    with subprocess_running(command, directory / "miner.log", info_file.exists, signal.SIGTERM):
        yield client.target_from_info_file(str(info_file))


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(serve_process(tmp_path_factory.mktemp("serve")))
        upstream = stack.enter_context(miner_process(
            tmp_path_factory.mktemp("miner-upstream"), "--model.backend", "upstream",
            "--model.upstream_url", url + "/v1"))
        engine = stack.enter_context(miner_process(
            tmp_path_factory.mktemp("miner-engine"), "--model.preset", "tiny", "--model.compile", COMPILE))
        yield {"miner-upstream": upstream, "miner-engine": engine}


async def network_round(target, streams: int) -> list[float]:
    """TTFTs of ``streams`` concurrent echoes, each through its own dendrite; asserts every text byte-exact."""
    results = await client.stream_many(target, [PROMPT] * streams, wallet=client.ephemeral_keypair(),
                                       timeout=ROUND_TIMEOUT_S)
    for result in results:
        assert result.ok, result.status_message or result.error
        assert result.text.encode("utf-8") == PROMPT.encode("utf-8")
    return [result.ttft_s for result in results]


# streams is the outer loop, so each concurrency's engine entry is measured just before its upstream entry.
@pytest.mark.parametrize("streams", [1, 8])
@pytest.mark.parametrize("impl", ["miner-engine", "miner-upstream"])
def test_e2e_upstream(benchmark, request, targets, impl, streams):
    rounds: list[tuple[float, list[float]]] = []  # (wall seconds, TTFTs)

    def run_round() -> None:
        start = time.perf_counter()
        ttfts = asyncio.run(network_round(targets[impl], streams))
        rounds.append((time.perf_counter() - start, ttfts))

    timed = request.config.getoption("benchmark_only")
    if timed:
        run_round()  # warm-up: the first connections, the upstream's model lookup, allocator caches
        rounds.clear()
    benchmark.group = "e2e"
    benchmark.pedantic(run_round, rounds=ROUNDS if timed else 1, iterations=1)

    tokens = PROMPT_TOKENS * streams
    result = {"median_ttft_s": statistics.median(t for _, ttfts in rounds for t in ttfts),
              "tokens_per_s": statistics.median(tokens / wall for wall, _ in rounds)}
    MEASURED[impl, streams] = result
    benchmark.extra_info.update(impl=impl, streams=streams, tokens=tokens, **result)
    engine = MEASURED.get(("miner-engine", streams))
    if impl != "miner-upstream" or engine is None:
        return
    benchmark.extra_info["ttft_vs_engine"] = result["median_ttft_s"] / engine["median_ttft_s"]
    benchmark.extra_info["ttft_extra_s"] = result["median_ttft_s"] - engine["median_ttft_s"]
    benchmark.extra_info["tokens_per_s_vs_engine"] = result["tokens_per_s"] / engine["tokens_per_s"]
    print(f"\ne2e upstream hop, {streams} streams: " + json.dumps(
        {k: v for k, v in benchmark.extra_info.items() if isinstance(v, float)}), file=sys.stderr)
