"""Query a ``StreamPrompting`` miner through a real ``bt.Dendrite``: the logic behind ``neurons/client.py``.

Each stream gets its own Dendrite: the axon requires nonces from one (hotkey, dendrite uuid) to increase, so
concurrent streams sharing a Dendrite could be refused when they arrive out of order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from unittest import mock

import bittensor as bt
from bittensor.core.settings import DEFAULTS, version_as_int
from bittensor.utils import networking
from bittensor_wallet import Keypair

from ..tokenizer import load_tokenizer
from . import config as miner_config
from .offline import read_axon_info
from .protocol import StreamPrompting

# What the dendrite reports as its own address. It only fills an informational header (the axon records
# the TCP peer instead), and it must differ from the target's ip: the dendrite rewrites a target equal to
# its own address to 0.0.0.0.
_UNSPECIFIED_IP = "0.0.0.0"


@dataclass
class StreamResult:
    """One stream as the caller saw it."""

    text: str
    status_code: int | None  # the dendrite's view: the axon's status, or 408/503/... for transport failures
    status_message: str | None
    ttft_s: float | None  # request start to the first text
    duration_s: float  # request start to the end of the stream
    chunks: int  # text pieces as they came off the network
    error: str | None = None  # an exception outside bittensor's own error handling

    @property
    def ok(self) -> bool:
        return self.status_code == 200 and self.error is None


@contextlib.contextmanager
def _no_external_ip_lookup() -> Iterator[None]:
    """``bt.Dendrite()`` asks internet services for our address; offline that fails, and it is not needed."""
    with mock.patch.object(networking, "get_external_ip", lambda: _UNSPECIFIED_IP):
        yield


def make_dendrite(wallet: bt.Wallet | Keypair) -> bt.Dendrite:
    with _no_external_ip_lookup():
        return bt.Dendrite(wallet=wallet)


def ephemeral_keypair() -> Keypair:
    """A throwaway hotkey: enough for miners that accept any correctly signed caller (``--offline``)."""
    return Keypair.create_from_mnemonic(Keypair.generate_mnemonic())


def axon_info(ip: str, port: int, hotkey: str, coldkey: str = "") -> bt.AxonInfo:
    """The target as the dendrite wants it; ``hotkey`` must be the miner's (it is part of the signature)."""
    return bt.AxonInfo(version=version_as_int, ip=ip, port=int(port), ip_type=networking.ip_version(ip),
                       hotkey=hotkey, coldkey=coldkey or hotkey)


def target_from_info_file(path: str) -> bt.AxonInfo:
    info = read_axon_info(path)
    return axon_info(info["ip"], info["port"], info["hotkey"], info["coldkey"])


async def stream_prompt(target: bt.AxonInfo, messages: Sequence[str], roles: Sequence[str] | None = None, *,
                        wallet: bt.Wallet | Keypair | None = None, dendrite: bt.Dendrite | None = None,
                        timeout: float = 60.0, on_text: Callable[[str], None] | None = None) -> StreamResult:
    """Send one ``StreamPrompting`` and consume its stream to the end, calling ``on_text`` for every piece.

    Signs with a new Dendrite for ``wallet``, or reuses ``dendrite`` (as a validator does: one session and
    uuid for many requests, which must then go one at a time, since the axon wants their nonces increasing).
    """
    if (wallet is None) == (dendrite is None):
        raise ValueError("give exactly one of wallet and dendrite")
    roles = list(roles) if roles is not None else ["user"] * len(messages)
    start = time.perf_counter()
    first_at: float | None = None
    chunks = 0
    final: Any = None
    try:
        synapse = StreamPrompting(roles=roles, messages=list(messages))
        async with contextlib.AsyncExitStack() as own:
            if dendrite is None:
                dendrite = await own.enter_async_context(make_dendrite(wallet))
            stream = await dendrite.forward(axons=target, synapse=synapse, timeout=timeout, deserialize=False,
                                            streaming=True)
            # The last item is the synapse; consuming to the end also runs the dendrite's bookkeeping.
            async for item in stream:
                if isinstance(item, str):
                    chunks += 1
                    if first_at is None:
                        first_at = time.perf_counter()
                    if on_text is not None:
                        on_text(item)
                else:
                    final = item
    except Exception as exc:  # noqa: BLE001 - one failed stream is a result, not a crash of the whole run
        return StreamResult("", None, None, None, time.perf_counter() - start, chunks,
                            error=f"{type(exc).__name__}: {exc}")
    duration = time.perf_counter() - start
    if final is None:
        return StreamResult("", None, None, None, duration, chunks, error="the stream ended without a synapse")
    status = final.dendrite.status_code
    return StreamResult(final.completion or "", int(status) if status is not None else None,
                        final.dendrite.status_message, None if first_at is None else first_at - start, duration,
                        chunks)


