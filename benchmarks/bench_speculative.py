"""Group ``speculative``: prompt-lookup speculative decoding against plain decoding, side by side in one run.

- ``test_echo_through_miner[off|ngram]``: bench_e2e's ~2,000-token mixed echo through the miner
  (neurons/miner.py --offline, the tiny model, its defaults but ``--engine.speculative``), one stream, queried
  over loopback as a validator would; text asserted byte-exact.
- ``test_chat[workload-streams-off|ngram]``: SmolLM2-135M-Instruct from its GGUF at the serving defaults (dtype
  and quantization ``auto``), in-process, greedy, 128-token answers: ``grounded`` chats (repeat a given
  paragraph, fix given code: text to copy) and ``open`` ones (stories: little to copy), at 1 and 8 streams.

extra_info: ``tokens_per_s`` (tokens the callers received over the round's wall time, median over rounds);
the ``ngram`` entries add ``speedup`` (over ``off`` in the same run), and the chats ``identical`` (every answer
equal to plain decoding's), ``acceptance`` and ``tokens_per_step`` (per verify forward).
Untimed (the test suite's single pass) the chats are 32 tokens from an eager model and the echo one round: it
proves they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time

import pytest
from bench_e2e import PROMPT, PROMPT_TOKENS, free_port, subprocess_miner

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import GenerationRequest, SamplingParams
from minercore.engine import Engine
from minercore.miner import client

ROUNDS = 3
MODES = ("off", "ngram")
PARAGRAPH = ("The river rose slowly through the night, and by morning the low fields near the mill were under "
             "water. The miller's family carried sacks of grain to the upper floor, while the neighbours brought "
             "boats to ferry the animals to the hill behind the church.")
CODE = ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(value)\n"
        "\n\ndef median(values):\n    ordered = sorted(values)\n    return ordered[len(ordered) // 2]\n")
GROUNDED = [f"Repeat the following paragraph exactly:\n\n{PARAGRAPH}",
            f"Fix the bug in this code and show the whole corrected code:\n\n{CODE}"]
OPEN = ["Write a short story about a robot who learns to paint.", "Describe a busy market in a small town.",
        "Explain why the sky is blue to a child.", "Write a letter to a friend about a trip to the sea."]
WORKLOADS = {"grounded": GROUNDED, "open": OPEN}
MEASURED: dict[tuple, dict] = {}


@pytest.fixture(scope="module")
def miners(tmp_path_factory):
    found = {}
    with contextlib.ExitStack() as running:
        for mode in MODES:
            directory = tmp_path_factory.mktemp(f"miner-{mode}")
            found[mode] = running.enter_context(subprocess_miner(directory, [
                "neurons/miner.py", "--offline", "--model.preset", "tiny", "--engine.speculative", mode,
                "--axon.port", str(free_port()), "--wallet.path", str(directory / "wallets"),
                "--axon.info_file", str(directory / "axon.json"), "--neuron.shutdown_grace", "1"]))
        yield found


@pytest.mark.parametrize("mode", MODES)
def test_echo_through_miner(benchmark, request, miners, mode):
    walls: list[float] = []

    def run_round() -> None:
        started = time.perf_counter()
        [result] = asyncio.run(client.stream_many(miners[mode], [PROMPT], wallet=client.ephemeral_keypair(),
                                                  timeout=600.0))
        walls.append(time.perf_counter() - started)
        assert result.ok, result.status_message or result.error
        assert result.text.encode() == PROMPT.encode()

    timed = request.config.getoption("benchmark_only")
    if timed:
        run_round()  # warm-up: connections, the first prefill
        walls.clear()
    benchmark.group = "speculative"
    benchmark.pedantic(run_round, rounds=ROUNDS if timed else 1, iterations=1)
    rate = statistics.median(PROMPT_TOKENS / wall for wall in walls)
    MEASURED["echo", mode] = {"tokens_per_s": rate}
    benchmark.extra_info.update(workload="echo through the miner", mode=mode, streams=1, tokens=PROMPT_TOKENS,
                                tokens_per_s=rate)
    plain = MEASURED.get(("echo", "off"))
    if mode == "ngram" and plain is not None:
        benchmark.extra_info["speedup"] = rate / plain["tokens_per_s"]
        print(f"\necho through the miner: {rate:.0f} tok/s, x{benchmark.extra_info['speedup']:.2f}", file=sys.stderr)


class Engines:
    """One engine at a time, ``off`` or ``ngram``, started on demand: two alive in one process would each keep
    their model thread's OpenMP workers, more than the cores, which slows both (RESULTS.md)."""

    def __init__(self, compile: str) -> None:
        from minercore.models.loading import embedded

        self.path = embedded.resolve("smollm2-135m-instruct")
        self.compile = compile
        self.loop = asyncio.new_event_loop()
        self.mode: str | None = None
        self.engine: Engine | None = None

    def get(self, mode: str) -> Engine:
        if mode != self.mode:
            self.close()
            engine = Engine(ModelOptions(path=self.path, mode="generate", compile=self.compile),
                            EngineOptions(max_batch=8, speculative=mode))
            self.loop.run_until_complete(engine.start())
            self.engine, self.mode = engine, mode
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.loop.run_until_complete(self.engine.shutdown(grace=0))
            self.engine = self.mode = None


