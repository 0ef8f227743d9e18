"""Blacklist, priority and rate-limit decisions (units; the axon wiring is in test_miner_online.py)."""

import types

import pytest

from minercore.miner import sdk
from minercore.miner.blacklist import (
    BlacklistOptions,
    BlacklistPolicy,
    MetagraphView,
    RateLimiter,
    hotkey_set,
    is_hotkey,
)


def new_hotkey() -> str:
    return sdk.new_keypair().ss58_address


VALIDATOR, MINER, STRANGER, FRIEND, ENEMY = (new_hotkey() for _ in range(5))


def view(hotkeys=(VALIDATOR, MINER), block: int = 100) -> MetagraphView:
    stakes, permits = (5000.0, 12.5), (True, False)
    return MetagraphView.from_rows([sdk.NeuronRow(hotkey, uid, stake, permit) for uid, (hotkey, stake, permit)
                                    in enumerate(zip(hotkeys, stakes, permits, strict=True))], netuid=1, block=block)


def policy(**options) -> BlacklistPolicy:
    return BlacklistPolicy(BlacklistOptions(**options), view())


MALFORMED = [None, "", "   ", "not-a-hotkey", 42, 3.5, b"bytes", ["list"], {"a": 1}, "5" * 48, "x" * 10_000,
             VALIDATOR + "x", VALIDATOR[:-1], "\x00" * 48, "é" * 48, object()]


@pytest.mark.parametrize("hotkey", MALFORMED, ids=repr)
def test_malformed_hotkeys_are_refused_with_a_reason(hotkey):
    for p in (policy(), policy(allow_unregistered=True), policy(allow=frozenset({FRIEND}))):
        assert p.check(hotkey) == (True, "malformed hotkey")
        assert p.priority(hotkey) == 0.0


def test_registration():
    p = policy()
    assert p.check(VALIDATOR) == (False, "accepted")
    assert p.check(MINER) == (False, "accepted")
    assert p.check(STRANGER) == (True, "hotkey is not registered on netuid 1")
    assert policy(allow_unregistered=True).check(STRANGER) == (False, "accepted")


def test_validator_permit_and_stake():
    assert policy(require_validator_permit=True).check(MINER) == (True, "hotkey has no validator permit")
    assert policy(require_validator_permit=True).check(VALIDATOR)[0] is False
    assert policy(require_validator_permit=True, allow_unregistered=True).check(STRANGER)[0] is True
    blacklisted, reason = policy(min_stake=100.0).check(MINER)
    assert blacklisted and "12.5" in reason and "100" in reason
    assert policy(min_stake=100.0).check(VALIDATOR)[0] is False
    assert policy(min_stake=1.0, allow_unregistered=True).check(STRANGER)[0] is True  # unknown stake is 0


def test_allow_and_deny_lists():
    p = policy(allow=frozenset({FRIEND}), deny=frozenset({VALIDATOR, ENEMY}), min_stake=10_000.0)
    assert p.check(FRIEND) == (False, "hotkey is on the allow list")  # past registration and stake
    assert p.check(VALIDATOR) == (True, "hotkey is on the deny list")  # even when registered
    assert p.check(ENEMY) == (True, "hotkey is on the deny list")
    assert p.check(STRANGER)[0] is True


def test_closing_refuses_everyone():
    p = policy(allow=frozenset({FRIEND}))
    p.closing = True
    for hotkey in (VALIDATOR, FRIEND, None):
        assert p.check(hotkey) == (True, "miner is shutting down")


def test_a_broken_view_refuses_instead_of_raising():
    p = policy(allow_unregistered=True)
    p.view = None  # anything that makes the lookup itself fail
    assert p.check(VALIDATOR) == (True, "blacklist error (AttributeError)")
    assert p.priority(VALIDATOR) == 0.0


def test_priority_is_stake():
    p = policy(unknown_priority=-1.0)
    assert p.priority(VALIDATOR) == 5000.0
    assert p.priority(MINER) == 12.5
    assert p.priority(STRANGER) == -1.0
    assert isinstance(p.priority(VALIDATOR), float)
    assert policy(allow=frozenset({FRIEND, VALIDATOR}), allowed_priority=1e9).priority(VALIDATOR) == 1e9
    assert policy(allow=frozenset({VALIDATOR})).priority(VALIDATOR) == 5000.0  # by stake unless set


