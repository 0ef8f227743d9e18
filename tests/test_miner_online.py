"""The miner in-process, with a fake engine, on loopback: StreamPrompting through real 10.x dendrites where
bittensor 10 is installed, else requests signed exactly as they sign them.

Online start-up runs against a fake chain client speaking both SDKs' calls (registration, publishing, metagraph
sync and its failures); the request-path cases (rate limit, priority, newline framing, bad input, shutdown) run
offline. ``FakeEngine`` and ``running_miner`` live in helpers.py.
"""

import asyncio
import itertools
import socket
import threading
import types

import numpy as np
import pytest
from helpers import MIXED, FakeEngine, free_port, new_keypair, running_miner, stream_prompt, target, target_at

from minercore.contract.generation import (
    FINISH_CANCELLED,
    FINISH_DEADLINE,
    EngineOverloaded,
    GenerationFailed,
    InvalidRequest,
)
from minercore.miner import neuron, sdk
from minercore.miner.config import build_config
from minercore.miner.neuron import Miner, StartupError
from minercore.miner.offline import read_axon_info
from minercore.miner.sdk import ensure_wallet


class FakeSubtensor:
    """The chain calls the miner makes, as both SDKs spell them (10.x: ``metagraph``, ``get_current_block``,
    ``serve_axon``; 11.x: ``subnets.metagraph``, ``block``, ``execute``); ``failures`` makes the next metagraph
    reads raise. ``served`` records (netuid, hotkey, ip, port) of each publication."""

    def __init__(self, neurons: dict[str, tuple[float, bool]]) -> None:
        self.neurons = dict(neurons)  # hotkey -> (stake, validator permit)
        self._block = itertools.count(1000, 3)
        self.metagraph_calls = 0
        self.failures = 0
        self.served = []
        self.closed = False
        self.threads = set()
        self.subnets = types.SimpleNamespace(metagraph=self._metagraph11)

    def _read(self) -> list[str]:
        self.threads.add(threading.current_thread().name)
        self.metagraph_calls += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionError("websocket closed")
        return list(self.neurons)

    # bittensor 10
    def get_current_block(self) -> int:
        self.threads.add(threading.current_thread().name)
        return next(self._block)

    def metagraph(self, netuid: int):
        hotkeys = self._read()
        return types.SimpleNamespace(
            hotkeys=hotkeys, uids=np.arange(len(hotkeys)), S=np.array([self.neurons[h][0] for h in hotkeys]),
            validator_permit=np.array([self.neurons[h][1] for h in hotkeys]), block=1000)

    def serve_axon(self, netuid: int, axon):  # what the real extrinsic reads off its "axon"
        self.served.append((netuid, axon.wallet.hotkey.ss58_address, axon.external_ip, axon.external_port))
        return types.SimpleNamespace(success=True, message="served")

    # bittensor 11
    @property
    def block(self) -> int:
        return self.get_current_block()

    def _metagraph11(self, netuid: int):
        hotkeys = self._read()
        rows = [types.SimpleNamespace(uid=uid, hotkey=hotkey, validator_permit=self.neurons[hotkey][1],
                                      total_stake=types.SimpleNamespace(tao=self.neurons[hotkey][0]))
                for uid, hotkey in enumerate(hotkeys)]
        return types.SimpleNamespace(neurons=rows, block=1000)

    def execute(self, intent, wallet):
        assert type(intent).__name__ == "ServeAxon"
        self.served.append((intent.netuid, wallet.hotkey.ss58_address, intent.ip, intent.port))
        return types.SimpleNamespace(success=True, message="served")

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def miner_wallet(tmp_path):
    return ensure_wallet("default", "default", str(tmp_path / "wallets"))


