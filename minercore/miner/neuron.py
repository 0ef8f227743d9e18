"""The miner neuron: wallet, chain, axon and engine lifecycle around the ``StreamPrompting`` handlers.

One asyncio loop (the main thread's) runs the axon's HTTP server, the handlers and the engine's consumer
side. ``bt.Axon.start()`` would run uvicorn on a private loop in its own thread, where the engine (bound to
the loop it started on) could not be used, so the miner drives the axon's uvicorn server itself. Chain calls
after start-up happen only in the metagraph sync thread, which owns the subtensor connection from then on.

Request path: ``guard.RequestGuard`` (body size, content type, headers) -> bittensor's middleware:
``blacklist`` (static policy, on the caller's unverified header hotkey) -> ``verify`` (nonce freshness bounds,
signature and nonce, then the per-hotkey rate limit) -> ``priority`` (stake) -> the route's body check
(``guard.body_checker``) -> ``forward`` (validation, then the engine's pieces streamed as they come, in a
``guard.WatchedStreamingResponse`` that cancels the generation when the caller disconnects).

No ``from __future__ import annotations`` here: ``Axon.attach`` compares the handlers' signatures with
real annotation objects.
"""

import asyncio
import contextlib
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
import typing
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import bittensor as bt
import uvicorn
from bittensor.core.axon import V_7_2_0
from bittensor.core.errors import SynapseException
from bittensor.core.stream import BTStreamingResponseModel
from bittensor.utils.axon_utils import ALLOWED_DELTA
from starlette.types import Send

from ..backend import Backend, build_backend
from ..generation import (
    FINISH_CANCELLED,
    FINISH_DEADLINE,
    EngineClosed,
    GenerationError,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    Piece,
    SamplingParams,
    check_messages,
)
from ..metrics import Metrics
from ..observe import RequestTimer
from . import config as miner_config
from .blacklist import BlacklistPolicy, MetagraphView
from .guard import RequestGuard, StreamBroken, WatchedStreamingResponse, body_checker, prune_nonces
from .offline import ensure_wallet, write_axon_info
from .protocol import StreamPrompting

log = bt.logging

_LISTEN_TIMEOUT_S = 30.0
# After the engine has finished or cancelled every request, streams only flush what they hold; connections
# still open after this long (a reader that stopped reading) are cut.
_HTTP_DRAIN_S = 5.0
_SYNC_JOIN_S = 10.0
_WILDCARDS = ("0.0.0.0", "::", "")
_NOT_ANSWERED = {FINISH_CANCELLED: "miner is shutting down",
                 FINISH_DEADLINE: "no answer started within the request's timeout ({timeout}s)"}
_CUT_SHORT = {FINISH_CANCELLED: "cancelled at shutdown", FINISH_DEADLINE: "reached its deadline"}
_PRUNE_EVERY_S = 60.0
_QUIET_LIBRARIES = ("torch",)  # kept at warning unless --logging.debug/trace


class StartupError(RuntimeError):
    """The miner cannot start; the message says why and what to do about it."""


class RequestRejected(SynapseException):
    """A request refused before streaming started: the axon answers ``status`` with ``message`` as JSON."""

    def __init__(self, synapse: StreamPrompting, status: int, message: str) -> None:
        if synapse.axon is None:
            synapse.axon = bt.TerminalInfo()
        synapse.axon.status_code = status
        synapse.axon.status_message = message
        super().__init__(message, synapse=synapse)


class RateLimited(Exception):
    """Raised from ``verify``: the axon answers 401 "Not Verified with error: <the rate limit>"."""


class NotAcceptable(Exception):
    """Raised from ``verify`` for requests whose nonce bittensor could not hold to a freshness window (401)."""


def freshness_problem(synapse: StreamPrompting, max_timeout: float) -> str | None:
    """Why bittensor's nonce check could not refuse a replay of this request, or None.

    Neither the dendrite's version nor the timeout is covered by the signature. Before 7.2.0 a dendrite's nonce
    is not a clock reading and bittensor skips the age check, and a caller endpoint's first nonce may be as old
    as 4 s plus the timeout (NaN or infinity disable the check). So both are bounded here, before the signature
    check, which also makes it safe to forget old nonces (``prune_nonces``).
    """
    version = getattr(synapse.dendrite, "version", None)
    if not isinstance(version, int) or version < V_7_2_0:
        return f"dendrite version {version} is older than 7.2.0, whose nonces cannot be checked for freshness"
    timeout = synapse.timeout
    if timeout is None or not math.isfinite(timeout) or not 0 < timeout <= max_timeout:
        return f"timeout {timeout} is out of range: give a number of seconds in (0, {max_timeout:g}]"
    return None


