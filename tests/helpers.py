"""What test modules share (plain functions and classes; the fixtures are in conftest.py): free ports and
keypairs, the fake engine and the in-process miner, the tiny real engine, hand-signed requests, the miner as a
subprocess, and a Prometheus scrape."""

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from streamloop_corpus import CORPUS
from v10_signing import v10_request

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import FINISH_CANCELLED, GenerationFailed, InvalidRequest, Piece
from minercore.engine import Engine
from minercore.miner import client, sdk
from minercore.miner.config import build_config
from minercore.miner.neuron import Miner
from minercore.runtime.build import build_runner
from minercore.text.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300  # a miner subprocess: import, model build and warm-up on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def new_keypair() -> Any:
    return sdk.new_keypair()


PROSE = ("Miners answer validators' prompts by streaming text back as it is produced; the validator scores "
         "what arrives and how fast. Crème brûlée, naïve façade, São Paulo, Zürich, Kraków.\n"
         "東京は日本の首都です。我们今天去公园吧！한국어 문장입니다. 😀🎉👩‍👩‍👧 🇯🇵 👍🏽\n\n")


def mixed_prompt(max_tokens: int) -> str:
    """Prose, accents, CJK, emoji, newlines and the detokenizer stress corpus: as many numbered paragraphs as
    fit in ``max_tokens`` GPT-2 tokens. (Echo needs room for the prompt twice in the model's context.)"""
    corpus = list(CORPUS.values())
    tokenizer = load_tokenizer("gpt2")
    text = ""
    for i in itertools.count():
        longer = f"{text}{i}. {PROSE}{corpus[i % len(corpus)]}\n"
        if len(tokenizer.encode(longer)) > max_tokens:
            return text
        text = longer


# ---- the miner in-process, over a fake engine or the tiny real one ------------------------------------------
MIXED = "Crème brûlée — naïve café.\n漢字とかな、한국어 😀🎉👩‍👩‍👧\n\n\tend"


class FakeEngine:
    """The Engine's interface: echoes the last message in ``chunk``-character pieces, ``delay`` s apart."""

    runner_description = "fake engine"
    backend_name = "native"
    serving = {"backend": "native", "format": "fake", "architecture": None, "quantization": "none", "dtype": None}
    warmup_seconds = 0.0
    stream_loop = "python"

    def __init__(self, chunk: int = 7, delay: float = 0.0) -> None:
        self.chunk = chunk
        self.delay = delay
        self.requests = []
        self.closed = 0  # generators closed (finished, failed or abandoned)
        self.fail_after: int | None = None  # pieces before a GenerationFailed
        self.error: Exception | None = None  # raised before any text
        self.ends_at_once: str | None = None  # a finish reason to end with before any text
        self.shutting_down = asyncio.Event()
        self.cancel_at_shutdown = False

    async def start(self) -> None:
        pass

    async def shutdown(self, grace: float = 5.0) -> None:
        self.shutting_down.set()
        await asyncio.sleep(min(grace, 0.05))

    async def generate(self, request) -> AsyncIterator[Piece]:
        self.requests.append(request)
        try:
            if self.error is not None:
                raise self.error
            if self.ends_at_once is not None:
                yield Piece("", self.ends_at_once)
                return
            text = request.prompt if request.messages is None else request.messages[-1]["content"]
            if not text:
                raise InvalidRequest("prompt is empty")
            for index, start in enumerate(range(0, len(text), self.chunk)):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.fail_after is not None and index == self.fail_after:
                    raise GenerationFailed("model step failed: simulated")
                if self.cancel_at_shutdown and self.shutting_down.is_set():
                    yield Piece(text[start:start + self.chunk], FINISH_CANCELLED)
                    return
                end = start + self.chunk
                yield Piece(text[start:end], "eos" if end >= len(text) else None)
        finally:
            self.closed += 1


