"""Security through the miner's HTTP server: loopback-only offline, tampered bodies, forged signatures, replays (also of
requests captured long ago), malformed hotkeys, rate limiting under a burst, the nonce table's size, and what the
logs may hold."""

import asyncio
import json
import socket
import time
from pathlib import Path

import psutil
import pytest
from helpers import (
    FakeEngine,
    SignedRequest,
    miner_process,
    new_keypair,
    post,
    running_miner,
    sign,
    stream_prompt,
    target,
    target_at,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from minercore.miner.auth import streamprompting_body_hash
from minercore.miner.blacklist import BlacklistOptions, BlacklistPolicy


async def request_for(miner, prompt: str = "hello", **options) -> SignedRequest:
    return await sign(miner, [prompt], ["user"], **options)


def resign(request: SignedRequest, keypair, *, nonce: int) -> None:
    """Give the request another nonce, signed as bittensor's dendrite signs (the capture of an older request)."""
    headers = request.headers
    headers["bt_header_dendrite_nonce"] = str(nonce)
    message = (f"{nonce}.{headers['bt_header_dendrite_hotkey']}.{headers['bt_header_axon_hotkey']}."
               f"{headers['bt_header_dendrite_uuid']}.{headers['computed_body_hash']}")
    headers["bt_header_dendrite_signature"] = f"0x{bytes(keypair.sign(message.encode())).hex()}"


def non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


async def test_offline_listens_on_loopback_only(tmp_path):
    async with running_miner(tmp_path) as miner:
        port = miner.info["port"]
        listening = [c.laddr for c in psutil.Process().net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert [(address.ip, address.port) for address in listening] == [("127.0.0.1", port)]
        other = non_loopback_ipv4()
        if other is not None:  # this machine's other address: nothing answers there
            with pytest.raises(OSError):
                await asyncio.wait_for(asyncio.open_connection(other, port), 5)
        assert (await stream_prompt(target(miner), ["on loopback"], wallet=new_keypair())).ok


async def test_a_tampered_body_is_refused(tmp_path):
    async with running_miner(tmp_path) as miner:
        request = await request_for(miner, "send 1 TAO")
        request.body["messages"] = ["send 1000 TAO"]
        status, message = await post(request)
        assert status == 401 and "does not match the computed_body_hash header its signature covers" in message
        # Fixing up the hash header breaks the signature, which covers it.
        request = await request_for(miner, "send 1 TAO")
        request.body["messages"] = ["send 1000 TAO"]
        request.headers["computed_body_hash"] = streamprompting_body_hash(["send 1000 TAO"])
        status, message = await post(request)
        assert status == 401 and "signature does not verify" in message
        assert not miner.engine.requests
        assert (await stream_prompt(target(miner), ["untampered"], wallet=new_keypair())).ok


async def test_forged_signatures_are_refused(tmp_path):
    victim, forger = new_keypair(), new_keypair()
    async with running_miner(tmp_path) as miner:
        request = await request_for(miner, keypair=forger)
        request.headers["bt_header_dendrite_hotkey"] = victim.ss58_address  # signed by the forger, claims the victim
        status, message = await post(request)
        assert status == 401 and "signature does not verify" in message
        for signature in ("0x" + "00" * 64, "0xzz", ""):
            request = await request_for(miner)
            request.headers["bt_header_dendrite_signature"] = signature
            status, message = await post(request)
            assert status == 401, (signature, message)
        assert not miner.engine.requests


async def test_a_replayed_request_is_refused(tmp_path):
    async with running_miner(tmp_path) as miner:
        request = await request_for(miner, "once")
        assert await post(request) == (200, "once")
        status, message = await post(request)
        assert status == 401 and "nonce is too old, a newer one was last processed" in message
        assert len(miner.engine.requests) == 1


@pytest.mark.parametrize("headers, refusal", [
    ({}, "nonce is too old: acceptable delta is 64.00 seconds"),  # bt.Axon's window: 4 s + the timeout
    ({"timeout": "1e9"}, "timeout '1e9' is out of range: give a number of seconds in (0, 600]"),
    ({"timeout": "nan"}, "timeout 'nan' is out of range"),
    ({"bt_header_dendrite_version": "7001000"}, "dendrite version 7001000 is older than 7.2.0"),
], ids=["as captured", "timeout inflated", "timeout NaN", "version lowered"])
async def test_a_request_captured_long_ago_is_refused_even_when_its_unsigned_headers_are_changed(
        tmp_path, headers, refusal):
    validator = new_keypair()
    async with running_miner(tmp_path) as miner:
        # Captured ten minutes ago; the miner has not heard from this caller endpoint since (say it restarted).
        request = await request_for(miner, "captured", keypair=validator, timeout=60.0)
        resign(request, validator, nonce=time.time_ns() - 700 * 10**9)
        request.headers.update(headers)
        status, message = await post(request)
        assert status == 401 and refusal in message
        assert not miner.engine.requests


async def test_old_nonces_are_forgotten_so_the_table_stays_bounded(tmp_path):
    async with running_miner(tmp_path, "--axon.max_timeout", "30") as miner:
        endpoints = miner.server.dendrites.endpoints
        now = time.time_ns()
        for i in range(1000):  # caller endpoints last heard from 40 s ago: past 4 s + the 30 s timeout bound
            endpoints.accept(f"stale-{i}", now - 40 * 10**9)
        endpoints.accept("recent", now - 20 * 10**9)
        assert (await stream_prompt(target(miner), ["prune"], wallet=new_keypair(), timeout=20)).ok
        assert endpoints.last("stale-0") is None and endpoints.last("recent") is not None
        assert len(endpoints) == 2  # "recent" and the caller just served


MALFORMED_HEADER_HOTKEYS = ["", "not-a-hotkey", "5" * 4000, "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQZ",
                            "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQ", "null", "0x" + "ab" * 32]


async def test_malformed_hotkeys_are_refused_and_the_miner_serves_on(tmp_path):
    async with running_miner(tmp_path) as miner:
        for hotkey in MALFORMED_HEADER_HOTKEYS:
            request = await request_for(miner)
            request.headers["bt_header_dendrite_hotkey"] = hotkey
            status, message = await post(request)
            assert status == 401 and message.startswith("Not Verified with error: "), (hotkey, message)
        request = await request_for(miner)
        del request.headers["bt_header_dendrite_hotkey"]
        assert await post(request) == (401, "Not Verified with error: missing bt_header_dendrite_hotkey or "
                                            "bt_header_dendrite_uuid")
        assert not miner.engine.requests
        assert (await stream_prompt(target(miner), ["still here"], wallet=new_keypair())).ok


SS58 = new_keypair().ss58_address


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=64), st.text(max_size=80),
                 st.lists(st.text(max_size=8), max_size=3), st.dictionaries(st.text(max_size=4), st.integers()),
                 # near misses: a real address with one character changed, cut or extended
                 st.builds(lambda i, c: SS58[:i % 48] + c + SS58[i % 48 + 1:], st.integers(0, 47),
                           st.characters()),
                 st.builds(lambda i: SS58[:i], st.integers(0, 47)), st.builds(lambda s: SS58 + s, st.text(min_size=1))))
