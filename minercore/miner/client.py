"""Query a minercore miner: the logic behind ``neurons/client.py``, on either bittensor SDK.

Two protocols: ``openai`` (btauth/1-signed OpenAI chat-completion streaming over httpx; bittensor 10 or 11) and
``streamprompting`` (a real bittensor-10 Dendrite, ``dendrite.py``; needs bittensor 10.x).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from ..text.tokenizer import load_tokenizer
from . import sdk
from .auth import btauth_headers
from .offline import read_axon_info
from .results import StreamResult

if sdk.MAJOR == 10:
    from .dendrite import axon_info, make_dendrite, stream_prompt  # noqa: F401 - the StreamPrompting client

PROTOCOLS = ("openai", "streamprompting")
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"

__all__ = ["StreamResult", "Target", "ephemeral_keypair", "main", "stream_many", "stream_openai"]


@dataclass(frozen=True)
class Target:
    """A miner: where it listens and its hotkey (every signature names it)."""

    ip: str
    port: int
    hotkey: str
    coldkey: str = ""

    def for_dendrite(self) -> Any:
        return axon_info(self.ip, self.port, self.hotkey, self.coldkey)


def ephemeral_keypair() -> Any:
    """A throwaway hotkey: enough for miners that accept any correctly signed caller (``--offline``)."""
    return sdk.new_keypair()


def target_from_info_file(path: str) -> Any:
    """The miner named by its ``--axon.info_file`` (as the dendrite wants it under bittensor 10)."""
    info = read_axon_info(path)
    target = Target(info["ip"], int(info["port"]), info["hotkey"], info["coldkey"])
    return target.for_dendrite() if sdk.MAJOR == 10 else target


def base_url(target: Any) -> str:
    """``http://ip:port`` of a ``Target`` or a bittensor-10 ``AxonInfo``."""
    host = f"[{target.ip}]" if ":" in target.ip else target.ip
    return f"http://{host}:{target.port}"


async def stream_openai(target: Any, messages: Sequence[str], roles: Sequence[str] | None = None, *,
                        wallet: Any, timeout: float = 60.0, max_tokens: int | None = None,
                        temperature: float | None = None, on_text: Callable[[str], None] | None = None,
                        http: httpx.AsyncClient | None = None) -> StreamResult:
    """One btauth/1-signed streaming chat completion, read to its end; ``timeout`` is the whole request's
    deadline, sent as ``X-Client-Timeout``, so the miner ends the answer in time. ``http``: a client to share
    between concurrent streams (``stream_many``); building one costs tens of milliseconds of CPU (its TLS
    context), which would otherwise count against each stream's timeout."""
    roles = list(roles) if roles is not None else ["user"] * len(messages)
    document: dict[str, Any] = {"messages": [{"role": role, "content": text} for role, text in zip(roles, messages,
                                                                                                   strict=True)],
                                "stream": True}
    if max_tokens is not None:
        document["max_tokens"] = max_tokens
    if temperature is not None:
        document["temperature"] = temperature  # else the OpenAI default, 1
    body = json.dumps(document, ensure_ascii=False).encode()
    keypair = getattr(wallet, "hotkey", wallet)
    headers = btauth_headers(keypair.sign, keypair.ss58_address, method="POST", target=CHAT_PATH, body=body,
                             receiver=target.hotkey)
    headers.update({"content-type": "application/json", "x-client-timeout": f"{timeout:g}"})
    async with contextlib.AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=httpx.Timeout(timeout)))
        return await _timed_events(http, base_url(target) + CHAT_PATH, body, headers, timeout, on_text)


async def _timed_events(http: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], timeout: float,
                        on_text: Callable[[str], None] | None) -> StreamResult:
    start = time.perf_counter()
    seen = _Seen(start, on_text)
    try:
        status, message = await asyncio.wait_for(_read_events(http, url, body, headers, timeout, seen), timeout)
    except Exception as exc:  # noqa: BLE001 - one failed stream is a result, not a crash of the whole run
        return StreamResult("".join(seen.parts), None, None, seen.ttft_s, time.perf_counter() - start, seen.chunks,
                            error=f"{type(exc).__name__}: {exc}")
    return StreamResult("".join(seen.parts), status, message, seen.ttft_s, time.perf_counter() - start, seen.chunks,
                        error=seen.error)


