"""``StreamPrompting``: the text-prompting subnet's streaming synapse, wire-compatible with its validators.

The class name is the axon route (``/StreamPrompting``), the fields are the seed's (``roles``, ``messages``,
``completion``) and the body hash covers ``messages`` only, as validators compute it.

Wire format (miner to client): the response body is the completion as UTF-8 text, sent in chunks that each
hold whole characters. The miner's ``--stream.framing newline`` appends ``\\n`` to every chunk for validators
that split the stream on newlines; such parsers cannot tell those separators from the text's own newlines,
so they lose the latter. This client never splits: it decodes the bytes incrementally and keeps every
character, whichever framing the miner uses (with ``newline`` the separators simply stay in the text).
"""

import codecs
import json
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import bittensor as bt
import pydantic
from aiohttp import ClientResponse


class StreamPrompting(bt.StreamingSynapse):
    # Required (no default) like the seed's fields: a seed-style axon rebuilds the synapse from headers, which
    # carry placeholders only for required fields, so optional ones here would break talking to such axons.
    roles: list[str] = pydantic.Field(..., title="Roles", description="The role of each message, in order.")
    messages: list[str] = pydantic.Field(..., title="Messages", description="The conversation, in order.")
    completion: str = pydantic.Field("", title="Completion", description="The miner's streamed answer.")

    # A ClassVar (bittensor 10's style), not the seed's pydantic field; the hash is the same (see the tests).
    required_hash_fields: ClassVar[tuple[str, ...]] = ("messages",)

    # Filled only when the axon answered with an error status instead of a stream.
    _error_message: str | None = pydantic.PrivateAttr(default=None)

    async def process_streaming_response(self, response: ClientResponse) -> AsyncIterator[str]:
        """Yield the completion's text as it arrives, accumulating it in ``completion``.

        A network read may end inside a multi-byte character, so the bytes go through an incremental UTF-8
        decoder; invalid bytes become U+FFFD rather than failing the whole stream.
        """
        if response.status != 200:
            # An error answer is a small JSON document, not completion text.
            self._error_message = _error_message(await response.read())
            return
        if self.completion is None:
            self.completion = ""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async for chunk in response.content.iter_any():
            text = decoder.decode(chunk)
            if text:
                self.completion += text
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            self.completion += tail
            yield tail

    def deserialize(self) -> str:
        return self.completion

    def extract_response_json(self, response: ClientResponse) -> dict[str, Any]:
        """The synapse's state after the stream: the response headers plus the local fields (as the seed does)."""
        headers = {key.lower(): value for key, value in response.headers.items()}

        def section(prefix: str) -> dict[str, str]:
            return {key[len(prefix):]: value for key, value in headers.items() if key.startswith(prefix)}

        result: dict[str, Any] = {
            "name": headers.get("name", ""),
            "timeout": float(headers.get("timeout", 0)),
            "total_size": int(headers.get("total_size", 0)),
            "header_size": int(headers.get("header_size", 0)),
            "dendrite": section("bt_header_dendrite_"),
            "axon": section("bt_header_axon_"),
            "roles": self.roles,
            "messages": self.messages,
            "completion": self.completion,
        }
        if self._error_message is not None:
            result["message"] = self._error_message  # the dendrite reads this key for non-200 answers
        return result


def _error_message(body: bytes) -> str:
    try:
        document = json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace")
    if isinstance(document, dict) and isinstance(document.get("message"), str):
        return document["message"]
    return json.dumps(document)