async def stream_many(target: bt.AxonInfo, prompts: Sequence[str], *, wallet: bt.Wallet | Keypair,
                      role: str = "user", timeout: float = 60.0,
                      on_text: Callable[[str], None] | None = None) -> list[StreamResult]:
    """One concurrent stream per prompt, each a one-message conversation (``on_text`` suits a single one)."""
    return list(await asyncio.gather(*(stream_prompt(target, [prompt], [role], wallet=wallet, timeout=timeout,
                                                     on_text=on_text) for prompt in prompts)))


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
        prog="neurons/client.py", formatter_class=miner_config.HelpFormatter,
        description="Stream a prompt from a StreamPrompting miner through a bittensor dendrite; print the text "
                    "live, then TTFT, tokens/s (GPT-2 tokens of the received text over request-to-last-byte "
                    "time) and chunks. Exits 1 if any stream fails (status other than 200, or an exception).")
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
    run.add_argument("--json", action="store_true",
                     help="Print one JSON object (every stream's status, timings, tokens and text) instead.")
    wallet = parser.add_argument_group("caller identity (default: a throwaway hotkey)")
    wallet.add_argument("--wallet.name", default=None, help="Sign with this wallet's hotkey instead.")
    wallet.add_argument("--wallet.hotkey", default="default", help="The hotkey of --wallet.name.")
    wallet.add_argument("--wallet.path", default=DEFAULTS.wallet.path, help="Where --wallet.name lives.")
    return parser


class UsageError(ValueError):
    pass


def _target(config: bt.Config) -> bt.AxonInfo:
    if config.axon.info_file:
        try:
            return target_from_info_file(config.axon.info_file)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read --axon.info_file: {exc}") from exc
    if config.axon.ip and config.axon.port and config.axon.hotkey:
        return axon_info(config.axon.ip, config.axon.port, config.axon.hotkey)
    raise UsageError("give --axon.info_file, or --axon.ip, --axon.port and --axon.hotkey")


def _prompt(config: bt.Config) -> str:
    if config.prompt is not None and config.prompt_file is not None:
        raise UsageError("give --prompt or --prompt_file, not both")
    if config.prompt is not None:
        return config.prompt
    if config.prompt_file is not None:
        try:
            with open(config.prompt_file, encoding="utf-8") as handle:
                return handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --prompt_file: {exc}") from exc
    if sys.stdin.isatty():
        raise UsageError("give --prompt or --prompt_file, or pipe the prompt on standard input")
    return sys.stdin.read()


def _signer(config: bt.Config) -> bt.Wallet | Keypair:
    if config.wallet.name is None:
        return ephemeral_keypair()
    wallet = bt.Wallet(name=config.wallet.name, hotkey=config.wallet.hotkey, path=config.wallet.path)
    try:
        wallet.hotkey  # noqa: B018 - loading the key is the check
    except Exception as exc:
        raise UsageError(f"cannot load hotkey {config.wallet.hotkey!r} of wallet {config.wallet.name!r}: {exc}") \
            from exc
    return wallet


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
    config = miner_config.parse_config(build_parser(), sys.argv[1:] if argv is None else argv)
    try:
        if config.concurrency < 1:
            raise UsageError("--concurrency must be >= 1")
        target = _target(config)
        prompt = _prompt(config)
        signer = _signer(config)
    except UsageError as exc:
        print(f"client: {exc}", file=sys.stderr)
        return 2
    live = config.concurrency == 1 and not config.json

    start = time.perf_counter()
    results = asyncio.run(stream_many(target, [prompt] * config.concurrency, wallet=signer, role=config.role,
                                      timeout=config.timeout, on_text=_write_live if live else None))
    summary = summarize(results, time.perf_counter() - start)
    if config.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        if live and results[0].text and not results[0].text.endswith("\n"):
            print(file=sys.stderr)  # end the live line on the terminal; stdout stays exactly the text
        _report(summary)
    return 0 if summary["ok"] else 1