async def list_models(target: Any, *, wallet: Any, timeout: float = 10.0) -> list[str]:
    """The ids the miner serves (its btauth/1-signed ``GET /v1/models``); ConnectionError naming the status if
    the miner refuses."""
    keypair = getattr(wallet, "hotkey", wallet)
    headers = btauth_headers(keypair.sign, keypair.ss58_address, method="GET", target=MODELS_PATH, body=b"",
                             receiver=target.hotkey)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout)) as http:
        response = await http.get(base_url(target) + MODELS_PATH, headers=headers)
    if response.status_code != 200:
        raise ConnectionError(f"GET {MODELS_PATH}: {response.status_code} {_error_text(response.content)}")
    return [model["id"] for model in response.json()["data"]]


class _Seen:
    __slots__ = ("start", "on_text", "parts", "chunks", "ttft_s", "error")

    def __init__(self, start: float, on_text: Callable[[str], None] | None) -> None:
        self.start, self.on_text = start, on_text
        self.parts: list[str] = []
        self.chunks = 0
        self.ttft_s: float | None = None
        self.error: str | None = None

    def text(self, text: str) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.start
        self.parts.append(text)
        self.chunks += 1
        if self.on_text is not None:
            self.on_text(text)


async def _read_events(http: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], timeout: float,
                       seen: _Seen) -> tuple[int, str]:
    async with http.stream("POST", url, content=body, headers=headers, timeout=httpx.Timeout(timeout)) as response:
        if response.status_code != 200:
            raw = await response.aread()
            return response.status_code, _error_text(raw)
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return 200, "Success"
            event = json.loads(data)
            if "error" in event:
                seen.error = _error_text(data.encode())
                continue
            for choice in event.get("choices", ()):
                text = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                if text:
                    seen.text(text)
    raise ConnectionError("the stream ended without [DONE]")


def _error_text(raw: bytes) -> str:
    try:
        document = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(document.get("message"), str):
            return document["message"]
    return json.dumps(document)


async def stream_many(target: Any, prompts: Sequence[str], *, wallet: Any, role: str = "user",
                      timeout: float = 60.0, protocol: str = "streamprompting" if sdk.MAJOR == 10 else "openai",
                      on_text: Callable[[str], None] | None = None,
                      temperature: float | None = None) -> list[StreamResult]:
    """One concurrent stream per prompt, each a one-message conversation (``on_text`` suits a single one).

    ``target`` is a ``Target`` or (bittensor 10) an ``AxonInfo``; the default protocol is the SDK's own.
    ``temperature`` is the OpenAI protocol's (StreamPrompting carries no sampling: the miner answers greedily).
    """
    if protocol == "streamprompting":
        if sdk.MAJOR != 10:
            raise ValueError("--protocol streamprompting needs bittensor 10.x (pip install 'minercore[bt10]')")
        if temperature is not None:
            raise ValueError("--temperature is the openai protocol's; StreamPrompting answers are greedy")
        if isinstance(target, Target):
            target = target.for_dendrite()
        # One Dendrite per stream (see dendrite.py), each built before any stream's clock starts, as a validator
        # keeps its own: building one (its session, its signing keys) is not part of a request's time.
        async with contextlib.AsyncExitStack() as stack:
            dendrites = [await stack.enter_async_context(make_dendrite(wallet)) for _ in prompts]
            return list(await asyncio.gather(*(stream_prompt(target, [prompt], [role], dendrite=dendrite,
                                                             timeout=timeout, on_text=on_text)
                                               for prompt, dendrite in zip(prompts, dendrites, strict=True))))
    if protocol == "openai":
        # One connection pool for every stream, built before any stream's clock starts.
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as http:
            send = functools.partial(stream_openai, temperature=temperature, http=http)
            return list(await asyncio.gather(*(send(target, [prompt], [role], wallet=wallet, timeout=timeout,
                                                    on_text=on_text) for prompt in prompts)))
    raise ValueError(f"unknown protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")


