"""Bad input through a real axon: the miner in-process over the real tiny engine, called by real dendrites and by
hand-signed raw requests (for bodies a dendrite cannot send). Each case gets a clear status and message, and the
next normal request succeeds. (The checks below the axon: test_hardening_units.py.)
"""

import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from helpers import CONTEXT, new_keypair, post, running_miner, sign, stream_prompt, target, tiny_engine

from minercore.miner.neuron import Miner

pytestmark = pytest.mark.asyncio(loop_scope="module")

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def miner(tmp_path_factory):
    async with running_miner(tmp_path_factory.mktemp("input"), engine=tiny_engine()) as running:
        yield running


# ---- the cases: each returns (status, message or text) -----------------------------------------------------
Case = Callable[[Miner], Awaitable[tuple[int, str]]]


def dendrite(messages: list[str], roles: list[str] | None = None) -> Case:
    async def send(miner: Miner) -> tuple[int, str]:
        result = await stream_prompt(target(miner), messages, roles, wallet=new_keypair())
        assert result.error is None, result.error
        return result.status_code, result.text if result.ok else result.status_message
    return send


def crafted(*, messages: Any = ("x",), roles: Any = ("user",), extra: dict[str, Any] | None = None,
            drop: tuple[str, ...] = (), headers: dict[str, str] | None = None, data: bytes | None = None,
            path: str | None = None) -> Case:
    """A signed request whose body or headers a dendrite would not produce."""
    async def send(miner: Miner) -> tuple[int, str]:
        request = await sign(miner, list(messages) if isinstance(messages, tuple) else messages,
                             list(roles) if isinstance(roles, tuple) else roles)
        request.body.update(extra or {})
        for key in drop:
            del request.body[key]
        request.headers.update(headers or {})
        if path is not None:
            request.url = request.url.rsplit("/", 1)[0] + path
        return await post(request, data=data)
    return send


REFUSED = [
    ("empty messages", dendrite([], []), 400, "messages must be a non-empty list"),
    ("roles and messages of different lengths", dendrite(["one", "two"], ["user"]), 400,
     "roles has 1 entries and messages has 2: give exactly one role per message"),
    ("a number for a message", crafted(messages=[1]), 400, "messages must be a list of strings"),
    ("null for a role", crafted(roles=[None]), 400, "roles must be a list of strings"),
    ("a string for the message list", crafted(messages="hello"), 400, "messages must be a list of strings"),
    ("a nested list", crafted(messages=[["a"]]), 400, "messages must be a list of strings"),
    ("no messages field", crafted(drop=("messages",)), 400, "messages must be a list of strings"),
    ("a body that is not JSON", crafted(data=b"{not json"), 400, "the request body is not a JSON document"),
    ("JSON nested 100000 deep", crafted(data=b"[" * 100_000 + b"]" * 100_000), 400,
     "the request body is not a JSON document"),
    ("a body that is not UTF-8", crafted(data=b'{"roles": ["user"], "messages": ["\xff\xfe"]}'), 400,
     "the request body is not a JSON document"),
    ("a body sent as text", crafted(headers={"content-type": "text/plain"}), 415,
     "send the request body as application/json, not text/plain"),
    ("a JSON array body", crafted(data=b'["user", "hi"]'), 400, "must be a JSON object of StreamPrompting's"),
    ("an empty string", dendrite([""]), 400, "prompt is empty"),
    ("a prompt longer than the model's context", dendrite(["word " * 400]), 400,
     f"tokens; the model's context is {CONTEXT} tokens"),
    ("a 10 MB body", dendrite(["x" * 10_000_000]), 413,
     "bytes; this miner accepts at most 4194304 (--axon.max_body_bytes)"),
    ("a lone surrogate", dendrite(["half a pair: \ud83d!"]), 400,
     "prompt is not valid Unicode text (it contains a lone surrogate)"),
    ("an unknown route", crafted(path="/TextToSpeech"), 404, "Not Found"),
    ("a negative timeout", crafted(headers={"timeout": "-1"}), 401, "timeout '-1' is out of range"),
    ("a NaN timeout", crafted(headers={"timeout": "nan"}), 401, "timeout 'nan' is out of range"),
    ("an infinite timeout", crafted(headers={"timeout": "inf"}), 401, "timeout 'inf' is out of range"),
    ("a timeout of 30 years", crafted(headers={"timeout": "1e9"}), 401, "timeout '1e9' is out of range"),
    ("a timeout that is not a number", crafted(headers={"timeout": "soon"}), 401, "timeout 'soon' is out of range"),
]


@pytest.mark.parametrize("case, status, message", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
async def test_bad_input_gets_a_clear_error_and_the_next_request_succeeds(miner, case, status, message):
    got_status, got_message = await case(miner)
    assert (got_status, message in got_message) == (status, True), got_message[:500]
    assert miner.engine.stats().active == 0
    normal = await stream_prompt(target(miner), ["a normal request ✓"], wallet=new_keypair())
    assert normal.ok and normal.text == "a normal request ✓"


ANSWERED = [
    ("a one-token prompt", dendrite(["Hi"]), "Hi"),
    ("control characters", dendrite(["\x00\x01\x07\x08\x1b[31mred\x1b[0m\x7f\x9b\u2028\u2029\ufeff\r\n\t"]),
     "\x00\x01\x07\x08\x1b[31mred\x1b[0m\x7f\x9b\u2028\u2029\ufeff\r\n\t"),
    ("special-token spellings", dendrite(["<|endoftext|> stays text"]), "<|endoftext|> stays text"),
    # The protocol carries no sampling parameters: absurd ones in the body are ignored, not obeyed.
    ("sampling fields the protocol does not carry",
     crafted(messages=["ignored knobs"], extra={"max_new_tokens": -5, "max_tokens": 10**30, "temperature": math.nan,
                                                "top_p": math.inf}), "ignored knobs"),
]


@pytest.mark.parametrize("case, text", [case[1:] for case in ANSWERED], ids=[case[0] for case in ANSWERED])
async def test_odd_but_valid_input_is_answered_exactly(miner, case, text):
    assert await case(miner) == (200, text)