def request_problem(synapse: StreamPrompting, max_chars: int) -> str | None:
    """What is wrong with the request's shape, or None: the synapse's own (one role per message), then the
    contract's message checks. The backend judges the content (an empty prompt, one too long for the model)."""
    roles, messages = synapse.roles, synapse.messages
    if not messages:
        return "messages is empty"
    if len(roles) != len(messages):
        return (f"roles has {len(roles)} entries and messages has {len(messages)}: give exactly one role per "
                "message")
    try:
        check_messages(synapse_messages(synapse), max_chars)
    except InvalidRequest as exc:
        return str(exc)
    return None


def synapse_messages(synapse: StreamPrompting) -> list[dict[str, str]]:
    """The synapse's parallel roles and messages as the contract's [{"role", "content"}]."""
    return [{"role": role, "content": message} for role, message in zip(synapse.roles, synapse.messages, strict=True)]


class _Admissions:
    """Priorities and caller classes of verified requests, handed from the middleware to ``forward``.

    The middleware's handlers see the synapse rebuilt from the signed headers; ``forward`` gets a second copy
    parsed from the body, whose dendrite fields nobody verified. ``forward`` takes the priority issued to
    the request whose (hotkey, uuid, nonce) its body repeats, so a body claiming another caller's identity
    finds no ticket and gets an unknown caller's priority. Bounded: tickets never taken (the request died
    between priority and forward) age out.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._tickets: OrderedDict[tuple[Any, Any, Any], tuple[float, str]] = OrderedDict()

    @staticmethod
    def _key(dendrite: bt.TerminalInfo | None) -> tuple[Any, Any, Any]:
        if dendrite is None:
            return None, None, None
        return dendrite.hotkey, dendrite.uuid, dendrite.nonce

    def issue(self, dendrite: bt.TerminalInfo | None, priority: float, caller_class: str) -> None:
        self._tickets[self._key(dendrite)] = priority, caller_class
        while len(self._tickets) > self.capacity:
            self._tickets.popitem(last=False)

    def take(self, dendrite: bt.TerminalInfo | None, default: float) -> tuple[float, str]:
        return self._tickets.pop(self._key(dendrite), (default, "unverified"))


class _AxonServer(uvicorn.Server):
    """The axon's uvicorn server without uvicorn's signal capture: the miner owns SIGINT/SIGTERM and shuts
    down in its own order (refuse new requests, drain the engine, then close the connections)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Miner:
    """Serves ``StreamPrompting`` from a minercore backend (the engine, or an upstream server) through an axon.

    ``engine`` and ``subtensor`` are built from ``config`` unless given (tests pass fakes); ``sync_interval``
    is how often, in seconds, the sync thread polls the chain's block height (a block is about 12 s).
    """

    def __init__(self, config: bt.Config, *, engine: Backend | None = None, subtensor: Any = None,
                 sync_interval: float = 12.0) -> None:
        self.config = config
        self.offline = bool(config.offline)
        self.metrics = Metrics() if config.metrics.port else None
        self.engine = engine if engine is not None else build_backend(
            miner_config.model_options(config), miner_config.engine_options(config), metrics=self.metrics)
        self.policy = BlacklistPolicy(miner_config.blacklist_options(config))
        self.sampling = SamplingParams(max_new_tokens=config.engine.max_new_tokens)
        # Appended to every chunk: "\n" is the seed's framing, for validators that split the stream on newlines
        # (and so also lose the text's own newlines); raw sends the text alone.
        self.chunk_suffix = "\n" if config.stream.framing == "newline" else ""
        self.wallet: bt.Wallet | None = None
        self.axon: bt.Axon | None = None
        self.info: dict[str, Any] | None = None  # what --axon.info_file holds, once listening
        self.syncs = 0
        self.sync_failures = 0
        self._subtensor = subtensor
        self._sync_interval = sync_interval
        self._sync_stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self._admissions = _Admissions()
        self._next_prune = 0.0
        self._server: _AxonServer | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._stopped = False

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Start, serve until ``stop()``, then shut down gracefully (also after a failed start)."""
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.shutdown()

    async def run_until_signalled(self) -> None:
        """``run()``, with SIGINT and SIGTERM starting the graceful shutdown."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.run()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        """Begin the graceful shutdown (call on the miner's loop)."""
        self._stop.set()

    def _on_signal(self, sig: int) -> None:
        if self._stop.is_set():
            log.warning(f"{signal.Signals(sig).name}: already shutting down (at most "
                        f"{self.config.neuron.shutdown_grace:g}s for running streams)")
            return
        log.info(f"{signal.Signals(sig).name}: shutting down")
        self.stop()

    async def start(self) -> None:
        config = self.config
        self.wallet = self._load_wallet()
        hotkey = self.wallet.hotkey.ss58_address
        if not self.offline:
            await self._connect(hotkey)
        log.info(f"loading the model (backend {config.model.backend}, preset {config.model.preset}, "
                 f"device {config.device}, dtype {config.dtype})")
        try:
            await self.engine.start()
        except Exception as exc:
            raise StartupError(f"the engine failed to start: {type(exc).__name__}: {exc}") from exc
        engine = self.engine
        if config.model.backend == "upstream":
            log.info(f"backend upstream ready: {engine.runner_description}")
        else:
            loop_state = "active" if engine.stream_loop == "cython" else "inactive (pure-Python twin)"
            log.info(f"backend {engine.backend_name} ready: {engine.runner_description}; model preset "
                     f"{config.model.preset}, mode {config.model.mode}; compile warm-up "
                     f"{engine.warmup_seconds:.2f}s; compiled stream loop {loop_state}")
        if self.metrics is not None:
            self.metrics.bind(self.engine)
            port = self.metrics.start_http(config.metrics.port, config.metrics.addr)
            log.info(f"Prometheus metrics on http://{config.metrics.addr}:{port}/metrics")
        await self._serve_axon()
        if not self.offline:
            await asyncio.to_thread(self._announce)
            self._start_sync()
        self.info = {"ip": self.axon.external_ip, "port": self.axon.external_port, "hotkey": hotkey,
                     "coldkey": self.wallet.coldkeypub.ss58_address, "pid": os.getpid(),
                     "netuid": config.netuid, "offline": self.offline, "framing": config.stream.framing}
        if config.axon.info_file:
            write_axon_info(config.axon.info_file, self.info)
        where = f"{self.info['ip']}:{self.info['port']}"
        log.info(f"serving StreamPrompting on {where} as {hotkey}"
                 + (" (offline)" if self.offline else f" on netuid {config.netuid}"))
        if config.axon.info_file:
            print(f"miner listening on {where}; query it with:\n  python neurons/client.py "
                  f"--axon.info_file {config.axon.info_file} --prompt 'Hello'", flush=True)

    def _load_wallet(self) -> bt.Wallet:
        config = self.config
        path = miner_config.wallet_path(config)
        if self.offline:
            return ensure_wallet(config.wallet.name, config.wallet.hotkey, path)
        wallet = bt.Wallet(name=config.wallet.name, hotkey=config.wallet.hotkey, path=path)
        try:
            wallet.hotkey  # noqa: B018 - loading the keys is the check
            wallet.coldkeypub  # noqa: B018
        except Exception as exc:
            raise StartupError(
                f"cannot load wallet {config.wallet.name!r} hotkey {config.wallet.hotkey!r} under {path}: {exc}. "
                "Create it with btcli (wallet new_coldkey / new_hotkey), or use --offline to run without a chain"
            ) from exc
        return wallet

    async def _connect(self, hotkey: str) -> None:
        config = self.config
        network = f"network {config.subtensor.network} (endpoint {config.subtensor.chain_endpoint})"
        if self._subtensor is None:
            try:
                self._subtensor = await asyncio.to_thread(bt.Subtensor, config=config)
            except Exception as exc:
                raise StartupError(f"cannot connect to the subtensor at {network}: {exc}") from exc
        try:
            view = await asyncio.to_thread(self._fetch_view)
        except Exception as exc:
            raise StartupError(f"cannot read the metagraph of netuid {config.netuid} from {network}: {exc}") \
                from exc
        if view.get(hotkey) is None:
            raise StartupError(
                f"hotkey {hotkey} (wallet {config.wallet.name}/{config.wallet.hotkey}) is not registered on "
                f"netuid {config.netuid} at {network}. Register it first (btcli subnets register --netuid "
                f"{config.netuid} --wallet.name {config.wallet.name} --wallet.hotkey {config.wallet.hotkey}), "
                "or use --offline to run without a chain")
        self.policy.view = view
        log.info(f"registered on netuid {config.netuid} as uid {view.get(hotkey).uid}; metagraph of "
                 f"{len(view)} neurons at block {view.block}")

    def _fetch_view(self) -> MetagraphView:
        netuid = self.config.netuid
        return MetagraphView.from_metagraph(self._subtensor.metagraph(netuid), netuid)

    async def _serve_axon(self) -> None:
        config = self.config
        host = miner_config.bind_ip(config)
        external_ip = config.axon.external_ip
        if external_ip is None and self.offline:
            external_ip = _reachable(host)  # never look our address up on the internet offline
        try:
            axon = bt.Axon(wallet=self.wallet, config=config, ip=host, external_ip=external_ip)
        except Exception as exc:
            hint = "" if external_ip else " (give --axon.external_ip if the public address cannot be looked up)"
            raise StartupError(f"cannot build the axon: {type(exc).__name__}: {exc}{hint}") from exc
        # attach() binds the route's body check, so the replacement (400 for malformed bodies) goes in first.
        axon.verify_body_integrity = body_checker(axon.forward_class_types)
        axon.attach(forward_fn=self.forward, blacklist_fn=self.blacklist, priority_fn=self.priority,
                    verify_fn=self.verify)
        axon.app.add_middleware(RequestGuard, max_body_bytes=config.axon.max_body_bytes,  # the outermost layer
                                synapse_types=axon.forward_class_types)
        if host is not None:
            axon.fast_config.host = host  # uvicorn would otherwise listen on every interface
        axon.fast_config.timeout_graceful_shutdown = _HTTP_DRAIN_S
        self.axon = axon
        self._server = _AxonServer(axon.fast_config)
        self._server_task = asyncio.create_task(self._run_server(), name="axon-http")
        deadline = asyncio.get_running_loop().time() + _LISTEN_TIMEOUT_S
        while not self._server.started:  # set by uvicorn once its own sockets listen
            if self._server_task.done() or asyncio.get_running_loop().time() > deadline:
                raise StartupError(f"the axon could not listen on {host or '0.0.0.0'}:{axon.port} "
                                   "(is the port in use?)")
            await asyncio.sleep(0.01)

    async def _run_server(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind; _serve_axon reports that
            await self._server.serve()

    def _announce(self) -> None:
        response = self._subtensor.serve_axon(netuid=self.config.netuid, axon=self.axon)
        if not response.success:
            raise StartupError(f"could not serve the axon on netuid {self.config.netuid}: {response.message}")

    def _start_sync(self) -> None:
        self._sync_thread = threading.Thread(target=self._sync_loop, args=(self.policy.view.block,),
                                             name="metagraph-sync", daemon=True)
        self._sync_thread.start()

    def _sync_loop(self, last_block: int | None) -> None:
        every = self.config.neuron.sync_every_blocks
        hotkey = self.wallet.hotkey.ss58_address
        while not self._sync_stop.wait(self._sync_interval):
            try:
                block = self._subtensor.get_current_block()
                if last_block is not None and block - last_block < every:
                    continue
                view = self._fetch_view()
            except Exception as exc:  # noqa: BLE001 - any chain failure: keep serving, retry next interval
                self.sync_failures += 1
                log.warning(f"metagraph sync failed ({type(exc).__name__}: {exc}); retrying in "
                            f"{self._sync_interval:g}s")
                continue
            self.policy.view = view  # one assignment: handlers see the old view or the new one
            last_block = block
            self.syncs += 1
            if view.get(hotkey) is None:
                log.error(f"hotkey {hotkey} is no longer registered on netuid {self.config.netuid}: validators "
                          "will stop querying this miner")
            else:
                log.debug(f"metagraph synced at block {block}: {len(view)} neurons")

    async def shutdown(self) -> None:
        """Refuse new requests, give running streams the grace period, cancel the rest, close the axon."""
        if self._stopped:
            return
        self._stopped = True
        self.policy.closing = True
        grace = self.config.neuron.shutdown_grace
        log.info(f"shutting down: running streams get up to {grace:g}s to finish")
        await self.engine.shutdown(grace=grace)
        if self._server_task is not None:
            self._server.should_exit = True
            await self._server_task
        if self.axon is not None:
            self.axon.thread_pool.shutdown(wait=False)
        if self.config.axon.info_file and self.info is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.expanduser(self.config.axon.info_file))
        await self._close_chain()
        if self.metrics is not None:
            self.metrics.stop_http()
        log.info("miner stopped")

    async def _close_chain(self) -> None:
        self._sync_stop.set()
        if self._sync_thread is not None:
            await asyncio.to_thread(self._sync_thread.join, _SYNC_JOIN_S)
            if self._sync_thread.is_alive():
                # Closing the connection under a call in flight is what breaks websockets ("cannot call recv");
                # the daemon thread ends with the process.
                log.warning(f"the metagraph sync is stuck in a chain call after {_SYNC_JOIN_S:g}s; leaving it")
                return
        if self._subtensor is not None and hasattr(self._subtensor, "close"):
            try:
                await asyncio.to_thread(self._subtensor.close)
            except Exception as exc:  # noqa: BLE001 - closing a dead connection must not fail the shutdown
                log.debug(f"closing the subtensor connection failed: {exc}")

    # ---- the StreamPrompting handlers (signatures checked by Axon.attach) -------------------------------
    def blacklist(self, synapse: StreamPrompting) -> typing.Tuple[bool, str]:  # attach() wants typing.Tuple
        hotkey = getattr(synapse.dendrite, "hotkey", None)
        blacklisted, kind, reason = self.policy.verdict(hotkey)
        if blacklisted:
            log.debug(f"refused {hotkey!r:.100}: {reason}")  # the header is the caller's: bounded
            if self.metrics is not None:
                self.metrics.blacklist_rejected(kind)
        return blacklisted, reason

    async def verify(self, synapse: StreamPrompting) -> None:
        problem = freshness_problem(synapse, self.config.axon.max_timeout)
        if problem is not None:
            raise NotAcceptable(problem)
        await self.axon.default_verify(synapse)
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + _PRUNE_EVERY_S
            dropped = prune_nonces(self.axon.nonces, self.config.axon.max_timeout + ALLOWED_DELTA / 1e9 + 1.0)
            log.debug(f"forgot {dropped} caller endpoints' nonces; {len(self.axon.nonces)} remembered")
        # Charged here, after the signature check: in the blacklist anyone could spend a validator's budget
        # by putting its hotkey in a header.
        refusal = self.policy.charge(synapse.dendrite.hotkey)
        if refusal is not None:
            if self.metrics is not None:
                self.metrics.blacklist_rejected("rate_limit")
            raise RateLimited(refusal)

    def priority(self, synapse: StreamPrompting) -> float:
        hotkey = getattr(synapse.dendrite, "hotkey", None)
        priority = self.policy.priority(hotkey)
        self._admissions.issue(synapse.dendrite, priority, self.policy.caller_class(hotkey))
        return priority

    async def forward(self, synapse: StreamPrompting) -> StreamPrompting.BTStreamingResponse:
        arrived = time.monotonic()
        priority, caller = self._admissions.take(synapse.dendrite, self.policy.options.unknown_priority)
        if self.policy.closing:
            raise self._refused(synapse, caller, EngineClosed("miner is shutting down"))
        problem = request_problem(synapse, self.config.engine.max_prompt_chars)
        if problem is not None:
            raise self._refused(synapse, caller, InvalidRequest(problem))
        timeout = synapse.timeout if synapse.timeout and synapse.timeout > 0 else None
        request = GenerationRequest(messages=synapse_messages(synapse), sampling=self.sampling, timeout=timeout,
                                    priority=priority)
        pieces = self.engine.generate(request)
        # The status line goes out with the first byte, so wait for the first piece: errors that come before
        # any text still get their own status.
        try:
            first = await anext(pieces)
        except GenerationError as exc:
            raise self._refused(synapse, caller, exc) from exc
        if not first.text and first.finish_reason in _NOT_ANSWERED:
            # Ended before any text: a 200 with an empty body would read as an empty answer.
            await pieces.aclose()
            raise self._rejected(synapse, caller, first.finish_reason, 503,
                                 _NOT_ANSWERED[first.finish_reason].format(timeout=timeout))
        streamer = functools.partial(self._stream, request.request_id, first, pieces, RequestTimer(caller, arrived))
        return WatchedStreamingResponse(BTStreamingResponseModel(token_streamer=streamer), synapse=synapse)

    def _refused(self, synapse: StreamPrompting, caller: str, error: GenerationError) -> RequestRejected:
        """A request that failed before streaming: the contract's status and outcome for ``error`` (the miner
        answers an overload with the contract's 503)."""
        return self._rejected(synapse, caller, error.outcome, error.http_status, str(error))

    def _rejected(self, synapse: StreamPrompting, caller: str, outcome: str, status: int,
                  message: str) -> RequestRejected:
        if self.metrics is not None:
            self.metrics.observe_request(outcome, caller)
        return RequestRejected(synapse, status, message)

    async def _stream(self, request_id: str, first: Piece, pieces: AsyncIterator[Piece], seen: RequestTimer,
                      send: Send) -> None:
        """Send the pieces as they come. The status (200) went out before the first; an answer that cannot be
        finished after that raises ``StreamBroken``, which cuts the connection before the body's end marker."""
        piece = first
        sent = 0
        try:
            while True:
                if piece.text:
                    await send({"type": "http.response.body", "body": (piece.text + self.chunk_suffix).encode(),
                                "more_body": True})
                    sent += len(piece.text)
                    seen.text_sent()
                if piece.finish_reason is not None:
                    seen.ended(piece)
                    break
                piece = await anext(pieces)
        except GenerationFailed as exc:
            seen.outcome = exc.outcome
            log.error(f"{request_id}: generation failed after {sent} characters were streamed; cutting the "
                      f"connection so that the caller sees an incomplete answer: {exc}")
            raise StreamBroken(str(exc)) from exc
        except asyncio.CancelledError:
            seen.outcome = "disconnected"
            log.info(f"{request_id}: the caller disconnected after {sent} characters; generation cancelled")
            raise
        finally:
            await pieces.aclose()  # a stream that ends early (send failed, task cancelled) frees its engine slot
            seen.report(self.metrics)
        if piece.finish_reason in _CUT_SHORT:
            log.warning(f"{request_id}: {_CUT_SHORT[piece.finish_reason]} after {sent} characters; cutting the "
                        "connection so that the caller sees an incomplete answer")
            raise StreamBroken(piece.finish_reason)
        log.debug(f"{request_id}: finished ({piece.finish_reason})")


def _reachable(host: str | None) -> str:
    """An address a local client can connect to for a server listening on ``host``."""
    if host is None or host in _WILDCARDS:
        return miner_config.OFFLINE_IP
    return host


def setup_logging(config: bt.Config) -> None:
    bt.logging.set_config(config.logging)
    if not (config.logging.debug or config.logging.trace or config.logging.info):
        bt.logging.enable_info()  # the start-up report (device, model, warm-up) is worth seeing by default
    if not (config.logging.debug or config.logging.trace):
        # bittensor sets every logger in the process to its own level; at info, torch.compile alone reports
        # thousands of lines of graphs and guards at start-up.
        for name in list(logging.root.manager.loggerDict):
            if name.split(".")[0] in _QUIET_LIBRARIES:
                logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """``neurons/miner.py``: 0 after a clean shutdown, 1 when the miner cannot start, 2 for bad options."""
    try:
        config = miner_config.build_config(sys.argv[1:] if argv is None else argv)
    except miner_config.ConfigError as exc:
        print(f"miner: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    try:
        asyncio.run(Miner(config).run_until_signalled())
    except StartupError as exc:
        print(f"miner: {exc}", file=sys.stderr)
        return 1
    return 0
