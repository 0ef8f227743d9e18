"""Who sent a request: btauth/1 (bittensor 11's signed HTTP) and the bittensor-10 Dendrite's StreamPrompting
signature, both verified without an Axon, on either SDK.

Each check answers with the caller's verified hotkey or raises an ``AuthError`` subclass whose message is safe
to return to the (unauthenticated) caller: it never echoes the signature or the signed payload.

* ``BtAuthVerifier``: ``bittensor.http_auth.verify`` where the SDK has it (11.x); on 10.x the same eight-line
  payload rebuilt here and checked with the keypair. Either way the replay store is ``NonceStore``, bounded.
* ``DendriteVerifier``: the v10 recipe ``nonce.dendrite_hotkey.axon_hotkey.uuid.body_hash`` over this miner's
  own hotkey (a request signed for another axon fails), the body hash recomputed from the body, and bt.Axon's
  nonce rules per ``hotkey:uuid`` (first nonce newer than now - 4 s - timeout, later ones strictly increasing),
  with the gaps bt.Axon leaves closed: dendrites older than 7.2.0 (no clock nonces) and unbounded timeouts are
  refused, nonces far in the future too, and the endpoint table is bounded.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import sdk

# btauth/1 (bittensor.http_auth's values, restated for 10.x, which lacks the module).
BTAUTH_VERSION = "1"
BTAUTH_PROTOCOL = "btauth/1"
BTAUTH_MAX_AGE_S = 10.0
BTAUTH_ALLOWED_SKEW_S = 2.0
HEADER_VERSION = "x-bittensor-version"
HEADER_HOTKEY = "x-bittensor-hotkey"
HEADER_RECEIVER = "x-bittensor-receiver"
HEADER_NONCE = "x-bittensor-nonce"
HEADER_SIGNATURE = "x-bittensor-signature"
HEADER_CRYPTO = "x-bittensor-crypto"

# The v10 axon's window for an endpoint's first nonce: 4 s plus the request's timeout (bittensor's ALLOWED_DELTA).
DENDRITE_ALLOWED_DELTA_S = 4.0
# Nonces ahead of our clock by more than this are refused: bt.Axon accepts any future nonce, which would then
# outlive every pruning rule.
DENDRITE_ALLOWED_SKEW_S = 4.0
# bittensor's version_as_int of 7.2.0, the first dendrite whose nonce is time.time_ns().
DENDRITE_MIN_VERSION = 7_002_000

_NS = 1_000_000_000


class AuthError(Exception):
    """A request failed authentication (HTTP 401); ``kind`` is a short fixed label for logs and metrics."""

    kind = "malformed"


class MalformedAuth(AuthError):
    kind = "malformed"


class WrongReceiver(AuthError):
    kind = "wrong_receiver"


class StaleRequest(AuthError):
    kind = "stale"


class BadSignature(AuthError):
    kind = "bad_signature"


class ReplayedRequest(AuthError):
    kind = "replayed"


class NonceStore:
    """Accepted (hotkey, nonce) pairs, bounded in time and in size, without ever admitting a replay.

    Entries older than ``retention`` seconds (nonces are nanosecond timestamps) are forgotten: the freshness
    check refuses them before the store is asked. Past ``capacity`` entries the oldest are forgotten early,
    and every nonce at or below the newest forgotten one is refused from then on: a flood can make the
    store stricter (refusing requests nearly as old as those it had to forget), never blind.
    ``check_and_store`` is ``bittensor.http_auth.NonceStore``'s protocol.
    """

    def __init__(self, retention: float, capacity: int = 262_144, clock: Callable[[], int] = time.time_ns) -> None:
        self.retention = retention
        self.capacity = capacity
        self._clock = clock
        self._seen: OrderedDict[tuple[str, int], int] = OrderedDict()  # insertion order ~ nonce order
        self.floor = 0  # nonces at or below this are refused (the newest one forgotten early)

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        self._expire()
        key = (hotkey_ss58, nonce_ns)
        if nonce_ns <= self.floor or key in self._seen:
            return False
        self._seen[key] = nonce_ns
        while len(self._seen) > self.capacity:
            _, forgotten = self._seen.popitem(last=False)
            self.floor = max(self.floor, forgotten)
        return True

    def _expire(self) -> None:
        oldest = self._clock() - int(self.retention * _NS)
        while self._seen:
            key, nonce = next(iter(self._seen.items()))
            if nonce >= oldest:
                return
            del self._seen[key]

    def __len__(self) -> int:
        return len(self._seen)


def header_map(headers: Mapping[str, str] | Any) -> dict[str, str]:
    """Lower-cased header names (starlette's ``Headers`` and plain dicts alike)."""
    return {key.lower(): value for key, value in headers.items()}


class BtAuthVerifier:
    """btauth/1 for requests addressed to ``self_hotkey``; one instance per server (it owns the replay store)."""

    def __init__(self, self_hotkey: str, *, max_age: float = BTAUTH_MAX_AGE_S,
                 allowed_skew: float = BTAUTH_ALLOWED_SKEW_S, clock: Callable[[], int] = time.time_ns) -> None:
        self.self_hotkey = self_hotkey
        self.max_age = max_age
        self.allowed_skew = allowed_skew
        self._clock = clock
        self.nonces = NonceStore(max_age + allowed_skew + 1.0, clock=clock)

    def verify(self, headers: Mapping[str, str], body: bytes, *, method: str, target: str) -> str:
        """The caller's hotkey. ``target`` is the request target as sent (path, and ``?query`` when present)."""
        headers = header_map(headers)
        if sdk.http_auth is not None:
            return self._verify_with_sdk(headers, body, method, target)
        return self._verify_by_hand(headers, body, method, target)

    def _verify_with_sdk(self, headers: dict[str, str], body: bytes, method: str, target: str) -> str:
        http_auth = sdk.http_auth
        try:
            caller = http_auth.verify(headers, body, method=method, path=target, self_hotkey_ss58=self.self_hotkey,
                                      max_age=self.max_age, allowed_skew=self.allowed_skew,
                                      nonce_store=self.nonces, now_ns=self._clock())
        except http_auth.AuthError as exc:
            raise _SDK_ERRORS.get(type(exc).__name__, AuthError)(str(exc)) from None
        return caller.hotkey_ss58

    def _verify_by_hand(self, headers: dict[str, str], body: bytes, method: str, target: str) -> str:
        """btauth/1 as http_auth.verify does it, in the same order (shape, receiver, freshness, signature, replay)."""
        if headers.get(HEADER_VERSION) != BTAUTH_VERSION:
            raise MalformedAuth(f"missing or unsupported X-Bittensor-Version (expected {BTAUTH_VERSION!r})")
        sender = headers.get(HEADER_HOTKEY)
        if not sender:
            raise MalformedAuth("missing X-Bittensor-Hotkey")
        nonce = _decimal(headers.get(HEADER_NONCE), "X-Bittensor-Nonce")
        scheme = headers.get(HEADER_CRYPTO, "sr25519")
        if scheme != "sr25519":
            raise MalformedAuth("unsupported X-Bittensor-Crypto (this miner verifies sr25519 only)")
        signature = _hex(headers.get(HEADER_SIGNATURE), "X-Bittensor-Signature")
        receiver = headers.get(HEADER_RECEIVER)
        if receiver is None:
            raise WrongReceiver("missing X-Bittensor-Receiver: this server requires receiver-bound requests")
        if receiver != self.self_hotkey:
            raise WrongReceiver("request was signed for a different receiving hotkey")
        now = self._clock()
        if now - nonce > self.max_age * _NS:
            raise StaleRequest(f"nonce is older than the {self.max_age:g}s freshness window")
        if nonce - now > self.allowed_skew * _NS:
            raise StaleRequest(f"nonce is more than {self.allowed_skew:g}s in the future")
        payload = btauth_payload(method=method, target=target, body=body, nonce_ns=nonce, sender=sender,
                                 receiver=receiver)
        if not sdk.signature_valid(payload, signature, sender):
            raise BadSignature("signature does not verify against the claimed hotkey")
        if not self.nonces.check_and_store(sender, nonce):
            raise ReplayedRequest("this nonce was already accepted from this hotkey")
        return sender


_SDK_ERRORS: dict[str, type[AuthError]] = {cls.__name__: cls for cls in (
    MalformedAuth, WrongReceiver, StaleRequest, BadSignature, ReplayedRequest)}


def btauth_payload(*, method: str, target: str, body: bytes, nonce_ns: int, sender: str,
                   receiver: str | None, scheme: str = "sr25519") -> bytes:
    """The eight signed lines of btauth/1 (``bittensor.http_auth.build_payload``)."""
    lines = (BTAUTH_PROTOCOL, scheme, method.upper(), target, hashlib.sha256(body).hexdigest(), str(nonce_ns),
             sender, receiver or "-")
    return "\n".join(lines).encode()


def btauth_headers(sign: Callable[[bytes], bytes], sender: str, *, method: str, target: str, body: bytes,
                   receiver: str, nonce_ns: int | None = None) -> dict[str, str]:
    """btauth/1 headers signed with ``sign`` (a hotkey's sr25519 ``sign``): the client side, on either SDK."""
    nonce = time.time_ns() if nonce_ns is None else nonce_ns
    payload = btauth_payload(method=method, target=target, body=body, nonce_ns=nonce, sender=sender,
                             receiver=receiver)
    return {"X-Bittensor-Version": BTAUTH_VERSION, "X-Bittensor-Hotkey": sender, "X-Bittensor-Receiver": receiver,
            "X-Bittensor-Nonce": str(nonce), "X-Bittensor-Signature": "0x" + bytes(sign(payload)).hex()}


# ---- the bittensor-10 Dendrite's signature ------------------------------------------------------------------
@dataclass(frozen=True)
class DendriteCaller:
    """A verified StreamPrompting request's caller, as its headers name it."""

    hotkey: str
    uuid: str
    nonce: int
    timeout: float
    version: int


def streamprompting_body_hash(messages: Any) -> str:
    """bittensor 10's ``Synapse.body_hash`` for StreamPrompting (``required_hash_fields = ("messages",)``):
    sha3-256 over the concatenated sha3-256 hex digests of ``str(field)`` of each hashed field."""
    field_hash = hashlib.sha3_256(str(messages).encode()).hexdigest()
    return hashlib.sha3_256(field_hash.encode()).hexdigest()


class EndpointNonces:
    """bt.Axon's nonce table (``hotkey:uuid`` -> last accepted nonce), bounded like ``NonceStore``.

    An endpoint silent for ``retention`` seconds is forgotten: its next nonce must then pass the first-nonce
    window, which no replay of a nonce that old can. Past ``capacity`` endpoints the least recently heard is
    forgotten early and ``floor`` rises to its last nonce, so no replay of it is ever admitted.
    """

    def __init__(self, retention: float, capacity: int = 65_536, clock: Callable[[], int] = time.time_ns) -> None:
        self.retention = retention
        self.capacity = capacity
        self._clock = clock
        self._last: OrderedDict[str, int] = OrderedDict()  # least recently accepted first
        self.floor = 0

    def last(self, endpoint: str) -> int | None:
        self._expire()
        return self._last.get(endpoint)

    def accept(self, endpoint: str, nonce: int) -> None:
        self._last.pop(endpoint, None)
        self._last[endpoint] = nonce
        while len(self._last) > self.capacity:
            _, forgotten = self._last.popitem(last=False)
            self.floor = max(self.floor, forgotten)

    def _expire(self) -> None:
        oldest = self._clock() - int(self.retention * _NS)
        while self._last:
            endpoint, nonce = next(iter(self._last.items()))
            if nonce >= oldest:
                return
            del self._last[endpoint]

    def __len__(self) -> int:
        return len(self._last)


class DendriteVerifier:
    """StreamPrompting requests from bittensor-10 Dendrites addressed to ``self_hotkey``.

    ``max_timeout`` bounds the (unsigned) timeout header, which widens the first-nonce window.
    """

    def __init__(self, self_hotkey: str, *, max_timeout: float, clock: Callable[[], int] = time.time_ns) -> None:
        self.self_hotkey = self_hotkey
        self.max_timeout = max_timeout
        self._clock = clock
        self.endpoints = EndpointNonces(max_timeout + DENDRITE_ALLOWED_DELTA_S + DENDRITE_ALLOWED_SKEW_S + 1.0,
                                        clock=clock)

    def verify(self, headers: Mapping[str, str], messages: Any) -> DendriteCaller:
        """Check the signed headers and that ``messages`` (from the body) is what they hash."""
        headers = header_map(headers)
        hotkey = headers.get("bt_header_dendrite_hotkey")
        uuid = headers.get("bt_header_dendrite_uuid")
        if not hotkey or not uuid:
            raise MalformedAuth("missing bt_header_dendrite_hotkey or bt_header_dendrite_uuid")
        nonce = _decimal(headers.get("bt_header_dendrite_nonce"), "bt_header_dendrite_nonce")
        signature = _hex(headers.get("bt_header_dendrite_signature"), "bt_header_dendrite_signature")
        version = _decimal(headers.get("bt_header_dendrite_version"), "bt_header_dendrite_version")
        if version < DENDRITE_MIN_VERSION:
            raise MalformedAuth(f"dendrite version {version} is older than 7.2.0, whose nonces cannot be checked "
                                "for freshness")
        try:
            timeout = float(headers.get("timeout", "nan"))
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and 0 < timeout <= self.max_timeout):
            raise MalformedAuth(f"timeout {headers.get('timeout')!r:.40} is out of range: give a number of seconds "
                                f"in (0, {self.max_timeout:g}]")
        if headers.get("bt_header_axon_hotkey") != self.self_hotkey:
            raise WrongReceiver("request was signed for a different axon hotkey")
        body_hash = headers.get("computed_body_hash", "")
        if streamprompting_body_hash(messages) != body_hash:
            raise BadSignature("the request body does not match the computed_body_hash header its signature "
                               "covers (changed in transit?)")
        endpoint = f"{hotkey}:{uuid}"
        now = self._clock()
        last = self.endpoints.last(endpoint)
        if last is None and nonce <= now - int((DENDRITE_ALLOWED_DELTA_S + timeout) * _NS):
            raise StaleRequest(f"nonce is too old: acceptable delta is {DENDRITE_ALLOWED_DELTA_S + timeout:.2f} "
                               "seconds")
        if nonce - now > DENDRITE_ALLOWED_SKEW_S * _NS:
            raise StaleRequest(f"nonce is more than {DENDRITE_ALLOWED_SKEW_S:g}s in the future")
        message = f"{nonce}.{hotkey}.{self.self_hotkey}.{uuid}.{body_hash}".encode()
        if not sdk.signature_valid(message, signature, hotkey):
            raise BadSignature("signature does not verify against the claimed dendrite hotkey")
        # After the signature, as bt.Axon does: unsigned traffic cannot move a caller's nonce forward.
        if (last is not None and nonce <= last) or nonce <= self.endpoints.floor:
            raise ReplayedRequest("nonce is too old, a newer one was last processed")
        self.endpoints.accept(endpoint, nonce)
        return DendriteCaller(hotkey, uuid, nonce, timeout, version)


def _decimal(value: str | None, name: str) -> int:
    if value is None:
        raise MalformedAuth(f"missing {name}")
    if not (value.isascii() and value.isdigit() and len(value) <= 24):
        raise MalformedAuth(f"{name} is not a decimal integer")
    return int(value)


def _hex(value: str | None, name: str) -> bytes:
    if value is None:
        raise MalformedAuth(f"missing {name}")
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise MalformedAuth(f"{name} is not hex") from None