def test_the_blacklist_never_raises(hotkey):
    for options in (BlacklistOptions(), BlacklistOptions(allow_unregistered=True, rate_limit=1),
                    BlacklistOptions(allow=frozenset({SS58}), min_stake=1.0, require_validator_permit=True)):
        policy = BlacklistPolicy(options)
        blacklisted, reason = policy.check(hotkey)
        assert isinstance(blacklisted, bool) and isinstance(reason, str)
        assert blacklisted or hotkey == SS58 or options.allow_unregistered
        assert isinstance(policy.priority(hotkey), float)


async def test_the_rate_limit_holds_under_a_burst(tmp_path):
    greedy, patient = new_keypair(), new_keypair()
    engine = FakeEngine(chunk=1, delay=0.01)  # the accepted streams overlap the refused ones
    async with running_miner(tmp_path, "--blacklist.rate_limit", "4", "--blacklist.rate_window", "600",
                             engine=engine) as miner:
        burst = await asyncio.gather(*(stream_prompt(target(miner), [f"burst {i}"], wallet=greedy)
                                       for i in range(16)))
        served = [r for r in burst if r.ok]
        refused = [r for r in burst if not r.ok]
        assert len(served) == 4 and all(r.text.startswith("burst ") for r in served)
        assert len(refused) == 12
        assert {(r.status_code, r.status_message) for r in refused} == {
            (429, "rate limit exceeded: at most 4 requests per 600 s per hotkey")}
        assert len(engine.requests) == 4  # refused before the engine
        assert (await stream_prompt(target(miner), ["my turn"], wallet=patient)).ok


def test_logs_hold_no_key_material_or_prompts_above_debug(tmp_path):
    """The real miner (its default log level, info) takes normal, refused and abandoned requests whose prompts
    carry a marker; neither the marker nor any of the wallet's secrets may reach its log."""
    marker = "SECRET-PROMPT-7f3a"
    with miner_process(tmp_path) as running:
        async def traffic() -> int:
            miner_target = running.target
            ok = await stream_prompt(miner_target, [f"{marker} hello"], wallet=new_keypair())
            assert ok.ok
            for messages, roles in (([f"{marker} \ud800"], ["user"]), ([marker, marker], [marker]),
                                    ([marker * 200_000], ["user"])):
                result = await stream_prompt(miner_target, messages, roles, wallet=new_keypair())
                assert result.status_code in (400, 413)
            wrong = target_at(miner_target.ip, miner_target.port, new_keypair().ss58_address)
            assert (await stream_prompt(wrong, [marker], wallet=new_keypair())).status_code == 401
            # Ended at its deadline or abandoned by its caller's timeout (on a very fast machine, answered in time).
            abandoned = await stream_prompt(miner_target, [f"{marker} " + "word " * 1800], wallet=new_keypair(),
                                            timeout=0.5)
            return abandoned.ok and len(abandoned.text) == len(f"{marker} " + "word " * 1800)

        answered_in_full = asyncio.run(traffic())
        assert running.stop() == 0
        log = running.log()
    if not answered_in_full:  # logged (whichever of the disconnect and the deadline came first), without its text
        assert "the caller disconnected" in log or "ended at the deadline after" in log
    assert marker not in log
    wallet = tmp_path / "wallets" / "default"
    secrets = json.loads((wallet / "hotkeys" / "default").read_text())
    coldkey = json.loads(Path(wallet / "coldkey").read_text())
    for keyfile in (secrets, coldkey):
        for field in ("secretPhrase", "secretSeed", "privateKey"):
            value = keyfile[field]
            assert value not in log and value.removeprefix("0x") not in log
            if field == "secretPhrase":
                assert " ".join(value.split()[:4]) not in log
