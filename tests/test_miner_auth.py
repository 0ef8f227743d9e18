"""Authentication without an Axon, on whichever SDK is installed: btauth/1 (bittensor 11's signed HTTP) and the
bittensor-10 Dendrite's StreamPrompting signature, with the freshness and replay rules of each."""

import json
import time

import pytest
from v10_signing import v10_request

from minercore.miner import auth, sdk
from minercore.miner.auth import (
    BadSignature,
    BtAuthVerifier,
    DendriteVerifier,
    EndpointNonces,
    MalformedAuth,
    NonceStore,
    ReplayedRequest,
    StaleRequest,
    WrongReceiver,
)

S = 1_000_000_000
BODY = json.dumps({"messages": [{"role": "user", "content": "Crème brûlée 😀"}], "stream": True}).encode()
PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def miner_key():
    return sdk.new_keypair()


@pytest.fixture(scope="module")
def caller_key():
    return sdk.new_keypair()


def sign_by_hand(keypair, *, receiver, body=BODY, target=PATH, nonce_ns=None):
    return auth.btauth_headers(keypair.sign, keypair.ss58_address, method="POST", target=target, body=body,
                               receiver=receiver, nonce_ns=nonce_ns)


def sign_with_sdk(keypair, *, receiver, body=BODY, target=PATH, nonce_ns=None):
    """The installed SDK's own signer (11.x), or the hand-built payload where the SDK has none (10.x)."""
    if sdk.http_auth is None:
        return sign_by_hand(keypair, receiver=receiver, body=body, target=target, nonce_ns=nonce_ns)
    return sdk.http_auth.sign(keypair, method="POST", path=target, body=body, receiver_ss58=receiver,
                              nonce_ns=nonce_ns)


@pytest.fixture(params=["sdk", "by_hand"])
def verify_path(request, monkeypatch):
    """Both verification paths run on either SDK: 11.x's http_auth.verify, and the payload rebuilt by hand."""
    if request.param == "by_hand":
        monkeypatch.setattr(sdk, "http_auth", None)
    return request.param


@pytest.mark.parametrize("signer", [sign_with_sdk, sign_by_hand])
def test_btauth_signed_requests_verify(miner_key, caller_key, verify_path, signer):
    verifier = BtAuthVerifier(miner_key.ss58_address)
    headers = signer(caller_key, receiver=miner_key.ss58_address)
    assert verifier.verify(headers, BODY, method="POST", target=PATH) == caller_key.ss58_address
    query = f"{PATH}?tag=ä"
    headers = signer(caller_key, receiver=miner_key.ss58_address, target=query)
    assert verifier.verify(headers, BODY, method="POST", target=query) == caller_key.ss58_address


def test_the_payload_is_the_sdks(miner_key, caller_key):
    payload = auth.btauth_payload(method="post", target=PATH, body=b"{}", nonce_ns=7, sender=caller_key.ss58_address,
                                  receiver=miner_key.ss58_address)
    expected = ("btauth/1\nsr25519\nPOST\n/v1/chat/completions\n"
                "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a\n7\n"
                f"{caller_key.ss58_address}\n{miner_key.ss58_address}").encode()
    assert payload == expected
    if sdk.http_auth is not None:
        assert payload == sdk.http_auth.build_payload(scheme="sr25519", method="post", path=PATH, body=b"{}",
                                                      nonce_ns=7, sender_ss58=caller_key.ss58_address,
                                                      receiver_ss58=miner_key.ss58_address)


def _drop(headers, name):
    return {key: value for key, value in headers.items() if key.lower() != name}


