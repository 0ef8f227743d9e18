"""``StreamPrompting`` through a real bittensor-10 ``bt.Dendrite`` (bittensor 10.x only): the way validators of
the text-prompting line call a miner. ``client`` uses it for ``--protocol streamprompting``.

Each stream gets its own Dendrite: the miner requires nonces from one (hotkey, dendrite uuid) to increase, so
concurrent streams sharing a Dendrite could be refused when they arrive out of order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import bittensor as bt
from bittensor.core.settings import version_as_int
from bittensor.utils import networking

from .protocol import StreamPrompting
from .results import StreamResult

# What the dendrite reports as its own address. It only fills an informational header (the miner records
# the TCP peer instead), and it must differ from the target's ip: the dendrite rewrites a target equal to
# its own address to 0.0.0.0.
_UNSPECIFIED_IP = "0.0.0.0"


@contextlib.contextmanager
def _no_external_ip_lookup() -> Iterator[None]:
    """``bt.Dendrite()`` asks internet services for our address; offline that fails, and it is not needed."""
    with mock.patch.object(networking, "get_external_ip", lambda: _UNSPECIFIED_IP):
        yield


def make_dendrite(wallet: Any) -> bt.Dendrite:
    with _no_external_ip_lookup():
        return bt.Dendrite(wallet=wallet)


def axon_info(ip: str, port: int, hotkey: str, coldkey: str = "") -> bt.AxonInfo:
    """The target as the dendrite wants it; ``hotkey`` must be the miner's (it is part of the signature)."""
    return bt.AxonInfo(version=version_as_int, ip=ip, port=int(port), ip_type=networking.ip_version(ip),
                       hotkey=hotkey, coldkey=coldkey or hotkey)


async def stream_prompt(target: bt.AxonInfo, messages: Sequence[str], roles: Sequence[str] | None = None, *,
                        wallet: Any = None, dendrite: bt.Dendrite | None = None, timeout: float = 60.0,
                        on_text: Callable[[str], None] | None = None) -> StreamResult:
    """Send one ``StreamPrompting`` and consume its stream to the end, calling ``on_text`` for every piece.

    Signs with a new Dendrite for ``wallet``, or reuses ``dendrite`` (as a validator does: one session and
    uuid for many requests, which must then go one at a time, since the miner wants their nonces increasing).
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