def count_tokens(text: str) -> int:
    """GPT-2 tokens in ``text`` (the bundled tokenizer; special-token spellings count as text)."""
    return len(load_tokenizer("gpt2").encode(text, add_special_tokens=False, split_special_tokens=True))


def summarize(results: Sequence[StreamResult], wall_s: float) -> dict[str, Any]:
    """One JSON-ready document: each stream's numbers (and text) plus the aggregate."""
    streams = []
    for result in results:
        tokens = count_tokens(result.text)
        streams.append({**asdict(result), "ok": result.ok, "tokens": tokens, "chars": len(result.text),
                        "tokens_per_s": tokens / result.duration_s if result.duration_s > 0 else 0.0})
    ttfts = [s["ttft_s"] for s in streams if s["ttft_s"] is not None]
    total_tokens = sum(s["tokens"] for s in streams)
    return {
        "ok": all(s["ok"] for s in streams),
        "streams": streams,
        "aggregate": {"streams": len(streams), "failed": sum(not s["ok"] for s in streams),
                      "median_ttft_s": statistics.median(ttfts) if ttfts else None, "tokens": total_tokens,
                      "wall_s": wall_s, "tokens_per_s": total_tokens / wall_s if wall_s > 0 else 0.0},
    }


# ---- command line ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurons/client.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Stream a prompt from a minercore miner; print the text live, then TTFT, tokens/s (GPT-2 "
                    "tokens of the received text over request-to-last-byte time) and chunks. Exits 1 if any "
                    "stream fails (status other than 200, or an exception).")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="streamprompting" if sdk.MAJOR == 10 else "openai",
                        help="openai: a btauth/1-signed /v1/chat/completions stream (either SDK); "
                             "streamprompting: a bittensor-10 Dendrite (needs bittensor 10.x).")
    target = parser.add_argument_group("target (an info file, or ip, port and hotkey)")
    target.add_argument("--axon.info_file", default=None, help="The JSON the miner wrote with --axon.info_file.")
    target.add_argument("--axon.ip", default=None, help="The miner's address.")
    target.add_argument("--axon.port", type=int, default=None, help="The miner's port.")
    target.add_argument("--axon.hotkey", default=None, help="The miner's hotkey (ss58); the signature covers it.")
    prompt = parser.add_argument_group("prompt (--prompt, --prompt_file, or standard input)")
    prompt.add_argument("--prompt", default=None, help="The message to send.")
    prompt.add_argument("--prompt_file", default=None, help="Read the message from this UTF-8 file.")
    prompt.add_argument("--role", default="user", help="The message's role.")
    run = parser.add_argument_group("run")
    run.add_argument("--concurrency", type=int, default=1, help="Identical streams sent at once.")
    run.add_argument("--timeout", type=float, default=60.0, help="Seconds each whole stream may take.")
    run.add_argument("--temperature", type=float, default=None,
                     help="Sampling temperature (openai protocol; default: the OpenAI default, 1; 0 is greedy).")
    run.add_argument("--json", action="store_true",
                     help="Print one JSON object (every stream's status, timings, tokens and text) instead.")
    wallet = parser.add_argument_group("caller identity (default: a throwaway hotkey)")
    wallet.add_argument("--wallet.name", default=None, help="Sign with this wallet's hotkey instead.")
    wallet.add_argument("--wallet.hotkey", default="default", help="The hotkey of --wallet.name.")
    wallet.add_argument("--wallet.path", default=sdk.DEFAULT_WALLET_PATH, help="Where --wallet.name lives.")
    return parser


class UsageError(ValueError):
    pass