# ---- online start-up ---------------------------------------------------------------------------------------
async def test_registered_miner_serves_syncs_and_ranks_by_stake(tmp_path, miner_wallet, logs):
    validator, stranger = new_keypair(), new_keypair()
    chain = FakeSubtensor({miner_wallet.hotkey.ss58_address: (1.0, False), validator.ss58_address: (777.0, True)})
    engine = FakeEngine()
    async with running_miner(tmp_path, "--netuid", "7", "--neuron.sync_every_blocks", "1", engine=engine,
                             subtensor=chain, sync_interval=0.02) as miner:
        assert chain.served == [(7, miner_wallet.hotkey.ss58_address, "127.0.0.1", miner.info["port"])]
        ok = await stream_prompt(target(miner), [MIXED], wallet=validator)
        assert ok.ok and ok.text == MIXED
        assert engine.requests[-1].priority == 777.0
        refused = await stream_prompt(target(miner), ["hi"], wallet=stranger)
        assert refused.status_code == 403 and "not registered on netuid 7" in refused.status_message
        # The stranger registers; a later sync lets it in.
        chain.neurons[stranger.ss58_address] = (3.0, False)
        for _ in range(500):
            if miner.policy.view.get(stranger.ss58_address) is not None:
                break
            await asyncio.sleep(0.01)
        assert miner.syncs >= 1
        late = await stream_prompt(target(miner), ["hi again"], wallet=stranger)
        assert late.ok and late.text == "hi again" and engine.requests[-1].priority == 3.0
    assert chain.closed
    # After start-up only the sync thread talks to the chain.
    assert "metagraph-sync" in chain.threads and threading.main_thread().name not in chain.threads


async def test_without_an_external_ip_the_publish_command_is_printed(tmp_path, miner_wallet, logs):
    chain = FakeSubtensor({miner_wallet.hotkey.ss58_address: (1.0, False)})
    port = free_port()
    miner = Miner(build_config(["--netuid", "5", "--axon.port", str(port), "--axon.ip", "127.0.0.1",
                                "--wallet.path", str(tmp_path / "wallets")]), engine=FakeEngine(), subtensor=chain)
    task = asyncio.create_task(miner.run())
    while miner.info is None:
        assert not task.done(), task.result()
        await asyncio.sleep(0.01)
    try:
        assert not chain.served and not miner.published
        command = sdk.publish_command(5, port, "default", "default")
        assert "btcli" in command and any(command in line for line in logs.at("warning"))
        stranger = await stream_prompt(target(miner), ["hi"], wallet=new_keypair())  # serving all the same
        assert stranger.status_code == 403 and "not registered on netuid 5" in stranger.status_message
    finally:
        miner.stop()
        await task
    assert chain.closed


async def test_unregistered_miner_refuses_to_start(tmp_path, miner_wallet, logs):
    chain = FakeSubtensor({new_keypair().ss58_address: (1.0, True)})
    with pytest.raises(StartupError, match="is not registered on netuid 1") as exc:
        async with running_miner(tmp_path, subtensor=chain):
            pass
    assert miner_wallet.hotkey.ss58_address in str(exc.value) and sdk.register_command(1, "default", "default") \
        in str(exc.value)
    assert not chain.served


def test_entry_point_exits_nonzero_when_unregistered(tmp_path, miner_wallet, monkeypatch, capsys):
    chain = FakeSubtensor({})

    monkeypatch.setattr(sdk, "connect", lambda network, endpoint: chain)
    monkeypatch.setattr(neuron, "setup_logging", lambda config: None)
    code = neuron.main(["--wallet.path", str(tmp_path / "wallets"), "--axon.port", str(free_port()),
                        "--netuid", "3"])
    assert code == 1
    assert "is not registered on netuid 3" in capsys.readouterr().err
    assert chain.closed


async def test_missing_wallet_is_a_clear_startup_error(tmp_path, logs):
    with pytest.raises(StartupError, match="cannot load wallet"):
        async with running_miner(tmp_path, subtensor=FakeSubtensor({})):
            pass


async def test_sync_failures_are_logged_and_retried_without_blocking_requests(tmp_path, miner_wallet, logs):
    validator = new_keypair()
    chain = FakeSubtensor({miner_wallet.hotkey.ss58_address: (1.0, False), validator.ss58_address: (5.0, True)})
    async with running_miner(tmp_path, "--neuron.sync_every_blocks", "1", subtensor=chain,
                             sync_interval=0.02) as miner:
        chain.failures = 3
        while miner.sync_failures < 3:
            result = await stream_prompt(target(miner), ["still serving"], wallet=validator)
            assert result.ok and result.text == "still serving"
        syncs = miner.syncs
        while miner.syncs == syncs:  # retried, and recovered
            await asyncio.sleep(0.01)
    warnings = logs.at("warning")
    assert sum("metagraph sync failed (ConnectionError: websocket closed)" in w for w in warnings) >= 3


