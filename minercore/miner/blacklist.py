"""Who may query the miner, how often, and in what order: the blacklist policy, the rate limiter and the
metagraph view they read.

Everything here runs on the miner's event loop except ``MetagraphView`` construction, which the metagraph
sync thread does before swapping the new view in with one attribute assignment.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from .sdk import is_ss58

# An ss58 address is 47-48 characters; anything much longer is rejected before decoding it.
_MAX_HOTKEY_CHARS = 64


@dataclass(frozen=True)
class Neuron:
    uid: int
    stake: float
    validator_permit: bool


@dataclass(frozen=True)
class MetagraphView:
    """An immutable snapshot of what the blacklist needs from a metagraph: hotkey -> uid, stake, permit."""

    neurons: dict[str, Neuron] = field(default_factory=dict)
    netuid: int | None = None
    block: int | None = None

    @classmethod
    def from_rows(cls, rows: Iterable[Any], netuid: int | None = None, block: int | None = None) -> MetagraphView:
        """From rows with ``hotkey``, ``uid``, ``stake`` and ``validator_permit`` (``sdk.metagraph_rows``)."""
        return cls({row.hotkey: Neuron(row.uid, _finite(row.stake), row.validator_permit) for row in rows},
                   netuid, block)

    def get(self, hotkey: str) -> Neuron | None:
        return self.neurons.get(hotkey)

    def __len__(self) -> int:
        return len(self.neurons)


def _finite(value: Any) -> float:
    number = float(value)
    return number if math.isfinite(number) else 0.0


class RateLimiter:
    """A token bucket per key: ``limit`` requests at once, refilled at ``limit / window`` per second.

    Memory is bounded: past ``max_keys`` the least recently seen key is forgotten (it comes back with a full
    bucket, which errs on the caller's side).
    """

    def __init__(self, limit: int, window: float, *, max_keys: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a rate limit needs limit >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._rate = limit / window
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, updated at)

    def allow(self, key: str) -> bool:
        """Spend one request for ``key``; False when its bucket is empty."""
        now = self._clock()
        tokens, updated = self._buckets.pop(key, (float(self.limit), now))
        tokens = min(float(self.limit), tokens + (now - updated) * self._rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class BlacklistOptions:
    allow_unregistered: bool = False
    require_validator_permit: bool = False
    min_stake: float = 0.0
    allow: frozenset[str] = frozenset()  # always accepted, past the registration/permit/stake checks
    deny: frozenset[str] = frozenset()  # always rejected
    rate_limit: int = 0  # requests per hotkey per window; 0 disables
    rate_window: float = 60.0
    unknown_priority: float = 0.0  # priority of hotkeys not in the metagraph
    allowed_priority: float | None = None  # priority of allow-listed hotkeys; None: by stake like the others


class BlacklistPolicy:
    """The blacklist and priority decisions. ``check`` never raises, whatever it is handed."""

    def __init__(self, options: BlacklistOptions, view: MetagraphView | None = None) -> None:
        self.options = options
        self.view = view if view is not None else MetagraphView()
        self.closing = False  # set at shutdown: new requests are refused
        self.rate_limiter = RateLimiter(options.rate_limit, options.rate_window) if options.rate_limit else None

    def check(self, hotkey: object) -> tuple[bool, str]:
        """``(blacklisted, reason)`` for a request from ``hotkey`` (as the caller claims it, not yet verified)."""
        blacklisted, _, reason = self.verdict(hotkey)
        return blacklisted, reason

    def verdict(self, hotkey: object) -> tuple[bool, str, str]:
        """``(blacklisted, kind, reason)``: ``kind`` is one of a small fixed set (a metrics label), ``reason``
        the message for the caller. Never raises."""
        try:
            return self._verdict(hotkey)
        except Exception as exc:  # noqa: BLE001 - a blacklist that raises answers 500 to everyone; refuse instead
            return True, "error", f"blacklist error ({type(exc).__name__})"

    def _verdict(self, hotkey: object) -> tuple[bool, str, str]:
        if self.closing:
            return True, "shutting_down", "miner is shutting down"
        if not is_hotkey(hotkey):
            return True, "malformed", "malformed hotkey"
        options = self.options
        if hotkey in options.deny:
            return True, "deny_list", "hotkey is on the deny list"
        if hotkey in options.allow:
            return False, "allow_list", "hotkey is on the allow list"
        neuron = self.view.get(hotkey)
        if neuron is None and not options.allow_unregistered:
            where = f" on netuid {self.view.netuid}" if self.view.netuid is not None else ""
            return True, "unregistered", f"hotkey is not registered{where}"
        if options.require_validator_permit and (neuron is None or not neuron.validator_permit):
            return True, "no_validator_permit", "hotkey has no validator permit"
        stake = neuron.stake if neuron is not None else 0.0
        if stake < options.min_stake:
            return True, "low_stake", f"stake {stake:g} is below the minimum {options.min_stake:g}"
        return False, "accepted", "accepted"

    def caller_class(self, hotkey: object) -> str:
        """``validator``, ``registered``, ``allowed`` or ``unregistered`` (a metrics label). Never raises."""
        try:
            if is_hotkey(hotkey) and hotkey in self.options.allow:
                return "allowed"
            neuron = self.view.get(hotkey) if is_hotkey(hotkey) else None
        except Exception:  # noqa: BLE001 - same rule as check()
            return "unregistered"
        if neuron is None:
            return "unregistered"
        return "validator" if neuron.validator_permit else "registered"

    def charge(self, hotkey: str) -> str | None:
        """Count one request against ``hotkey``'s rate limit; the refusal reason when it is over, else None."""
        if self.rate_limiter is None or self.rate_limiter.allow(hotkey):
            return None
        return (f"rate limit exceeded: at most {self.rate_limiter.limit} requests per "
                f"{self.rate_limiter.window:g} s per hotkey")

    def priority(self, hotkey: object) -> float:
        """The caller's stake; ``unknown_priority`` for hotkeys outside the metagraph. Never raises."""
        try:
            if not is_hotkey(hotkey):
                return self.options.unknown_priority
            if hotkey in self.options.allow and self.options.allowed_priority is not None:
                return self.options.allowed_priority
            neuron = self.view.get(hotkey)
            return neuron.stake if neuron is not None else self.options.unknown_priority
        except Exception:  # noqa: BLE001 - same rule as check(): a broken view must not fail requests
            return self.options.unknown_priority


def is_hotkey(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= _MAX_HOTKEY_CHARS and is_ss58(value)


def hotkey_set(values: Iterable[str] | None) -> frozenset[str]:
    """Allow/deny list entries, checked up front so that a typo is an error at start-up, not a silent no-op."""
    entries = frozenset(values or ())
    bad = sorted(entry for entry in entries if not is_hotkey(entry))
    if bad:
        raise ValueError(f"not ss58 hotkeys: {', '.join(bad)}")
    return entries