@pytest.mark.parametrize(("case", "error"), [
    ("unsigned", MalformedAuth),
    ("no_signature", MalformedAuth),
    ("signature_not_hex", MalformedAuth),
    ("nonce_not_a_number", MalformedAuth),
    ("stale", StaleRequest),
    ("future", StaleRequest),
    ("no_receiver", WrongReceiver),
    ("wrong_receiver", WrongReceiver),
    ("tampered_body", BadSignature),
    ("other_path", BadSignature),
    ("forged", BadSignature),
])
def test_btauth_refusals(miner_key, caller_key, verify_path, case, error):
    verifier = BtAuthVerifier(miner_key.ss58_address)
    own = miner_key.ss58_address
    body, target = BODY, PATH
    if case == "unsigned":
        headers = {"content-type": "application/json"}
    elif case == "no_signature":
        headers = _drop(sign_with_sdk(caller_key, receiver=own), "x-bittensor-signature")
    elif case == "signature_not_hex":
        headers = {**sign_with_sdk(caller_key, receiver=own), "X-Bittensor-Signature": "0xnothex"}
    elif case == "nonce_not_a_number":
        headers = {**sign_with_sdk(caller_key, receiver=own), "X-Bittensor-Nonce": "soon"}
    elif case == "stale":
        headers = sign_with_sdk(caller_key, receiver=own, nonce_ns=time.time_ns() - 11 * S)
    elif case == "future":
        headers = sign_with_sdk(caller_key, receiver=own, nonce_ns=time.time_ns() + 3 * S)
    elif case == "no_receiver":
        headers = _drop(sign_with_sdk(caller_key, receiver=own), "x-bittensor-receiver")
    elif case == "wrong_receiver":
        headers = sign_with_sdk(caller_key, receiver=caller_key.ss58_address)
    elif case == "tampered_body":
        headers = sign_with_sdk(caller_key, receiver=own)
        body = BODY.replace(b"user", b"USER")
    elif case == "other_path":
        headers = sign_with_sdk(caller_key, receiver=own)
        target = "/v1/completions"
    else:  # forged: signed by another key in the caller's name
        headers = {**sign_with_sdk(sdk.new_keypair(), receiver=own), "X-Bittensor-Hotkey": caller_key.ss58_address}
    with pytest.raises(error) as raised:
        verifier.verify(headers, body, method="POST", target=target)
    assert isinstance(raised.value, auth.AuthError)
    assert "0x" not in str(raised.value)  # never echoes the signature
    # The refusal left nothing behind: a good request still verifies.
    good = sign_with_sdk(caller_key, receiver=own)
    assert verifier.verify(good, BODY, method="POST", target=PATH) == caller_key.ss58_address


def test_btauth_replay_is_refused(miner_key, caller_key, verify_path):
    verifier = BtAuthVerifier(miner_key.ss58_address)
    headers = sign_with_sdk(caller_key, receiver=miner_key.ss58_address)
    verifier.verify(headers, BODY, method="POST", target=PATH)
    with pytest.raises(ReplayedRequest):
        verifier.verify(headers, BODY, method="POST", target=PATH)
    # Another caller may use the same nonce value: replays are per hotkey.
    other = sdk.new_keypair()
    same_nonce = int(headers["X-Bittensor-Nonce"])
    assert verifier.verify(sign_with_sdk(other, receiver=miner_key.ss58_address, nonce_ns=same_nonce), BODY,
                           method="POST", target=PATH) == other.ss58_address


def test_the_nonce_store_is_bounded_and_never_blind():
    now = [100 * S]
    store = NonceStore(retention=12.0, capacity=3, clock=lambda: now[0])
    assert all(store.check_and_store("a", now[0] - i) for i in range(3, 0, -1))
    assert store.check_and_store("b", now[0])  # the fourth forgets the oldest ...
    assert len(store) == 3 and store.floor == now[0] - 3
    assert not store.check_and_store("a", now[0] - 3)  # ... whose replay is still refused
    assert not store.check_and_store("c", now[0] - 4)  # and so is anything older
    assert not store.check_and_store("b", now[0])
    now[0] += 13 * S  # everything ages out of the window
    assert store.check_and_store("z", now[0])
    assert len(store) == 1


# ---- the bittensor-10 Dendrite's signature -----------------------------------------------------------------
MESSAGES = ["Hello", "Crème brûlée, 東京, 😀👩‍👩‍👧"]


def test_a_hand_built_v10_request_verifies(miner_key, caller_key):
    verifier = DendriteVerifier(miner_key.ss58_address, max_timeout=600)
    request = v10_request(caller_key, miner_key.ss58_address, MESSAGES, timeout=20)
    caller = verifier.verify(request.headers, request.document["messages"])
    assert (caller.hotkey, caller.timeout) == (caller_key.ss58_address, 20.0)


def test_v10_nonces_per_endpoint(miner_key, caller_key):
    verifier = DendriteVerifier(miner_key.ss58_address, max_timeout=600)
    first = v10_request(caller_key, miner_key.ss58_address, MESSAGES, dendrite_uuid="u1")
    verifier.verify(first.headers, MESSAGES)
    with pytest.raises(ReplayedRequest, match="a newer one was last processed"):
        verifier.verify(first.headers, MESSAGES)
    older = v10_request(caller_key, miner_key.ss58_address, MESSAGES, dendrite_uuid="u1",
                        nonce=int(first.headers["bt_header_dendrite_nonce"]) - 1)
    with pytest.raises(ReplayedRequest):
        verifier.verify(older.headers, MESSAGES)
    # The same older nonce from another endpoint (dendrite uuid) is its first: accepted, as bt.Axon does.
    other = v10_request(caller_key, miner_key.ss58_address, MESSAGES, dendrite_uuid="u2",
                        nonce=int(first.headers["bt_header_dendrite_nonce"]) - 1)
    verifier.verify(other.headers, MESSAGES)
    later = v10_request(caller_key, miner_key.ss58_address, MESSAGES, dendrite_uuid="u1")
    verifier.verify(later.headers, MESSAGES)


