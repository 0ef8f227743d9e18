"""StreamPrompting: wire compatibility with seed-style synapses and the client-side stream parser."""

from __future__ import annotations

import json
import warnings
from typing import List  # the seed's spelling, to mirror its synapse

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minercore.miner import sdk

# The synapse exists only in bittensor 10: CI runs these there; under 11 the root conftest deselects them.
pytestmark = pytest.mark.bt10

MIXED = "Crème brûlée, naïve café.\n漢字とかな、한국어 😀🎉👩‍👩‍👧\n\nend"

if sdk.MAJOR == 10:
    import bittensor as bt

    from minercore.miner.protocol import StreamPrompting

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the seed's hash field shadows Synapse's ClassVar

        class SeedStreamPrompting(bt.StreamingSynapse):
            """The text-prompting seed's synapse as validators declare it (hash fields as a pydantic field)."""

            roles: List[str] = pydantic.Field(...)  # noqa: UP006 - the seed's spelling
            messages: List[str] = pydantic.Field(...)  # noqa: UP006
            required_hash_fields: List[str] = pydantic.Field(["messages"])  # noqa: UP006
            completion: str = ""

            async def process_streaming_response(self, response):  # pragma: no cover - never streamed here
                yield b""

            def deserialize(self) -> str:
                return self.completion

            def extract_response_json(self, response) -> dict:  # pragma: no cover
                return {}


class FakeContent:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self):
        for chunk in self.chunks:
            yield chunk


class FakeResponse:
    """The parts of aiohttp's ClientResponse the synapse reads."""

    def __init__(self, chunks: list[bytes], status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.content = FakeContent(chunks)
        self.headers = headers or {}

    async def read(self) -> bytes:
        return b"".join(self.content.chunks)


async def consume(synapse: StreamPrompting, response: FakeResponse) -> list[str]:
    return [piece async for piece in synapse.process_streaming_response(response)]


def synapse(messages: list[str] | None = None) -> StreamPrompting:
    messages = messages if messages is not None else ["hello"]
    return StreamPrompting(roles=["user"] * len(messages), messages=messages)


@pytest.mark.parametrize("messages", [["hello"], ["sys", MIXED], [""], ["a\nb", "Ω" * 1000]])
def test_body_hash_matches_a_seed_style_synapse(messages):
    roles = ["user"] * len(messages)
    ours = StreamPrompting(roles=roles, messages=messages)
    seed = SeedStreamPrompting(roles=roles, messages=messages)
    assert ours.body_hash == seed.body_hash
    assert ours.body_hash != StreamPrompting(roles=roles, messages=[*messages, "x"]).body_hash
    # Validators hash messages only: roles are not covered.
    assert ours.body_hash == StreamPrompting(roles=["system"] * len(messages), messages=messages).body_hash


def test_route_and_required_fields_match_the_seed():
    assert StreamPrompting.__name__ == "StreamPrompting"
    headers = synapse().to_headers()
    # Both sides send placeholders for required fields; a seed-style axon rebuilds its synapse from them.
    assert {"bt_header_input_obj_roles", "bt_header_input_obj_messages"} <= headers.keys()
    rebuilt = StreamPrompting.from_headers(SeedStreamPrompting(roles=["user"], messages=["x"]).to_headers())
    assert rebuilt.roles == [] and rebuilt.messages == []


async def test_stream_split_inside_characters_is_decoded_whole():
    data = MIXED.encode()
    syn = synapse()
    pieces = await consume(syn, FakeResponse([data[i:i + 1] for i in range(len(data))]))
    assert "".join(pieces) == MIXED == syn.completion == syn.deserialize()
    assert all(pieces) and "\ufffd" not in syn.completion


@settings(max_examples=50, deadline=None)
@given(text=st.text(min_size=0, max_size=200), cuts=st.lists(st.integers(min_value=0, max_value=800), max_size=8))
async def test_any_chunking_yields_the_exact_text(text, cuts):
    data = text.encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    syn = synapse()
    pieces = await consume(syn, FakeResponse(chunks))
    assert "".join(pieces) == text == syn.completion


async def test_newlines_are_text_not_separators():
    syn = synapse()
    await consume(syn, FakeResponse([b"line one\n", b"\n", b"line two\n"]))
    assert syn.completion == "line one\n\nline two\n"


async def test_invalid_bytes_become_replacement_characters():
    syn = synapse()
    await consume(syn, FakeResponse([b"ok \xff\xfe", b" \xe4\xb8"]))  # garbage, then a truncated character
    assert syn.completion == "ok \ufffd\ufffd \ufffd"


HEADERS = {
    "name": "StreamPrompting", "timeout": "12.0", "total_size": "100", "header_size": "50",
    "bt_header_axon_status_code": "200", "bt_header_axon_status_message": "Success",
    "bt_header_axon_process_time": "0.25", "bt_header_dendrite_hotkey": "5abc", "Content-Type": "text/event-stream",
}


async def test_extract_response_json_reads_headers_and_local_fields():
    syn = synapse(["hi"])
    await consume(syn, FakeResponse([b"hi"], headers=HEADERS))
    document = syn.extract_response_json(FakeResponse([], headers=HEADERS))
    assert document["name"] == "StreamPrompting" and document["timeout"] == 12.0
    assert document["total_size"] == 100 and document["header_size"] == 50
    assert document["axon"] == {"status_code": "200", "status_message": "Success", "process_time": "0.25"}
    assert document["dendrite"] == {"hotkey": "5abc"}
    assert (document["roles"], document["messages"], document["completion"]) == (["user"], ["hi"], "hi")
    assert "message" not in document
    # What the dendrite does with it on a 200: rebuild a synapse from the document.
    rebuilt = StreamPrompting(**document)
    assert rebuilt.axon.status_code == 200 and rebuilt.completion == "hi"


async def test_error_answer_is_a_message_not_completion_text():
    syn = synapse()
    error = FakeResponse([json.dumps({"message": "roles and messages differ"}).encode()], status=400,
                         headers={"bt_header_axon_status_code": "400"})
    assert await consume(syn, error) == []
    assert syn.completion == ""
    document = syn.extract_response_json(error)
    assert document["message"] == "roles and messages differ"
    assert document["axon"]["status_code"] == "400"


async def test_error_answer_that_is_not_json_is_kept_as_text():
    syn = synapse()
    await consume(syn, FakeResponse([b"Internal Server Error"], status=500))
    assert syn.extract_response_json(FakeResponse([], status=500))["message"] == "Internal Server Error"
