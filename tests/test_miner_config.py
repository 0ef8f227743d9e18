"""The miner's command line: every option documented, parsed into bt.Config and mapped onto the core's options."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import new_keypair

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.miner import config as miner_config
from minercore.miner.config import ConfigError, build_config, build_parser

ROOT = Path(__file__).resolve().parents[1]

BITTENSOR_OPTIONS = ["--netuid", "--wallet.name", "--wallet.hotkey", "--wallet.path", "--subtensor.network",
                     "--subtensor.chain_endpoint", "--axon.ip", "--axon.port", "--axon.external_ip",
                     "--logging.debug", "--logging.trace"]
MINERCORE_OPTIONS = [
    "--model.backend", "--model.preset", "--model.mode", "--model.weights", "--model.path", "--model.tokenizer",
    "--model.compile", "--model.max_context", "--model.seed", "--device", "--dtype",
    "--engine.max_batch", "--engine.max_queue", "--engine.max_new_tokens", "--engine.max_prompt_chars",
    "--stream.flush_tokens", "--stream.flush_ms", "--stream.framing",
    "--blacklist.allow_unregistered", "--blacklist.require_validator_permit", "--blacklist.min_stake",
    "--blacklist.allow", "--blacklist.deny", "--blacklist.rate_limit", "--blacklist.rate_window",
    "--priority.unknown", "--priority.allowed", "--neuron.sync_every_blocks", "--neuron.shutdown_grace",
    "--offline", "--axon.info_file", "--axon.max_body_bytes", "--axon.max_timeout",
]


def hotkey() -> str:
    return new_keypair().ss58_address


@pytest.fixture(scope="module")
def help_text() -> str:
    """The real entry point's --help, in a subprocess like an operator would run it."""
    out = subprocess.run([sys.executable, "neurons/miner.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_documents_every_option(help_text):
    for option in BITTENSOR_OPTIONS + MINERCORE_OPTIONS:
        assert option in help_text, option
    documented = {s for action in build_parser()._actions for s in action.option_strings}
    assert set(BITTENSOR_OPTIONS + MINERCORE_OPTIONS) <= documented
    for action in build_parser()._actions:  # nothing without a sentence of help
        assert action.help and len(action.help) > 10, action.option_strings
    assert "lose the answer's own newlines" in " ".join(help_text.split())


def test_every_core_option_has_a_flag():
    """A field added to ModelOptions/EngineOptions without a flag fails here instead of going unset."""
    dests = {action.dest for action in build_parser()._actions}
    renamed = {"device": "device", "dtype": "dtype", "flush_tokens": "stream.flush_tokens",
               "flush_ms": "stream.flush_ms"}
    for field in dataclasses.fields(ModelOptions):
        assert renamed.get(field.name, f"model.{field.name}") in dests, field.name
    for field in dataclasses.fields(EngineOptions):
        assert renamed.get(field.name, f"engine.{field.name}") in dests, field.name


def test_defaults_are_the_core_defaults():
    config = build_config(["--offline"])
    assert miner_config.model_options(config) == ModelOptions()
    assert miner_config.engine_options(config) == EngineOptions()
    assert config.stream.framing == "raw" and config.netuid == 1


def test_options_reach_the_core_dataclasses():
    config = build_config([
        "--model.backend", "simulated", "--model.preset", "gpt2", "--model.mode", "generate", "--model.weights",
        "/w", "--model.path", "/p", "--model.tokenizer", "tok", "--model.compile", "off", "--model.max_context",
        "512", "--model.seed", "7", "--model.upstream_url", "http://u/v1", "--model.upstream_model", "m",
        "--model.upstream_api_key_env", "KEY", "--device", "cpu", "--dtype", "bfloat16",
        "--engine.max_batch", "8", "--engine.max_queue", "0", "--engine.max_new_tokens", "99",
        "--engine.max_prompt_chars", "1000", "--stream.flush_tokens", "4", "--stream.flush_ms", "7.5"])
    assert miner_config.model_options(config) == ModelOptions(
        backend="simulated", preset="gpt2", mode="generate", weights="/w", path="/p", tokenizer="tok",
        device="cpu", dtype="bfloat16", compile="off", max_context=512, seed=7, upstream_url="http://u/v1",
        upstream_model="m", upstream_api_key_env="KEY")
    assert miner_config.engine_options(config) == EngineOptions(max_batch=8, max_queue=0, flush_tokens=4,
                                                                flush_ms=7.5, max_new_tokens=99,
                                                                max_prompt_chars=1000)


def test_bittensor_options_land_in_the_config_tree():
    config = build_config(["--netuid", "21", "--wallet.name", "w", "--wallet.hotkey", "h", "--wallet.path", "/tmp/x",
                           "--subtensor.network", "test", "--axon.port", "9999", "--axon.external_ip", "1.2.3.4",
                           "--logging.debug"])
    assert config.netuid == 21 and config.wallet.name == "w" and config.wallet.hotkey == "h"
    assert config.subtensor.network == "test" and config.axon.port == 9999
    assert config.axon.external_ip == "1.2.3.4" and config.logging.debug is True
    assert miner_config.wallet_path(config) == "/tmp/x"


def test_offline_defaults_keep_away_from_real_wallets_and_interfaces():
    offline = build_config(["--offline"])
    assert miner_config.wallet_path(offline) == os.path.expanduser(miner_config.OFFLINE_WALLET_PATH)
    assert miner_config.bind_ip(offline) == "127.0.0.1"
    online = build_config([])
    assert miner_config.wallet_path(online) == os.path.expanduser("~/.bittensor/wallets")
    assert miner_config.bind_ip(online) is None  # all interfaces, like bittensor
    assert miner_config.bind_ip(build_config(["--offline", "--axon.ip", "[::]"])) == "::"
    assert miner_config.bind_ip(build_config(["--axon.ip", "10.0.0.5"])) == "10.0.0.5"


def test_empty_arguments_do_not_read_sys_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["miner.py", "--netuid", "99"])
    assert build_config([]).netuid == 1


def test_blacklist_options():
    friend, enemy = hotkey(), hotkey()
    config = build_config(["--blacklist.allow", friend, "--blacklist.deny", enemy, "--blacklist.rate_limit", "5",
                           "--blacklist.rate_window", "2", "--blacklist.min_stake", "1.5",
                           "--blacklist.require_validator_permit", "--priority.unknown", "-1",
                           "--priority.allowed", "100"])
    options = miner_config.blacklist_options(config)
    assert options.allow == {friend} and options.deny == {enemy}
    assert (options.rate_limit, options.rate_window, options.min_stake) == (5, 2.0, 1.5)
    assert options.require_validator_permit and not options.allow_unregistered
    assert (options.unknown_priority, options.allowed_priority) == (-1.0, 100.0)


def test_offline_accepts_anyone_unless_an_allow_list_is_given():
    assert miner_config.blacklist_options(build_config(["--offline"])).allow_unregistered
    assert not miner_config.blacklist_options(build_config(["--offline", "--blacklist.allow", hotkey()])) \
        .allow_unregistered
    assert miner_config.blacklist_options(build_config(["--offline", "--blacklist.deny", hotkey()])) \
        .allow_unregistered
    assert not miner_config.blacklist_options(build_config([])).allow_unregistered


@pytest.mark.parametrize("args", [
    ["--no-such-option"], ["--model.preset", "huge"], ["--stream.framing", "sse"], ["--engine.max_batch", "-1"],
    ["--blacklist.rate_limit", "-1"], ["--blacklist.rate_window", "0"], ["--neuron.shutdown_grace", "nan"],
    ["--axon.port", "many"],
])
def test_bad_options_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exc:
        build_config(args)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--blacklist.allow", "nonsense"], "nonsense"),
    (["--model.backend", "hf"], "--model.path"),
    (["--model.backend", "upstream"], "--model.upstream_url"),
])
def test_inconsistent_options_are_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        build_config(args)


def test_a_hotkey_on_both_lists_is_an_error():
    both = hotkey()
    with pytest.raises(ConfigError, match="both"):
        build_config(["--blacklist.allow", both, "--blacklist.deny", both])


def test_entry_point_reports_config_errors_with_exit_2():
    out = subprocess.run([sys.executable, "neurons/miner.py", "--offline", "--blacklist.deny", "bogus"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "bogus" in out.stderr
