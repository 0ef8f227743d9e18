"""The miner with the upstream backend, end to end over loopback: StreamPrompting callers (real 10.x dendrites,
or requests signed as they sign) -> ``neurons/miner.py --offline
--model.backend upstream`` (a subprocess) -> ``python -m minercore serve`` (another subprocess, tiny model, echo).

Byte-exact echoes through both hops, concurrent dendrites, and the upstream going away and coming back on the
same port while the miner keeps running. One serve and one miner for the whole module: each costs seconds of
start-up on a small CPU box.
"""

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port, stream_prompt
from streamloop_corpus import CORPUS

from minercore.miner import client
from minercore.text.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0  # torch import and the tiny model's build on a busy 2-core machine
STOP_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 120.0
# An unreachable upstream costs the miner a refused connect plus two short backoffs (0.25 s in all); the rest
# is the dendrite's own signing and HTTP round trip. Generous for a shared CPU, far below any stream timeout.
FAST_FAILURE_S = 5.0
# The miner's upstream slots (and so its connection pool): few enough that a slot leaked by a failed call would
# show, as streams that queue until their deadline instead of running.
SLOTS = 4

PARAGRAPH = ("Validators score what a miner streams back and how soon it arrives; behind this miner another "
             "server does the generating. Crème brûlée, naïve façade, São Paulo, Zürich, Kraków.\n"
             "東京は日本の首都です。我们今天去公园吧！한국어 문장입니다.\n"
             "Emoji: 😀 🎉 👩‍👩‍👧 🇯🇵 👍🏽 🚀\n\n")


def mixed_prompt(max_tokens: int, salt: str = "") -> str:
    """Numbered paragraphs of prose, accents, CJK, emoji and newlines, each followed by one text of the
    detokenizer stress corpus (controls, CR/LF variants, RTL, ZWJ sequences): as many as fit in ``max_tokens``
    GPT-2 tokens. ``salt`` makes otherwise equal prompts distinguishable."""
    tokenizer = load_tokenizer("gpt2")
    corpus = list(CORPUS.values())
    text = ""
    for i in itertools.count():
        longer = f"{text}{salt}{i}. {PARAGRAPH}{corpus[i % len(corpus)]}\n"
        if len(tokenizer.encode(longer)) > max_tokens:
            assert text, f"not even one paragraph fits in {max_tokens} tokens"
            return text
        text = longer
    raise AssertionError("unreachable")