@contextlib.asynccontextmanager
async def running_miner(tmp_path, *args: str, engine=None, subtensor=None,
                        sync_interval: float = 12.0) -> AsyncIterator[Miner]:
    """A started miner on a free loopback port (``--offline`` unless a subtensor is given)."""
    base = ["--axon.port", str(free_port()), "--wallet.path", str(tmp_path / "wallets"),
            "--axon.info_file", str(tmp_path / "axon.json")]
    if subtensor is None:
        base.append("--offline")
    else:
        base += ["--axon.ip", "127.0.0.1", "--axon.external_ip", "127.0.0.1"]
    miner = Miner(build_config([*base, *args]), engine=engine or FakeEngine(), subtensor=subtensor,
                  sync_interval=sync_interval)
    task = asyncio.create_task(miner.run())
    while miner.info is None:
        if task.done():
            task.result()  # raises the start-up error
        await asyncio.sleep(0.01)
    try:
        yield miner
    finally:
        miner.stop()
        await task


async def stream_prompt(target: Any, messages: list[str], roles: list[str] | None = None, *, wallet: Any,
                        timeout: float = 60.0, on_text: Callable[[str], None] | None = None) -> client.StreamResult:
    """One StreamPrompting request, on either SDK: through a real 10.x Dendrite where bittensor 10 is installed,
    else exactly as such a dendrite sends it (``v10_signing``, aiohttp). The status message is the miner's
    (``bt_header_axon_status_message``), as the dendrite reports it."""
    if sdk.MAJOR == 10:
        return await client.stream_prompt(target, messages, roles, wallet=wallet, timeout=timeout, on_text=on_text)
    request = v10_request(wallet, target.hotkey, list(messages), roles, timeout=timeout)
    started = time.perf_counter()
    received, chunks, ttft, status, message = bytearray(), 0, None, None, None
    try:  # aiohttp, with one total timeout, as the dendrite sends
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                    session.post(f"{client.base_url(target)}/StreamPrompting", data=request.body,
                                 headers=request.headers) as response):
            status = response.status
            message = response.headers.get("bt_header_axon_status_message")
            if status != 200:  # an error answer is {"message": ...}, as the protocol's client reads it
                return client.StreamResult("", status, (await response.json(content_type=None))["message"], None,
                                           time.perf_counter() - started, 0)
            async for chunk in response.content.iter_any():
                received += chunk
                chunks += 1
                ttft = ttft if ttft is not None else time.perf_counter() - started
                if on_text is not None:
                    on_text(chunk.decode("utf-8", errors="replace"))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return client.StreamResult(received.decode("utf-8", errors="replace"), status, message, ttft,
                                   time.perf_counter() - started, chunks, error=f"{type(exc).__name__}: {exc}")
    return client.StreamResult(received.decode("utf-8"), status, message, ttft, time.perf_counter() - started,
                               chunks)


def target_at(ip: str, port: int, hotkey: str) -> Any:
    """A miner as this SDK's StreamPrompting client addresses it (a 10.x ``AxonInfo``, else a ``client.Target``)."""
    found = client.Target(ip, port, hotkey)
    return found.for_dendrite() if sdk.MAJOR == 10 else found


def target(miner: Miner) -> Any:
    return target_at(miner.info["ip"], miner.info["port"], miner.info["hotkey"])


GPT2_EOS = 50256
CONTEXT = 256  # small, so that "longer than the model's context" is cheap to send and to tokenize


async def collect(backend: Any, request: Any) -> tuple[str, str | None]:
    """A backend's whole answer to ``request``: its text and the finish reason of its last piece."""
    parts, reason = [], None
    async for piece in backend.generate(request):
        parts.append(piece.text)
        reason = piece.finish_reason
    return "".join(parts), reason


def tiny_engine(*, max_batch: int = 8, max_context: int = CONTEXT, runner_wrapper: Callable[[Any], Any] | None = None,
                **options: Any) -> Engine:
    """The real engine over the tiny simulated model on CPU; ``runner_wrapper`` wraps its runner (slow, faulty)."""
    model = ModelOptions(preset="tiny", compile="off", device="cpu", max_context=max_context)
    runner = build_runner(model, max_batch=max_batch, eos_id=GPT2_EOS)
    if runner_wrapper is not None:
        runner = runner_wrapper(runner)
    return Engine(model, EngineOptions(max_batch=max_batch, **options), runner=runner)