@pytest.mark.parametrize(("case", "error", "message"), [
    ("tampered_messages", BadSignature, "computed_body_hash"),
    ("forged", BadSignature, "signature"),
    ("signed_for_another_axon", BadSignature, "signature"),
    ("wrong_axon_hotkey", WrongReceiver, "axon hotkey"),
    ("first_nonce_too_old", StaleRequest, "acceptable delta is 16.00 seconds"),
    ("future_nonce", StaleRequest, "future"),
    ("old_dendrite", MalformedAuth, "older than 7.2.0"),
    ("timeout_too_large", MalformedAuth, "out of range"),
    ("timeout_not_finite", MalformedAuth, "out of range"),
    ("no_signature", MalformedAuth, "missing"),
])
def test_v10_refusals(miner_key, caller_key, case, error, message):
    verifier = DendriteVerifier(miner_key.ss58_address, max_timeout=600)
    own = miner_key.ss58_address
    request = v10_request(caller_key, own, MESSAGES, timeout=12)
    messages = MESSAGES
    headers = request.headers
    if case == "tampered_messages":
        messages = [*MESSAGES[:-1], MESSAGES[-1] + "!"]
    elif case == "forged":
        request.resign(sdk.new_keypair())
    elif case == "signed_for_another_axon":
        request.resign(caller_key, axon_hotkey=caller_key.ss58_address)
    elif case == "wrong_axon_hotkey":
        headers["bt_header_axon_hotkey"] = caller_key.ss58_address
        request.resign(caller_key)
    elif case == "first_nonce_too_old":
        request.resign(caller_key, nonce=time.time_ns() - 17 * S)
    elif case == "future_nonce":
        request.resign(caller_key, nonce=time.time_ns() + 60 * S)
    elif case == "old_dendrite":
        headers["bt_header_dendrite_version"] = "712"
    elif case == "timeout_too_large":
        headers["timeout"] = "601"
    elif case == "timeout_not_finite":
        headers["timeout"] = "inf"
    else:
        del headers["bt_header_dendrite_signature"]
    with pytest.raises(error, match=message):
        verifier.verify(headers, messages)
    assert len(verifier.endpoints) == 0  # a refused request moves no endpoint's nonce


def test_the_endpoint_table_is_bounded_and_never_blind():
    now = [1000 * S]
    table = EndpointNonces(retention=20.0, capacity=2, clock=lambda: now[0])
    table.accept("a:1", now[0] - 3)
    table.accept("b:1", now[0] - 2)
    table.accept("c:1", now[0] - 1)
    assert table.last("a:1") is None and table.floor == now[0] - 3
    now[0] += 21 * S
    assert table.last("c:1") is None and len(table) == 0


@pytest.mark.bt10
async def test_a_real_v10_dendrites_signature_verifies(miner_key):
    """What an unmodified bittensor-10 Dendrite signs, without sending it anywhere."""
    import bittensor as bt

    from minercore.miner import client
    from minercore.miner.protocol import StreamPrompting

    caller = sdk.new_keypair()
    verifier = DendriteVerifier(miner_key.ss58_address, max_timeout=600)
    target = client.axon_info("127.0.0.1", 8091, miner_key.ss58_address)
    async with client.make_dendrite(caller) as dendrite:
        for _ in range(2):  # one endpoint (the dendrite's uuid), increasing nonces
            synapse = dendrite.preprocess_synapse_for_request(
                target, StreamPrompting(roles=["user", "user"], messages=MESSAGES), 30.0)
            headers = synapse.to_headers()
            document = json.loads(json.dumps(synapse.model_dump()))
            assert verifier.verify(headers, document["messages"]).hotkey == caller.ss58_address
        assert isinstance(dendrite, bt.Dendrite)
        with pytest.raises(ReplayedRequest):
            verifier.verify(headers, document["messages"])
        hand_built = v10_request(caller, miner_key.ss58_address, MESSAGES, timeout=30.0)
        assert hand_built.headers["computed_body_hash"] == headers["computed_body_hash"]
        assert set(hand_built.headers) - {"content-type"} <= set(headers)