def _target(options: dict[str, Any]) -> Target:
    if options["axon.info_file"]:
        try:
            info = read_axon_info(options["axon.info_file"])
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read --axon.info_file: {exc}") from exc
        return Target(info["ip"], int(info["port"]), info["hotkey"], info["coldkey"])
    if options["axon.ip"] and options["axon.port"] and options["axon.hotkey"]:
        return Target(options["axon.ip"], options["axon.port"], options["axon.hotkey"])
    raise UsageError("give --axon.info_file, or --axon.ip, --axon.port and --axon.hotkey")


def _prompt(options: dict[str, Any]) -> str:
    if options["prompt"] is not None and options["prompt_file"] is not None:
        raise UsageError("give --prompt or --prompt_file, not both")
    if options["prompt"] is not None:
        return options["prompt"]
    if options["prompt_file"] is not None:
        try:
            with open(options["prompt_file"], encoding="utf-8") as handle:
                return handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --prompt_file: {exc}") from exc
    if sys.stdin.isatty():
        raise UsageError("give --prompt or --prompt_file, or pipe the prompt on standard input")
    return sys.stdin.read()


def _signer(options: dict[str, Any]) -> Any:
    if options["wallet.name"] is None:
        return ephemeral_keypair()
    try:
        return sdk.load_wallet(options["wallet.name"], options["wallet.hotkey"], options["wallet.path"])
    except Exception as exc:
        raise UsageError(f"cannot load hotkey {options['wallet.hotkey']!r} of wallet {options['wallet.name']!r}: "
                         f"{exc}") from exc


def _write_live(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _report(summary: dict[str, Any]) -> None:
    for index, stream in enumerate(summary["streams"], 1):
        if stream["ok"]:
            print(f"stream {index}: status 200, TTFT {stream['ttft_s']:.3f}s, {stream['tokens']} tokens in "
                  f"{stream['duration_s']:.3f}s ({stream['tokens_per_s']:.0f} tokens/s), {stream['chunks']} chunks",
                  file=sys.stderr)
        else:
            why = stream["error"] or f"status {stream['status_code']}: {stream['status_message']}"
            print(f"stream {index}: FAILED ({why}) after {stream['chars']} characters", file=sys.stderr)
    aggregate = summary["aggregate"]
    if aggregate["streams"] > 1:
        ttft = aggregate["median_ttft_s"]
        print(f"{aggregate['streams']} streams, {aggregate['failed']} failed: median TTFT "
              f"{'-' if ttft is None else f'{ttft:.3f}s'}, {aggregate['tokens']} tokens in {aggregate['wall_s']:.3f}s "
              f"({aggregate['tokens_per_s']:.0f} tokens/s together)", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """``neurons/client.py``: 0 when every stream succeeded, 1 when any failed, 2 for bad options."""
    options = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    try:
        if options["concurrency"] < 1:
            raise UsageError("--concurrency must be >= 1")
        if options["protocol"] == "streamprompting" and sdk.MAJOR != 10:
            raise UsageError(f"--protocol streamprompting needs bittensor 10.x (this is {sdk.VERSION}); use "
                             "--protocol openai, or install minercore[bt10]")
        target = _target(options)
        prompt = _prompt(options)
        signer = _signer(options)
    except UsageError as exc:
        print(f"client: {exc}", file=sys.stderr)
        return 2
    live = options["concurrency"] == 1 and not options["json"]

    start = time.perf_counter()
    try:
        results = asyncio.run(stream_many(target, [prompt] * options["concurrency"], wallet=signer,
                                          role=options["role"], timeout=options["timeout"],
                                          protocol=options["protocol"], on_text=_write_live if live else None,
                                          temperature=options["temperature"]))
    except ValueError as exc:  # options that do not fit the protocol
        print(f"client: {exc}", file=sys.stderr)
        return 2
    summary = summarize(results, time.perf_counter() - start)
    if options["json"]:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        if live and results[0].text and not results[0].text.endswith("\n"):
            print(file=sys.stderr)  # end the live line on the terminal; stdout stays exactly the text
        _report(summary)
    return 0 if summary["ok"] else 1