def prefill_from_offsets(runner: Any, prompts: list[list[int]], params: list[Any], offsets: list[int], *,
                         blocks_per_slot: int, together: bool) -> list[int | None]:
    """Give slot ``s`` blocks ``1 + blocks_per_slot * s`` on, prefill its prompt up to its offset, then prefill
    every prompt's rest: in one batched forward from the offsets (``together``) or one chunk per slot. Returns
    each slot's first token."""
    for slot, (prompt, offset) in enumerate(zip(prompts, offsets, strict=True)):
        first_block = 1 + blocks_per_slot * slot
        runner.assign_blocks(slot, range(first_block, first_block + blocks_per_slot))
        if offset:
            assert runner.prefill_chunk(slot, prompt, params[slot], 0, offset) is None
    if together:
        return runner.prefill_batch(list(range(len(prompts))), prompts, params, cached=offsets)
    return [runner.prefill_chunk(slot, prompt, params[slot], offset, len(prompt), cached=offset)
            for slot, (prompt, offset) in enumerate(zip(prompts, offsets, strict=True))]


@dataclass
class SignedRequest:
    """A request exactly as a dendrite would send it, for the test to alter before sending."""

    url: str
    headers: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)


async def sign(miner: Miner, messages: Any, roles: Any = None, *, keypair: Any = None,
               timeout: float = 60.0) -> SignedRequest:
    """A StreamPrompting request for ``miner``, signed exactly as a 10.x dendrite signs it (``v10_signing``; the
    body may hold values the protocol's types refuse, signed honestly all the same)."""
    request = v10_request(keypair or new_keypair(), miner.info["hotkey"], messages, roles, timeout=timeout)
    return SignedRequest(f"http://127.0.0.1:{miner.info['port']}/StreamPrompting", request.headers,
                         request.document)


async def post(request: SignedRequest, *, data: bytes | None = None, timeout: float = 60.0) -> tuple[int, str]:
    """Send it (as JSON unless the headers say otherwise); the status and the error message (or, for 200, the
    text)."""
    body = data if data is not None else json.dumps(request.body).encode()
    headers = {"content-type": "application/json", **request.headers}
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.post(request.url, headers=headers, data=body) as response):
        text = await response.text(errors="replace")
    if response.status == 200:
        return 200, text
    try:
        return response.status, json.loads(text)["message"]
    except (ValueError, KeyError, TypeError):
        return response.status, text


class LogRecorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level: str):
        return lambda message, *args, **kwargs: self.lines.append((level, message))

    def at(self, level: str) -> list[str]:
        return [message for lvl, message in self.lines if lvl == level]


# ---- the miner as a subprocess (neurons/miner.py --offline) ---------------------------------------------------
@dataclass
class MinerProcess:
    process: subprocess.Popen
    info: dict
    info_file: Path
    log_file: Path
    terminated: bool = False

    @property
    def target(self):
        return client.target_from_info_file(str(self.info_file))

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def terminate(self) -> None:
        """One SIGTERM (a second one, arriving once the miner has finished, would be the default: death)."""
        if not self.terminated and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout: float = 60.0) -> int:
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the miner ignored SIGTERM for {timeout:g}s:\n{self.log()}")


@contextlib.contextmanager
def miner_process(directory: Path, *args: str, env: dict[str, str] | None = None):
    info_file, log_file = directory / "axon.json", directory / "miner.log"
    command = [sys.executable, "neurons/miner.py", "--offline", "--axon.port", str(free_port()),
               "--wallet.path", str(directory / "wallets"), "--axon.info_file", str(info_file),
               "--model.preset", "tiny", "--device", "cpu", *args]
    with open(log_file, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    miner = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not info_file.exists():
            if process.poll() is not None:
                pytest.fail(f"the miner exited with {process.returncode}:\n{log_file.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the miner did not start in {START_TIMEOUT_S}s:\n{log_file.read_text()}")
            time.sleep(0.1)
        miner = MinerProcess(process, json.loads(info_file.read_text()), info_file, log_file)
        yield miner
    finally:
        if miner is not None:
            miner.stop()
        elif process.poll() is None:
            process.kill()
            process.wait()


# ---- metrics ---------------------------------------------------------------------------------------------------
def scrape(port: int) -> dict[str, float]:
    """{'name{label="value",...}': value} for every sample on the endpoint."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