# ---- the request path (offline) --------------------------------------------------------------------------
async def test_bad_input_gets_a_clear_error_and_the_next_request_succeeds(tmp_path):
    caller = new_keypair()
    engine = FakeEngine()
    async with running_miner(tmp_path, engine=engine) as miner:
        bad = await stream_prompt(target(miner), ["one", "two"], ["user"], wallet=caller)
        assert bad.status_code == 400 and "roles has 1 entries and messages has 2" in bad.status_message
        assert bad.text == ""
        empty = await stream_prompt(target(miner), [], [], wallet=caller)
        assert empty.status_code == 400 and empty.status_message == "messages must be a non-empty list"
        assert not engine.requests  # refused before the engine
        blank = await stream_prompt(target(miner), [""], wallet=caller)
        assert blank.status_code == 400 and blank.status_message == "prompt is empty"  # the engine's verdict
        good = await stream_prompt(target(miner), ["fine"], wallet=caller)
        assert good.ok and good.text == "fine"


async def test_too_large_prompts_are_refused(tmp_path):
    async with running_miner(tmp_path, "--engine.max_prompt_chars", "100") as miner:
        result = await stream_prompt(target(miner), ["x" * 60, "y" * 60], ["system", "user"],
                                            wallet=new_keypair())
        assert result.status_code == 400 and "120 characters; the limit is 100" in result.status_message


@pytest.mark.parametrize("error, status", [(EngineOverloaded("all 64 slots are busy"), 503),
                                           (InvalidRequest("prompt is 9000 tokens"), 400),
                                           (GenerationFailed("prefill failed: out of memory"), 500)])
async def test_engine_errors_before_text_get_their_own_status(tmp_path, error, status):
    engine = FakeEngine()
    engine.error = error
    async with running_miner(tmp_path, engine=engine) as miner:
        result = await stream_prompt(target(miner), ["hi"], wallet=new_keypair())
    assert result.status_code == status and result.status_message == str(error)


async def test_shutdown_before_any_text_is_not_an_empty_answer(tmp_path):
    engine = FakeEngine()
    engine.ends_at_once = FINISH_CANCELLED
    async with running_miner(tmp_path, engine=engine) as miner:
        result = await stream_prompt(target(miner), ["hi"], wallet=new_keypair())
    assert result.status_code == 503 and "miner is shutting down" in result.status_message


async def test_a_deadline_before_any_text_is_a_clean_empty_answer(tmp_path):
    """Accepted work always gets 200: with no time left for any text, the exact text so far is empty."""
    engine = FakeEngine()
    engine.ends_at_once = FINISH_DEADLINE
    async with running_miner(tmp_path, engine=engine) as miner:
        result = await stream_prompt(target(miner), ["hi"], wallet=new_keypair())
    assert (result.status_code, result.text, result.error) == (200, "", None)


async def test_failure_after_streaming_started_ends_the_stream_and_is_logged(tmp_path, logs):
    engine = FakeEngine(chunk=2)
    engine.fail_after = 2
    async with running_miner(tmp_path, engine=engine) as miner:
        result = await stream_prompt(target(miner), ["abcdefgh"], wallet=new_keypair())
        assert result.text == "abcd"  # what was sent; the status line had gone out with the first byte
        # The connection is cut before the body's end: the caller sees an incomplete answer, not success (a 10.x
        # dendrite reports 400 "payload is not completed").
        assert not result.ok
        assert engine.closed == 1
        assert any("generation failed after 4 characters were streamed" in line for line in logs.at("error"))
        again = await stream_prompt(target(miner), ["next"], wallet=new_keypair())
        assert again.ok and again.text == "next"


async def test_newline_framing_for_seed_style_parsers(tmp_path):
    prompt = "first line\nsecond 世界 🎉\n\nthird"
    async with running_miner(tmp_path, "--stream.framing", "newline", engine=FakeEngine(chunk=4)) as miner:
        result = await stream_prompt(target(miner), [prompt], wallet=new_keypair())
    assert result.ok
    pieces = [prompt[i:i + 4] for i in range(0, len(prompt), 4)]
    assert result.text == "".join(piece + "\n" for piece in pieces)
    # What a seed-style validator reconstructs: split on newlines, drop empty parts (the text's own are lost).
    assert "".join(part for part in result.text.split("\n") if part) == prompt.replace("\n", "")


