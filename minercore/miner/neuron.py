"""The miner neuron: wallet, chain, HTTP server and engine lifecycle, on bittensor 10 or 11.

One asyncio loop (the main thread's) runs the HTTP server (``app.MinerServer`` under uvicorn), the handlers and
the engine's consumer side. Chain calls after start-up happen only in the metagraph sync thread, which owns the
chain connection from then on. Everything SDK-specific goes through ``sdk``.

Start-up: load the wallet (offline: create a password-less one), check the hotkey is registered (online; the
btcli command to register it otherwise), start the backend, listen, publish the endpoint (online with
``--axon.external_ip``; without it the btcli command to publish it is printed), then refresh the metagraph in
the background, retrying failed reads. SIGINT/SIGTERM: refuse new requests, give running streams the grace
period, cancel the rest, close the connections and the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn

from ..backends import Backend, build_backend
from ..contract.config import served_model_name
from ..serve.metrics import Metrics
from ..serve.server import KEEP_ALIVE_S
from . import config as miner_config
from . import sdk
from .app import MinerServer
from .blacklist import BlacklistPolicy, MetagraphView
from .config import ServerSettings
from .offline import write_axon_info

log = logging.getLogger(__name__)

_LISTEN_TIMEOUT_S = 30.0
# After the engine has finished or cancelled every request, streams only flush what they hold; connections
# still open after this long (a reader that stopped reading) are cut.
_HTTP_DRAIN_S = 5.0
_SYNC_JOIN_S = 10.0
_WILDCARDS = ("0.0.0.0", "::", "")
_QUIET_LIBRARIES = ("torch",)  # kept at warning unless --logging.debug/trace


class StartupError(RuntimeError):
    """The miner cannot start; the message says why and what to do about it."""


class _HttpServer(uvicorn.Server):
    """uvicorn without its signal capture: the miner owns SIGINT/SIGTERM and shuts down in its own order
    (refuse new requests, drain the engine, then close the connections)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Miner:
    """Serves StreamPrompting and the signed OpenAI routes from a minercore backend (the engine, or an upstream
    server).

    ``engine`` and ``subtensor`` (the chain client) are built from ``config`` unless given (tests pass fakes);
    ``sync_interval`` is how often, in seconds, the sync thread polls the chain's block height (a block is about
    12 s).
    """

    def __init__(self, config: miner_config.Config, *, engine: Backend | None = None, subtensor: Any = None,
                 sync_interval: float = 12.0) -> None:
        self.config = config
        self.offline = bool(config.offline)
        self.metrics = Metrics() if config.metrics.port else None
        self.engine = engine if engine is not None else build_backend(
            miner_config.model_options(config), miner_config.engine_options(config), metrics=self.metrics)
        self.policy = BlacklistPolicy(miner_config.blacklist_options(config))
        self.wallet: Any = None
        self.server: MinerServer | None = None
        self.info: dict[str, Any] | None = None  # what --axon.info_file holds, once listening
        self.published = False
        self.syncs = 0
        self.sync_failures = 0
        self._subtensor = subtensor
        self._sync_interval = sync_interval
        self._sync_stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self._http: _HttpServer | None = None
        self._http_task: asyncio.Task[None] | None = None
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
        hotkey = sdk.hotkey_of(self.wallet)
        if not self.offline:
            await self._connect(hotkey)
        model = config.model.path or f"preset {config.model.preset}"
        log.info(f"loading the model (backend {config.model.backend}, {model}, device {config.device}, "
                 f"dtype {config.dtype})")
        try:
            await self.engine.start()
        except Exception as exc:
            raise StartupError(f"the engine failed to start: {type(exc).__name__}: {exc}") from exc
        engine = self.engine
        if config.model.backend == "upstream":
            log.info(f"backend upstream ready: {engine.runner_description}")
        else:
            loop_state = "active" if engine.stream_loop == "cython" else "inactive (pure-Python twin)"
            serving = ", ".join(f"{k} {v}" for k, v in engine.serving.items() if k != "backend")
            log.info(f"backend {engine.backend_name} ready: {engine.runner_description}; serving {serving}; "
                     f"mode {config.model.mode}; compile warm-up {engine.warmup_seconds:.2f}s; compiled stream "
                     f"loop {loop_state}")
        if self.metrics is not None:
            self.metrics.bind(self.engine)
            port = self.metrics.start_http(config.metrics.port, config.metrics.addr)
            log.info(f"Prometheus metrics on http://{config.metrics.addr}:{port}/metrics")
        host = miner_config.bind_ip(config)
        external_ip = config.axon.external_ip or _reachable(host)
        external_port = config.axon.external_port or config.axon.port
        await self._listen(host, hotkey, external_ip, external_port)
        if not self.offline:
            await asyncio.to_thread(self._publish, external_port)
            self._start_sync()
        self.info = {"ip": external_ip, "port": external_port, "hotkey": hotkey,
                     "coldkey": sdk.coldkey_of(self.wallet), "pid": os.getpid(), "netuid": config.netuid,
                     "offline": self.offline, "framing": config.stream.framing, "bittensor": sdk.VERSION}
        if config.axon.info_file:
            write_axon_info(config.axon.info_file, self.info)
        where = f"{external_ip}:{external_port}"
        log.info(f"serving StreamPrompting and /v1 (btauth/1) on {where} as {hotkey} with bittensor {sdk.VERSION}"
                 + (" (offline)" if self.offline else f" on netuid {config.netuid}"))
        if config.axon.info_file:
            print(f"miner listening on {where}; query it with:\n  python neurons/client.py "
                  f"--axon.info_file {config.axon.info_file} --prompt 'Hello'", flush=True)

    def _load_wallet(self) -> Any:
        config = self.config
        path = miner_config.wallet_path(config)
        if self.offline:
            return sdk.ensure_wallet(config.wallet.name, config.wallet.hotkey, path)
        try:
            return sdk.load_wallet(config.wallet.name, config.wallet.hotkey, path)
        except Exception as exc:
            raise StartupError(
                f"cannot load wallet {config.wallet.name!r} hotkey {config.wallet.hotkey!r} under {path}: {exc}. "
                "Create it with btcli, or use --offline to run without a chain") from exc

    async def _connect(self, hotkey: str) -> None:
        config = self.config
        network = f"network {config.subtensor.network}" + (
            f" (endpoint {config.subtensor.chain_endpoint})" if config.subtensor.chain_endpoint else "")
        if self._subtensor is None:
            try:
                self._subtensor = await asyncio.to_thread(sdk.connect, config.subtensor.network,
                                                          config.subtensor.chain_endpoint)
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
                f"netuid {config.netuid} at {network}. Register it first: "
                f"{sdk.register_command(config.netuid, config.wallet.name, config.wallet.hotkey)} "
                "(or use --offline to run without a chain)")
        self.policy.view = view
        log.info(f"registered on netuid {config.netuid} as uid {view.get(hotkey).uid}; metagraph of "
                 f"{len(view)} neurons at block {view.block}")

    def _fetch_view(self) -> MetagraphView:
        netuid = self.config.netuid
        rows, block = sdk.metagraph_rows(self._subtensor, netuid)
        return MetagraphView.from_rows(rows, netuid, block)

    async def _listen(self, host: str | None, hotkey: str, external_ip: str, external_port: int) -> None:
        config = self.config
        settings = ServerSettings(
            hotkey=hotkey, external_ip=external_ip, external_port=external_port,
            max_body_bytes=config.axon.max_body_bytes, max_timeout=config.axon.max_timeout,
            max_prompt_chars=config.engine.max_prompt_chars, max_new_tokens=config.engine.max_new_tokens,
            deadline_margin=config.stream.deadline_margin,
            chunk_suffix="\n" if config.stream.framing == "newline" else "",  # the seed's framing
            served_model_name=served_model_name(miner_config.model_options(config)))
        self.server = MinerServer(self.engine, self.policy, settings, metrics=self.metrics)
        self._http = _HttpServer(uvicorn.Config(self.server.build(), host=host or "0.0.0.0", port=config.axon.port,
                                                log_level="warning", lifespan="off",
                                                timeout_keep_alive=KEEP_ALIVE_S,
                                                timeout_graceful_shutdown=_HTTP_DRAIN_S))
        self._http_task = asyncio.create_task(self._serve_http(), name="miner-http")
        deadline = asyncio.get_running_loop().time() + _LISTEN_TIMEOUT_S
        while not self._http.started:  # set by uvicorn once its own sockets listen
            if self._http_task.done() or asyncio.get_running_loop().time() > deadline:
                raise StartupError(f"the miner could not listen on {host or '0.0.0.0'}:{config.axon.port} "
                                   "(is the port in use?)")
            await asyncio.sleep(0.01)

    async def _serve_http(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind; _listen reports that
            await self._http.serve()

    def _publish(self, external_port: int) -> None:
        config = self.config
        if not config.axon.external_ip:
            command = sdk.publish_command(config.netuid, external_port, config.wallet.name, config.wallet.hotkey)
            log.warning("--axon.external_ip not given: the endpoint was not published. Validators find this miner "
                        f"once it is; publish it with:\n  {command}")
            return
        endpoint = sdk.Endpoint(self.wallet, config.axon.external_ip, external_port)
        try:
            sdk.publish(self._subtensor, endpoint, config.netuid)
        except Exception as exc:
            raise StartupError(f"could not publish the endpoint {config.axon.external_ip}:{external_port} on "
                               f"netuid {config.netuid}: {exc}") from exc
        self.published = True
        log.info(f"published {config.axon.external_ip}:{external_port} on netuid {config.netuid}")

    def _start_sync(self) -> None:
        self._sync_thread = threading.Thread(target=self._sync_loop, args=(self.policy.view.block,),
                                             name="metagraph-sync", daemon=True)
        self._sync_thread.start()

    def _sync_loop(self, last_block: int | None) -> None:
        every = self.config.neuron.sync_every_blocks
        hotkey = sdk.hotkey_of(self.wallet)
        while not self._sync_stop.wait(self._sync_interval):
            try:
                block = sdk.current_block(self._subtensor)
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
        """Refuse new requests, give running streams the grace period, cancel the rest, close the server."""
        if self._stopped:
            return
        self._stopped = True
        self.policy.closing = True
        grace = self.config.neuron.shutdown_grace
        log.info(f"shutting down: running streams get up to {grace:g}s to finish")
        await self.engine.shutdown(grace=grace)
        if self._http_task is not None:
            self._http.should_exit = True
            await self._http_task
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
        if self._subtensor is not None:
            try:
                await asyncio.to_thread(sdk.close, self._subtensor)
            except Exception as exc:  # noqa: BLE001 - closing a dead connection must not fail the shutdown
                log.debug(f"closing the subtensor connection failed: {exc}")


def _reachable(host: str | None) -> str:
    """An address a local client can connect to for a server listening on ``host``."""
    if host is None or host in _WILDCARDS:
        return miner_config.OFFLINE_IP
    return host


def setup_logging(config: miner_config.Config) -> None:
    """Standard logging to stderr: info by default (the start-up report is worth seeing), debug with
    --logging.debug or --logging.trace; noisy libraries stay at warning unless debugging."""
    debugging = config.logging.debug or config.logging.trace
    logging.basicConfig(level=logging.DEBUG if debugging else logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if not debugging:
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