@pytest.fixture(scope="module")
def engines(request):
    # Untimed, the chats only prove they run: eager spares the test suite two compiles of the model.
    built = Engines("auto" if request.config.getoption("benchmark_only") else "off")
    yield built
    built.close()
    built.loop.close()


async def chat_round(engine: Engine, prompts: list[str], tokens: int) -> tuple[list[str], int]:
    async def one(prompt: str) -> str:
        request = GenerationRequest(messages=[{"role": "user", "content": prompt}],
                                    sampling=SamplingParams(max_new_tokens=tokens))
        return "".join([piece.text async for piece in engine.generate(request)])

    before = engine.stats().tokens
    texts = await asyncio.gather(*(one(p) for p in prompts))
    return list(texts), engine.stats().tokens - before


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("streams", [1, 8])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_chat(benchmark, request, engines, workload, streams, mode):
    engine, loop = engines.get(mode), engines.loop
    timed = request.config.getoption("benchmark_only")
    tokens = 128 if timed else 32
    base = WORKLOADS[workload]
    prompts = [base[i % len(base)] for i in range(streams)]
    rates: list[float] = []
    answers: list[list[str]] = []
    stats_before = engine.stats()

    def run_round() -> None:
        started = time.perf_counter()
        texts, generated = loop.run_until_complete(chat_round(engine, prompts, tokens))
        rates.append(generated / (time.perf_counter() - started))
        answers.append(texts)

    if timed:
        run_round()
        rates.clear()
    benchmark.group = "speculative"
    benchmark.pedantic(run_round, rounds=ROUNDS if timed else 1, iterations=1)
    stats = engine.stats()
    rate = statistics.median(rates)
    MEASURED[workload, streams, mode] = {"tokens_per_s": rate, "answers": answers[-1]}
    benchmark.extra_info.update(workload=workload, mode=mode, streams=streams, tokens_per_answer=tokens,
                                tokens_per_s=rate)
    plain = MEASURED.get((workload, streams, "off"))
    if mode == "ngram" and plain is not None:
        verify_steps = stats.verify_steps - stats_before.verify_steps
        drafted = stats.draft_tokens - stats_before.draft_tokens
        accepted = stats.accepted_tokens - stats_before.accepted_tokens
        benchmark.extra_info.update(
            speedup=rate / plain["tokens_per_s"], identical=plain["answers"] == answers[-1],
            acceptance=accepted / drafted if drafted else 0.0,
            tokens_per_step=(accepted + verify_steps) / verify_steps if verify_steps else 1.0)
        print(f"\n{workload} x{streams}: {rate:.0f} tok/s, x{benchmark.extra_info['speedup']:.2f}, identical "
              f"{benchmark.extra_info['identical']}", file=sys.stderr)