async def test_timeout_becomes_the_engine_deadline_less_the_margin(tmp_path):
    engine = FakeEngine()
    async with running_miner(tmp_path, "--stream.deadline_margin", "0.5", engine=engine) as miner:
        result = await stream_prompt(target(miner), ["tick"], wallet=new_keypair(), timeout=3.5)
    assert result.ok and result.text == "tick"
    assert 2.5 < engine.requests[0].timeout <= 3.0


async def test_rate_limit_is_charged_per_verified_hotkey(tmp_path):
    greedy, other = new_keypair(), new_keypair()
    async with running_miner(tmp_path, "--blacklist.rate_limit", "2", "--blacklist.rate_window", "600") as miner:
        results = [await stream_prompt(target(miner), [f"r{i}"], wallet=greedy) for i in range(3)]
        assert [r.ok for r in results] == [True, True, False]
        assert results[2].status_code == 429 and "rate limit exceeded" in results[2].status_message
        assert (await stream_prompt(target(miner), ["mine"], wallet=other)).ok


async def test_allow_and_deny_lists_offline(tmp_path):
    friend, enemy, stranger = new_keypair(), new_keypair(), new_keypair()
    async with running_miner(tmp_path, "--blacklist.allow", friend.ss58_address, "--blacklist.deny",
                             enemy.ss58_address, "--priority.allowed", "42") as miner:
        engine = miner.engine
        assert (await stream_prompt(target(miner), ["hi"], wallet=friend)).ok
        assert engine.requests[-1].priority == 42.0
        for caller in (enemy, stranger):
            result = await stream_prompt(target(miner), ["hi"], wallet=caller)
            assert result.status_code == 403


async def test_wrong_target_hotkey_is_not_verified(tmp_path):
    async with running_miner(tmp_path) as miner:
        wrong = target_at(miner.info["ip"], miner.info["port"], new_keypair().ss58_address)
        result = await stream_prompt(wrong, ["hi"], wallet=new_keypair())
    assert result.status_code == 401 and "signed for a different axon hotkey" in result.status_message


async def test_graceful_shutdown_lets_streams_finish_and_refuses_new_ones(tmp_path):
    engine = FakeEngine(chunk=1, delay=0.01)
    async with running_miner(tmp_path, "--neuron.shutdown_grace", "5", engine=engine) as miner:
        long_text = "z" * 60
        stream = asyncio.create_task(stream_prompt(target(miner), [long_text], wallet=new_keypair()))
        while not engine.requests:
            await asyncio.sleep(0.005)
        stopping = asyncio.create_task(miner.shutdown())
        await asyncio.sleep(0.01)
        late = await stream_prompt(target(miner), ["late"], wallet=new_keypair())
        assert late.status_code in (403, 503) and not late.ok
        finished = await stream
        await stopping
    assert finished.ok and finished.text == long_text
    assert not (tmp_path / "axon.json").exists()  # the info file goes with the miner


async def test_streams_cancelled_at_shutdown_are_logged(tmp_path, logs):
    engine = FakeEngine(chunk=1, delay=0.02)
    engine.cancel_at_shutdown = True
    async with running_miner(tmp_path, "--neuron.shutdown_grace", "0", engine=engine) as miner:
        stream = asyncio.create_task(stream_prompt(target(miner), ["q" * 200], wallet=new_keypair()))
        while not engine.requests:
            await asyncio.sleep(0.005)
    result = await stream
    assert 0 < len(result.text) < 200
    assert any("cancelled at shutdown" in line for line in logs.at("warning"))


async def test_offline_info_file_and_identity(tmp_path):
    async with running_miner(tmp_path) as miner:
        info = read_axon_info(tmp_path / "axon.json")
        assert info == miner.info
        assert info["ip"] == "127.0.0.1" and info["offline"] is True
        wallet = ensure_wallet("default", "default", str(tmp_path / "wallets"))  # reused, not recreated
        assert info["hotkey"] == wallet.hotkey.ss58_address and info["coldkey"] == wallet.coldkeypub.ss58_address
        assert info["bittensor"] == sdk.VERSION


async def test_port_in_use_is_a_startup_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        miner = Miner(build_config(["--offline", "--axon.port", str(port), "--wallet.path", str(tmp_path)]),
                      engine=FakeEngine())
        with pytest.raises(StartupError, match="could not listen"):
            await miner.run()
