"""The miner's command line: bittensor's familiar dotted options (``--wallet.name``, ``--axon.port``...) plus
minercore's groups, parsed into a dotted ``Config`` tree. No bittensor here: 11.x no longer parses command lines,
and the same options serve both SDKs.

``model_options``, ``engine_options`` and ``blacklist_options`` turn the parsed config into the core's plain
dataclasses: the core (engine, model) never sees bittensor.
"""

from __future__ import annotations

import argparse
import os
import types
from collections.abc import Sequence
from dataclasses import dataclass

from ..contract import options
from ..contract.config import EngineOptions, ModelOptions
from ..contract.options import non_negative_float, non_negative_int, positive_float, positive_int
from . import sdk
from .blacklist import BlacklistOptions, hotkey_set

FRAMINGS = ("raw", "newline")
DEFAULT_NETUID = 1  # the text-prompting subnet
OFFLINE_WALLET_PATH = "~/.bittensor/minercore-wallets"  # --offline keys never mix with real wallets
OFFLINE_IP = "127.0.0.1"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_TIMEOUT_S = 600.0


DEFAULT_AXON_PORT = 8091
# What an answer ending at its deadline still needs before the caller's timeout: the caller's time before the
# request reached the app, the event loop's delay in running the deadline's timer, the last write and the
# network. On loopback with every core busy the first three took up to 0.2 s (benchmarks/RESULTS.md, "Deadlines
# under contention"); the rest is for the network (a distant validator's round trip, a congested link).
DEFAULT_DEADLINE_MARGIN_S = 0.5


class Config(types.SimpleNamespace):
    """The parsed options as a tree: ``--axon.port`` is ``config.axon.port``."""