def test_view_from_a_bittensor_10_torch_metagraph_with_bad_stakes(monkeypatch):
    torch = pytest.importorskip("torch")
    graph = types.SimpleNamespace(hotkeys=[VALIDATOR, MINER], uids=torch.tensor([3, 7]),
                                  S=torch.tensor([float("nan"), 2.0]), validator_permit=torch.tensor([1, 0]),
                                  block=torch.tensor(55))
    chain = types.SimpleNamespace(metagraph=lambda netuid: graph)
    monkeypatch.setattr(sdk, "MAJOR", 10)  # the 10.x reading, whichever SDK is installed
    rows, block = sdk.metagraph_rows(chain, 9)
    got = MetagraphView.from_rows(rows, netuid=9, block=block)
    assert got.get(VALIDATOR).uid == 3 and got.get(VALIDATOR).stake == 0.0 and got.get(VALIDATOR).validator_permit
    assert got.get(MINER).uid == 7 and got.block == 55 and got.netuid == 9 and len(got) == 2
    graph.S = torch.tensor([1.0])
    with pytest.raises(ValueError):
        sdk.metagraph_rows(chain, 9)


def test_the_sync_thread_swaps_views():
    p = policy()
    assert p.check(STRANGER)[0] is True
    p.view = view(hotkeys=(VALIDATOR, STRANGER), block=200)
    assert p.check(STRANGER)[0] is False and p.check(MINER)[0] is True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_burst_then_refill():
    clock = Clock()
    limiter = RateLimiter(3, 60.0, clock=clock)
    assert [limiter.allow(VALIDATOR) for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow(MINER)  # per hotkey
    clock.now += 19.0  # 3 per 60 s: one token back every 20 s
    assert not limiter.allow(VALIDATOR)
    clock.now += 1.0
    assert limiter.allow(VALIDATOR) and not limiter.allow(VALIDATOR)
    clock.now += 3600.0  # refills only up to the burst size
    assert [limiter.allow(VALIDATOR) for _ in range(4)] == [True, True, True, False]


def test_rate_limiter_memory_is_bounded():
    limiter = RateLimiter(1, 60.0, max_keys=100, clock=Clock())
    for i in range(1000):
        limiter.allow(f"key-{i}")
    assert len(limiter) == 100
    assert not limiter.allow("key-999")  # recent keys are remembered...
    assert limiter.allow("key-0")  # ...the oldest were forgotten


def test_policy_charge():
    p = policy(rate_limit=2, rate_window=10.0)
    assert p.charge(VALIDATOR) is None and p.charge(VALIDATOR) is None
    assert p.charge(VALIDATOR) == "rate limit exceeded: at most 2 requests per 10 s per hotkey"
    assert p.charge(MINER) is None
    unlimited = policy()
    assert all(unlimited.charge(VALIDATOR) is None for _ in range(1000))


def test_rate_limiter_rejects_nonsense():
    with pytest.raises(ValueError):
        RateLimiter(0, 60.0)
    with pytest.raises(ValueError):
        RateLimiter(1, 0.0)


def test_hotkey_lists_are_validated():
    assert hotkey_set([VALIDATOR, VALIDATOR]) == frozenset({VALIDATOR})
    assert hotkey_set(None) == frozenset()
    with pytest.raises(ValueError, match="not-a-key"):
        hotkey_set([VALIDATOR, "not-a-key"])
    assert is_hotkey(VALIDATOR) and not is_hotkey(None)


def test_verdict_kinds_and_caller_classes_are_a_fixed_set():
    p = policy(deny=frozenset({ENEMY}), allow=frozenset({FRIEND}), min_stake=100.0)
    assert [p.verdict(h)[:2] for h in (VALIDATOR, MINER, STRANGER, FRIEND, ENEMY, None)] == [
        (False, "accepted"), (True, "low_stake"), (True, "unregistered"), (False, "allow_list"),
        (True, "deny_list"), (True, "malformed")]
    assert policy(require_validator_permit=True).verdict(MINER)[:2] == (True, "no_validator_permit")
    assert [p.caller_class(h) for h in (VALIDATOR, MINER, STRANGER, FRIEND, ENEMY, None, object())] == [
        "validator", "registered", "unregistered", "allowed", "unregistered", "unregistered", "unregistered"]