def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _stop_process(process: subprocess.Popen, sig: int) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class ServeProcess:
    """``python -m minercore serve`` on a fixed loopback port, so that it can be stopped and started again where
    the miner expects it. Every run appends to the same log."""

    def __init__(self, directory: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_file = directory / "serve.log"
        self.process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        command = [sys.executable, "-m", "minercore", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--preset", "tiny", "--compile", "off", "--device", "cpu", "--log-level", "warning"]
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # uvicorn listens only after the app's lifespan built the model: /health answers then
            if self.process.poll() is not None:
                pytest.fail(f"minercore serve exited with {self.process.returncode}:\n{_tail(self.log_file)}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"minercore serve did not answer /health in {START_TIMEOUT_S:g}s:\n"
                            f"{_tail(self.log_file)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process, signal.SIGINT)  # uvicorn's graceful stop: it closes idle keep-alives


class MinerProcess:
    """``neurons/miner.py --offline`` with the upstream backend; ready once it wrote its axon info file."""

    def __init__(self, directory: Path, upstream_url: str, start_timeout: float = START_TIMEOUT_S) -> None:
        self.info_file = directory / "axon.json"
        self.log_file = directory / "miner.log"
        command = [sys.executable, "neurons/miner.py", "--offline", "--axon.port", str(free_port()),
                   "--wallet.path", str(directory / "wallets"), "--axon.info_file", str(self.info_file),
                   "--model.backend", "upstream", "--model.upstream_url", upstream_url,
                   "--engine.max_batch", str(SLOTS), "--engine.max_queue", str(SLOTS), "--neuron.shutdown_grace", "2"]
        with open(self.log_file, "wb") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + start_timeout
        while not self.info_file.exists():
            if self.process.poll() is not None:
                pytest.fail(f"the miner exited with {self.process.returncode}:\n{_tail(self.log_file)}")
            if time.monotonic() > deadline:
                # Killed, not SIGTERMed: a miner stuck in its start-up does not act on SIGTERM until it returns.
                self.process.kill()
                self.process.wait()
                pytest.fail(f"the miner did not start in {start_timeout:g}s:\n{_tail(self.log_file)}")
            time.sleep(0.1)
        self.info = json.loads(self.info_file.read_text())
        self.target = client.target_from_info_file(str(self.info_file))

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> int:
        return _stop_process(self.process, signal.SIGTERM)


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    running = ServeProcess(tmp_path_factory.mktemp("serve"), free_port())
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def miner(tmp_path_factory, serve):
    running = MinerProcess(tmp_path_factory.mktemp("miner"), serve.url + "/v1")
    try:
        yield running
    finally:
        code = running.stop()
    assert code == 0, _tail(running.log_file)


@pytest.fixture
def serve_up(serve):
    """Each test starts with the upstream running, whatever an earlier (failed) test left behind."""
    serve.start()
    return serve


async def echo(miner: MinerProcess, prompt: str) -> client.StreamResult:
    return await stream_prompt(miner.target, [prompt], wallet=client.ephemeral_keypair(), timeout=STREAM_TIMEOUT_S)


async def echo_many(miner: MinerProcess, prompts: list[str]) -> list[client.StreamResult]:
    # Each stream is its own caller endpoint: concurrent streams from one dendrite would race on nonces.
    return list(await asyncio.gather(*(echo(miner, prompt) for prompt in prompts)))


def assert_echoed(result: client.StreamResult, prompt: str) -> None:
    assert result.ok, result
    # Bytes, not str: a decoder that substituted or normalized characters must not compare equal.
    assert result.text.encode("utf-8") == prompt.encode("utf-8")


def test_startup_reports_the_upstream(miner, serve_up):
    # The model name came from the upstream's /v1/models, since none was given on the command line.
    assert f"upstream {serve_up.url}/v1 (model minercore-tiny)" in miner.log()
    assert miner.info["ip"] == "127.0.0.1" and miner.info["pid"] == miner.process.pid


async def test_mixed_prompt_is_echoed_byte_for_byte_through_both_hops(miner, serve_up):
    prompt = mixed_prompt(400)
    assert 300 <= len(load_tokenizer("gpt2").encode(prompt)) <= 400
    result = await echo(miner, prompt)
    assert_echoed(result, prompt)
    assert result.status_code == 200
    assert result.chunks > 1 and result.ttft_s < result.duration_s  # streamed, not delivered in one piece


async def test_system_and_user_messages_echo_the_last(miner, serve_up):
    # Both messages travel to the upstream's /chat/completions; its echo answers the last one.
    result = await stream_prompt(miner.target, ["You are terse.", "Ça va? 世界 🎉\r\nfin"], ["system", "user"],
                                 wallet=client.ephemeral_keypair(), timeout=STREAM_TIMEOUT_S)
    assert_echoed(result, "Ça va? 世界 🎉\r\nfin")


async def test_concurrent_dendrites_each_get_their_own_text(miner, serve_up):
    prompts = [mixed_prompt(200 + 40 * i, salt=f"[stream {i}] ") for i in range(SLOTS)]
    assert len(set(prompts)) == SLOTS
    results = await echo_many(miner, prompts)
    assert [r.status_code for r in results] == [200] * SLOTS
    for result, prompt in zip(results, prompts, strict=True):
        assert_echoed(result, prompt)


async def test_upstream_down_gives_a_clear_error_and_recovers_on_the_same_port(miner, serve_up):
    prompt = mixed_prompt(250)
    assert_echoed(await echo(miner, prompt), prompt)  # leaves a keep-alive connection to the serve in the pool

    serve_up.stop()
    started = time.monotonic()
    failed = await echo_many(miner, ["while the upstream is down 🔌"] * SLOTS)
    elapsed = time.monotonic() - started
    for result in failed:
        # A server-side status: a 4xx would tell the validator its request was at fault.
        assert result.status_code is not None and 500 <= result.status_code < 600, result
        assert result.error is None and result.text == ""
        assert "upstream" in result.status_message and "unreachable" in result.status_message, result
        assert f"127.0.0.1:{serve_up.port}" in result.status_message  # says which upstream
    assert elapsed < FAST_FAILURE_S, f"{SLOTS} failures took {elapsed:.2f}s"
    assert miner.process.poll() is None, _tail(miner.log_file)
    assert "unreachable" in miner.log()

    serve_up.start()  # the same port: the miner's configuration does not change
    recovered = await echo(miner, prompt)
    assert_echoed(recovered, prompt)
    recovered_many = await echo_many(miner, [f"{prompt}#{i}" for i in range(SLOTS)])
    for i, result in enumerate(recovered_many):
        assert_echoed(result, f"{prompt}#{i}")


async def test_upstream_restart_between_requests_is_invisible(miner, serve_up):
    # SLOTS concurrent streams fill the miner's pool (one connection per slot) with idle keep-alive connections
    # to this serve process; after the restart every one of them is dead, and no caller may see that.
    prompts = [f"warm {i}: {PARAGRAPH}" for i in range(SLOTS)]
    for result, prompt in zip(await echo_many(miner, prompts), prompts, strict=True):
        assert_echoed(result, prompt)
    serve_up.stop()
    serve_up.start()
    assert_echoed(await echo(miner, "first after the restart ✅"), "first after the restart ✅")
    for result, prompt in zip(await echo_many(miner, prompts), prompts, strict=True):
        assert_echoed(result, prompt)


async def test_no_slot_leaks_after_the_upstream_episodes(miner, serve_up):
    # Runs after the failures above: had any failed call kept its slot, some of these would wait in the queue
    # until their deadline. Twice the slots: every slot is used and every queue place is handed on.
    prompts = [f"slot check {i} 🧮" for i in range(2 * SLOTS)]
    results = await asyncio.wait_for(echo_many(miner, prompts), STREAM_TIMEOUT_S)
    assert [r.status_code for r in results] == [200] * len(prompts)
    assert [r.text for r in results] == prompts
    assert miner.process.poll() is None


async def test_miner_started_before_its_upstream(tmp_path, serve_up):
    # The model name is not given, so the miner must ask /v1/models once the upstream is there, not only at
    # start-up. The module's serve port stands in for an upstream that is still coming up.
    serve_up.stop()
    late = MinerProcess(tmp_path, serve_up.url + "/v1")
    try:
        assert "not resolved yet" in late.log()
        failed = await echo(late, "too early")
        assert failed.status_code is not None and 500 <= failed.status_code < 600, failed
        assert "upstream" in failed.status_message and "unreachable" in failed.status_message, failed
        serve_up.start()
        prompt = mixed_prompt(400)
        assert_echoed(await echo(late, prompt), prompt)
    finally:
        code = late.stop()
    assert code == 0, _tail(late.log_file)


def test_miner_starts_promptly_when_the_upstream_accepts_but_never_answers(tmp_path):
    # A listening socket nobody accepts from: the kernel completes the TCP handshake and buffers the request,
    # so the client waits for an answer that never comes (an upstream stuck loading, or a wedged proxy).
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        # Python and bittensor imports take about 3 s here; the rest is room for a bounded /models lookup
        # (the backend's own connect timeout is 5 s).
        late = MinerProcess(tmp_path, f"http://127.0.0.1:{hole.getsockname()[1]}/v1", start_timeout=20.0)
        assert late.stop() == 0, _tail(late.log_file)