class ConfigError(ValueError):
    """The options are individually valid but make no sense together (or name bad hotkeys)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None: those options say in their help what not giving them means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurons/miner.py",
        description="minercore's text-prompting miner, on bittensor 10 or 11: serves StreamPrompting (10.x "
                    "Dendrites) and btauth/1-signed /v1/chat/completions and /v1/completions from minercore's "
                    "engine (or an upstream server).",
        formatter_class=HelpFormatter)
    parser.add_argument("--netuid", type=int, default=DEFAULT_NETUID, help="The subnet to mine on.")
    parser.add_argument("--offline", action="store_true",
                        help="No chain: create or reuse a password-less wallet (under "
                             f"{OFFLINE_WALLET_PATH} unless --wallet.path is given), listen on "
                             f"{OFFLINE_IP} unless --axon.ip is given, accept any correctly signed hotkey "
                             "(unless allow/deny lists are given) and write --axon.info_file once listening.")
    _add_chain_arguments(parser)
    parser.add_argument("--axon.info_file", type=str, default=None,
                        help="Once the axon listens, write its ip, port, hotkey, coldkey and pid here as JSON "
                             "(for neurons/client.py --axon.info_file); removed at shutdown.")
    parser.add_argument("--axon.max_body_bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="Requests with a larger body get 413 before it is read (requests without a "
                             "Content-Length get 411). A prompt takes 1 byte per ASCII character in the JSON "
                             "body, up to 12 for others.")
    parser.add_argument("--axon.max_timeout", type=positive_float, default=DEFAULT_MAX_TIMEOUT_S,
                        help="Largest request timeout (seconds) accepted: StreamPrompting's timeout field and "
                             "X-Client-Timeout; larger, non-finite or non-positive ones get 401 (StreamPrompting) "
                             "or 400. The StreamPrompting timeout is not signed and widens the window for a "
                             "caller's first nonce (4 s plus the timeout), so this bounds how long a captured "
                             "request could be replayed.")

    groups = options.add_miner_arguments(parser)  # model, engine and stream: the core's option table
    stream = groups["stream"]
    stream.add_argument("--stream.framing", choices=FRAMINGS, default="raw",
                        help="raw: the answer's UTF-8 text in chunks of whole characters. newline: every chunk "
                             "followed by '\\n', for validators that parse the seed's way (split on newlines, "
                             "drop empty parts); such parsers also lose the answer's own newlines.")
    stream.add_argument("--stream.deadline_margin", type=non_negative_float, default=DEFAULT_DEADLINE_MARGIN_S,
                        help="An answer that cannot finish before the caller's timeout (StreamPrompting's timeout, "
                             "X-Client-Timeout) ends this many seconds before it, with the text so far and a normal "
                             "end of stream (counted as 'deadline'). It covers the time before the request reached the "
                             "miner, event-loop delay under load and the last write (up to 0.2 s on a busy "
                             "loopback) and the network.")

    blacklist = parser.add_argument_group("blacklist")
    blacklist.add_argument("--blacklist.allow_unregistered", action="store_true",
                           help="Accept hotkeys that are not registered on --netuid.")
    blacklist.add_argument("--blacklist.require_validator_permit", action="store_true",
                           help="Accept only hotkeys holding a validator permit.")
    blacklist.add_argument("--blacklist.min_stake", type=non_negative_float, default=0.0,
                           help="Accept only hotkeys with at least this stake.")
    blacklist.add_argument("--blacklist.allow", nargs="+", default=[], metavar="HOTKEY",
                           help="Hotkeys always accepted (past the registration, permit and stake checks; the "
                                "rate limit still applies). With --offline, only these are accepted.")
    blacklist.add_argument("--blacklist.deny", nargs="+", default=[], metavar="HOTKEY",
                           help="Hotkeys always refused.")
    blacklist.add_argument("--blacklist.rate_limit", type=non_negative_int, default=0,
                           help="Requests each hotkey may make per --blacklist.rate_window (a token bucket, so "
                                "this is also the largest burst); 0 disables. Counted after the signature check; "
                                "refusals get 429.")
    blacklist.add_argument("--blacklist.rate_window", type=positive_float, default=60.0,
                           help="Seconds over which --blacklist.rate_limit requests are allowed.")

    priority = parser.add_argument_group("priority")
    priority.add_argument("--priority.unknown", type=float, default=0.0,
                          help="Priority of callers not in the metagraph; everyone else's is their stake. "
                               "Higher priority is admitted to the engine first when requests wait.")
    priority.add_argument("--priority.allowed", type=float, default=None,
                          help="Priority of allow-listed callers (default: their stake, like everyone else).")

    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--metrics.port", type=int, default=0,
                         help="Serve Prometheus metrics on this port (0: off): requests by outcome and caller class, "
                              "TTFT and chunk-gap histograms, tokens, active/queued streams, blacklist refusals, "
                              "upstream errors.")
    metrics.add_argument("--metrics.addr", default="127.0.0.1",
                         help="Address the metrics endpoint listens on (loopback unless a scraper elsewhere needs it).")

    neuron = parser.add_argument_group("neuron")
    neuron.add_argument("--neuron.sync_every_blocks", type=positive_int, default=100,
                        help="Re-sync the metagraph (in the background) every this many blocks.")
    neuron.add_argument("--neuron.shutdown_grace", type=non_negative_float, default=10.0,
                        help="On SIGINT/SIGTERM, seconds running streams get to finish before they are cancelled.")
    return parser


def parse_config(parser: argparse.ArgumentParser, args: Sequence[str]) -> Config:
    """Parse ``args`` strictly (unknown options are errors, ``--help`` exits) into a ``Config`` tree."""
    namespace = parser.parse_args(list(args))
    config = Config()
    for dest, value in vars(namespace).items():
        node = config
        *parents, leaf = dest.split(".")
        for part in parents:
            child = getattr(node, part, None)
            if not isinstance(child, Config):
                child = Config()
                setattr(node, part, child)
            node = child
        setattr(node, leaf, value)
    return config


def build_config(args: Sequence[str]) -> Config:
    config = parse_config(build_parser(), args)
    check_config(config)
    return config


def check_config(config: Config) -> None:
    if config.model.backend == "hf" and not config.model.path:
        raise ConfigError("--model.backend hf needs --model.path")
    if config.model.backend == "upstream" and not config.model.upstream_url:
        raise ConfigError("--model.backend upstream needs --model.upstream_url")
    try:
        allow, deny = hotkey_set(config.blacklist.allow), hotkey_set(config.blacklist.deny)
    except ValueError as exc:
        raise ConfigError(f"--blacklist.allow/--blacklist.deny: {exc}") from exc
    if allow & deny:
        raise ConfigError(f"hotkeys on both the allow and the deny list: {', '.join(sorted(allow & deny))}")


def core_options(config: Config) -> tuple[ModelOptions, EngineOptions]:
    return options.core_options(lambda option: _lookup(config, option.miner_dest))


def model_options(config: Config) -> ModelOptions:
    return core_options(config)[0]


def engine_options(config: Config) -> EngineOptions:
    return core_options(config)[1]


def _lookup(config: Config, dest: str) -> object:
    node = config
    for part in dest.split("."):
        node = getattr(node, part)
    return node


def blacklist_options(config: Config) -> BlacklistOptions:
    allow = hotkey_set(config.blacklist.allow)
    deny = hotkey_set(config.blacklist.deny)
    # Offline there is no metagraph: every caller is "unregistered", so accept them all unless an allow list
    # says who may come in.
    allow_unregistered = config.blacklist.allow_unregistered or (config.offline and not allow)
    return BlacklistOptions(allow_unregistered=allow_unregistered,
                            require_validator_permit=config.blacklist.require_validator_permit,
                            min_stake=config.blacklist.min_stake, allow=allow, deny=deny,
                            rate_limit=config.blacklist.rate_limit, rate_window=config.blacklist.rate_window,
                            unknown_priority=config.priority.unknown, allowed_priority=config.priority.allowed)


def wallet_path(config: Config) -> str:
    """--wallet.path as given; without one, minercore's own directory offline and bittensor's default online."""
    if config.wallet.path:
        return os.path.expanduser(config.wallet.path)
    return os.path.expanduser(OFFLINE_WALLET_PATH if config.offline else sdk.DEFAULT_WALLET_PATH)


def bind_ip(config: Config) -> str | None:
    """The address uvicorn listens on: --axon.ip when given, loopback offline, else None (all interfaces)."""
    if config.axon.ip:
        return config.axon.ip.strip("[]")  # "[::]" -> "::", the form uvicorn's host takes
    return OFFLINE_IP if config.offline else None


def _add_chain_arguments(parser: argparse.ArgumentParser) -> None:
    """Identity, chain and listening options, spelled as bittensor 10's ``add_args`` spelled them."""
    wallet = parser.add_argument_group("wallet")
    wallet.add_argument("--wallet.name", default="default", help="The wallet (coldkey) name.")
    wallet.add_argument("--wallet.hotkey", default="default", help="The hotkey name within the wallet.")
    wallet.add_argument("--wallet.path", default=None,
                        help=f"Where wallets live (default: {sdk.DEFAULT_WALLET_PATH}, or {OFFLINE_WALLET_PATH} "
                             "with --offline).")
    subtensor = parser.add_argument_group("subtensor")
    subtensor.add_argument("--subtensor.network", default=sdk.DEFAULT_NETWORK,
                           help="finney, test, local, or a ws:// endpoint.")
    subtensor.add_argument("--subtensor.chain_endpoint", default=None,
                           help="An explicit ws:// endpoint (overrides --subtensor.network).")
    axon = parser.add_argument_group("axon (the miner's HTTP server)")
    axon.add_argument("--axon.port", type=_port, default=DEFAULT_AXON_PORT, help="The port to listen on.")
    axon.add_argument("--axon.ip", default=None,
                      help=f"The address to listen on (default: all interfaces, or {OFFLINE_IP} with --offline).")
    axon.add_argument("--axon.external_ip", default=None,
                      help="The public address validators reach this miner at; online, the miner publishes it "
                           "on-chain at start-up. Without it nothing is published, and the btcli command to publish "
                           "it is printed instead.")
    axon.add_argument("--axon.external_port", type=_port, default=None,
                      help="The public port, when a proxy or NAT maps it (default: --axon.port).")
    logging_group = parser.add_argument_group("logging")
    logging_group.add_argument("--logging.debug", action="store_true", help="Log at debug level.")
    logging_group.add_argument("--logging.trace", action="store_true", help="Log at debug level (bittensor's name).")
    logging_group.add_argument("--logging.info", action="store_true", help="Log at info level (the default).")


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {value}")
    return value


@dataclass(frozen=True)
class ServerSettings:
    """What the miner's HTTP server (``app``) needs from its options."""

    hotkey: str  # this miner's: the receiver of every signed request
    external_ip: str
    external_port: int
    max_body_bytes: int
    max_timeout: float  # largest timeout a StreamPrompting caller may ask for (it widens the nonce window)
    max_prompt_chars: int
    max_new_tokens: int
    deadline_margin: float = DEFAULT_DEADLINE_MARGIN_S
    chunk_suffix: str = ""  # "\n" for --stream.framing newline
    served_model_name: str = "minercore"
    version: int = 10_005_000  # the axon version reported to v10 dendrites
