"""The miner's command line: bittensor's own dotted options plus minercore's groups, parsed into a ``bt.Config``.

``model_options``, ``engine_options`` and ``blacklist_options`` turn the parsed config into the core's plain
dataclasses: the core (engine, model) never sees bittensor.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import bittensor as bt
from bittensor.core.config import DefaultMunch
from bittensor.core.settings import DEFAULTS

from ..backend import BACKENDS
from ..config import EngineOptions, ModelOptions
from ..device import DTYPES
from ..model import PRESETS
from .blacklist import BlacklistOptions, hotkey_set

FRAMINGS = ("raw", "newline")
MODES = ("echo", "generate")
COMPILE = ("auto", "on", "off")
DEFAULT_NETUID = 1  # the text-prompting subnet
OFFLINE_WALLET_PATH = "~/.bittensor/minercore-wallets"  # --offline keys never mix with real wallets
OFFLINE_IP = "127.0.0.1"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_TIMEOUT_S = 600.0


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
        description="minercore's text-prompting miner: serves StreamPrompting from minercore's engine.",
        formatter_class=HelpFormatter)
    parser.add_argument("--netuid", type=int, default=DEFAULT_NETUID, help="The subnet to mine on.")
    parser.add_argument("--offline", action="store_true",
                        help="No chain: create or reuse a password-less wallet (under "
                             f"{OFFLINE_WALLET_PATH} unless --wallet.path is given), listen on "
                             f"{OFFLINE_IP} unless --axon.ip is given, accept any correctly signed hotkey "
                             "(unless allow/deny lists are given) and write --axon.info_file once listening.")
    bt.Wallet.add_args(parser)
    bt.Subtensor.add_args(parser)
    bt.Axon.add_args(parser)
    bt.logging.add_args(parser)
    # Their defaults depend on --offline, so "not given" must stay visible: None, resolved by wallet_path()
    # and bind_ip().
    _default_depends_on_offline(parser, "wallet.path",
                                f"{DEFAULTS.wallet.path}, or {OFFLINE_WALLET_PATH} with --offline")
    _default_depends_on_offline(parser, "axon.ip",
                                f"all interfaces, or {OFFLINE_IP} with --offline")
    parser.add_argument("--axon.info_file", type=str, default=None,
                        help="Once the axon listens, write its ip, port, hotkey, coldkey and pid here as JSON "
                             "(for neurons/client.py --axon.info_file); removed at shutdown.")
    parser.add_argument("--axon.max_body_bytes", type=_positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="Requests with a larger body get 413 before it is read (requests without a "
                             "Content-Length get 411). A prompt takes 1 byte per ASCII character in the JSON "
                             "body, up to 12 for others.")
    parser.add_argument("--axon.max_timeout", type=_positive_float, default=DEFAULT_MAX_TIMEOUT_S,
                        help="Largest request timeout (seconds) accepted; larger, non-finite or non-positive ones "
                             "get 401. The timeout is not signed and widens bittensor's window for a caller's "
                             "first nonce (4 s plus the timeout), so this bounds how long a captured request "
                             "could be replayed.")

    defaults = ModelOptions()
    model = parser.add_argument_group("model")
    model.add_argument("--model.backend", choices=BACKENDS, default=defaults.backend,
                       help="simulated: a GPT-2-shaped model in this process; hf: any Hugging Face causal LM "
                            "directory (--model.path); upstream: an OpenAI-compatible server (--model.upstream_url).")
    model.add_argument("--model.preset", choices=tuple(PRESETS), default=defaults.preset,
                       help="Size of the simulated model.")
    model.add_argument("--model.mode", choices=MODES, default=defaults.mode,
                       help="echo: answer the last message byte for byte (the seed's behaviour); "
                            "generate: the model's own sampling.")
    model.add_argument("--model.weights", default=defaults.weights,
                       help="Simulated backend: a GPT-2-family checkpoint directory or hub name (default: "
                            "random weights from --model.seed).")
    model.add_argument("--model.path", default=defaults.path, help="hf backend: the model directory.")
    model.add_argument("--model.tokenizer", default=defaults.tokenizer,
                       help="gpt2 (bundled, offline) or a Hugging Face tokenizer name or directory.")
    model.add_argument("--model.compile", choices=COMPILE, default=defaults.compile,
                       help="torch.compile the decode step (auto: on; CUDA graphs on CUDA). Costs seconds of "
                            "warm-up at start-up.")
    model.add_argument("--model.max_context", type=_positive_int, default=defaults.max_context,
                       help="Longest prompt plus answer, in tokens (default: the model's own context, at most "
                            "4096). Echo answers prompts of up to (max_context - 1) / 2 tokens in full.")
    model.add_argument("--model.seed", type=int, default=defaults.seed,
                       help="Seed of the simulated model's random weights.")
    model.add_argument("--model.upstream_url", default=defaults.upstream_url,
                       help="upstream backend: base URL of the OpenAI-compatible API, e.g. http://gpu-box:8000/v1.")
    model.add_argument("--model.upstream_model", default=defaults.upstream_model,
                       help="upstream backend: the model name to request (default: the upstream's first model).")
    model.add_argument("--model.upstream_api_key_env", default=defaults.upstream_api_key_env,
                       help="upstream backend: name of the environment variable holding the API key.")
    model.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N | mps.")
    model.add_argument("--dtype", choices=("auto", *DTYPES), default=defaults.dtype,
                       help="auto: bfloat16 on recent CUDA GPUs, float16 on older ones, float32 elsewhere.")

    engine_defaults = EngineOptions()
    engine = parser.add_argument_group("engine")
    engine.add_argument("--engine.max_batch", type=_positive_int, default=engine_defaults.max_batch,
                        help="Streams decoded together in one batch.")
    engine.add_argument("--engine.max_queue", type=_non_negative_int, default=engine_defaults.max_queue,
                        help="Requests that may wait for a free slot; past it requests get 503 at once.")
    engine.add_argument("--engine.max_new_tokens", type=_positive_int, default=engine_defaults.max_new_tokens,
                        help="Longest answer, in tokens.")
    engine.add_argument("--engine.max_prompt_chars", type=_positive_int, default=engine_defaults.max_prompt_chars,
                        help="Longer prompts get 400 before they are tokenized.")

    stream = parser.add_argument_group("stream")
    stream.add_argument("--stream.flush_tokens", type=_positive_int, default=engine_defaults.flush_tokens,
                        help="After a stream's first text, send once this many tokens are pending...")
    stream.add_argument("--stream.flush_ms", type=_non_negative_float, default=engine_defaults.flush_ms,
                        help="...or this many milliseconds after the stream's last send.")
    stream.add_argument("--stream.framing", choices=FRAMINGS, default="raw",
                        help="raw: the answer's UTF-8 text in chunks of whole characters. newline: every chunk "
                             "followed by '\\n', for validators that parse the seed's way (split on newlines, "
                             "drop empty parts); such parsers also lose the answer's own newlines.")

    blacklist = parser.add_argument_group("blacklist")
    blacklist.add_argument("--blacklist.allow_unregistered", action="store_true",
                           help="Accept hotkeys that are not registered on --netuid.")
    blacklist.add_argument("--blacklist.require_validator_permit", action="store_true",
                           help="Accept only hotkeys holding a validator permit.")
    blacklist.add_argument("--blacklist.min_stake", type=_non_negative_float, default=0.0,
                           help="Accept only hotkeys with at least this stake.")
    blacklist.add_argument("--blacklist.allow", nargs="+", default=[], metavar="HOTKEY",
                           help="Hotkeys always accepted (past the registration, permit and stake checks; the "
                                "rate limit still applies). With --offline, only these are accepted.")
    blacklist.add_argument("--blacklist.deny", nargs="+", default=[], metavar="HOTKEY",
                           help="Hotkeys always refused.")
    blacklist.add_argument("--blacklist.rate_limit", type=_non_negative_int, default=0,
                           help="Requests each hotkey may make per --blacklist.rate_window (a token bucket, so "
                                "this is also the largest burst); 0 disables. Counted after the signature check, "
                                "so refusals read 401 'Not Verified with error: rate limit exceeded ...'.")
    blacklist.add_argument("--blacklist.rate_window", type=_positive_float, default=60.0,
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
    neuron.add_argument("--neuron.sync_every_blocks", type=_positive_int, default=100,
                        help="Re-sync the metagraph (in the background) every this many blocks.")
    neuron.add_argument("--neuron.shutdown_grace", type=_non_negative_float, default=10.0,
                        help="On SIGINT/SIGTERM, seconds running streams get to finish before they are cancelled.")
    return parser


def parse_config(parser: argparse.ArgumentParser, args: Sequence[str]) -> bt.Config:
    """Parse ``args`` strictly (unknown options are errors, ``--help`` exits) into a ``bt.Config`` tree.

    bittensor 10's ``bt.Config(parser)`` parses nothing unless ``BT_NO_PARSE_CLI_ARGS`` is false, so the
    parsing is argparse's and ``bt.Config`` only contributes bittensor's defaults and the dotted tree.
    """
    namespace = parser.parse_args(list(args))
    config = bt.Config()
    for dest, value in vars(namespace).items():
        node = config
        *parents, leaf = dest.split(".")
        for part in parents:
            if not isinstance(node.get(part), DefaultMunch):
                node[part] = DefaultMunch()
            node = node[part]
        node[leaf] = value
    return config


def build_config(args: Sequence[str]) -> bt.Config:
    config = parse_config(build_parser(), args)
    check_config(config)
    return config


def check_config(config: bt.Config) -> None:
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


def model_options(config: bt.Config) -> ModelOptions:
    model = config.model
    return ModelOptions(backend=model.backend, preset=model.preset, mode=model.mode, weights=model.weights,
                        path=model.path, tokenizer=model.tokenizer, device=config.device, dtype=config.dtype,
                        compile=model.compile, max_context=model.max_context, seed=model.seed,
                        upstream_url=model.upstream_url, upstream_model=model.upstream_model,
                        upstream_api_key_env=model.upstream_api_key_env)


def engine_options(config: bt.Config) -> EngineOptions:
    return EngineOptions(max_batch=config.engine.max_batch, max_queue=config.engine.max_queue,
                         flush_tokens=config.stream.flush_tokens, flush_ms=config.stream.flush_ms,
                         max_new_tokens=config.engine.max_new_tokens,
                         max_prompt_chars=config.engine.max_prompt_chars)


def blacklist_options(config: bt.Config) -> BlacklistOptions:
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


def wallet_path(config: bt.Config) -> str:
    """--wallet.path as given; without one, minercore's own directory offline and bittensor's default online."""
    if config.wallet.path:
        return os.path.expanduser(config.wallet.path)
    return os.path.expanduser(OFFLINE_WALLET_PATH if config.offline else DEFAULTS.wallet.path)


def bind_ip(config: bt.Config) -> str | None:
    """The address uvicorn listens on: --axon.ip when given, loopback offline, else None (all interfaces)."""
    if config.axon.ip:
        return config.axon.ip.strip("[]")  # "[::]" -> "::", the form uvicorn's host takes
    return OFFLINE_IP if config.offline else None


def _default_depends_on_offline(parser: argparse.ArgumentParser, dest: str, default_text: str) -> None:
    for action in parser._actions:  # argparse has no public lookup by dest
        if action.dest == dest:
            action.default = None
            action.help = f"{action.help} (default: {default_text})"
            return
    raise LookupError(f"no --{dest} option")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value
