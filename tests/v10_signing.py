"""A bittensor-10 Dendrite's StreamPrompting request built by hand, so that tests can send one on either SDK.

The headers are those a 10.x ``Dendrite.preprocess_synapse_for_request`` sets (test_miner_auth checks that a
real one verifies the same way); the body is the synapse's JSON, as the dendrite posts it.
"""

from __future__ import annotations

import json
import time
import uuid as uuid_module
from dataclasses import dataclass, field
from typing import Any

from minercore.miner.auth import streamprompting_body_hash

DENDRITE_VERSION = 10_005_000  # bittensor 10.5.0's version_as_int


@dataclass
class V10Request:
    headers: dict[str, str]
    document: dict[str, Any] = field(default_factory=dict)

    @property
    def body(self) -> bytes:
        return json.dumps(self.document).encode()

    def resign(self, keypair: Any, *, nonce: int | None = None, axon_hotkey: str | None = None) -> None:
        """Sign again as the dendrite signs (a new nonce, or a capture of an older request)."""
        headers = self.headers
        if nonce is not None:
            headers["bt_header_dendrite_nonce"] = str(nonce)
        message = (f"{headers['bt_header_dendrite_nonce']}.{headers['bt_header_dendrite_hotkey']}."
                   f"{axon_hotkey or headers['bt_header_axon_hotkey']}.{headers['bt_header_dendrite_uuid']}."
                   f"{headers['computed_body_hash']}")
        headers["bt_header_dendrite_signature"] = "0x" + bytes(keypair.sign(message.encode())).hex()


def v10_request(keypair: Any, axon_hotkey: str, messages: Any, roles: Any = None, *, timeout: float = 12.0,
                dendrite_uuid: str | None = None, nonce: int | None = None) -> V10Request:
    """Signed as a dendrite signs; ``messages`` and ``roles`` may be values the protocol's types refuse (the
    body hash covers ``str(messages)`` whatever it is)."""
    roles = roles if roles is not None else ["user"] * len(messages)
    headers = {
        "name": "StreamPrompting",
        "timeout": str(timeout),
        "bt_header_axon_ip": "127.0.0.1",
        "bt_header_axon_port": "0",
        "bt_header_axon_hotkey": axon_hotkey,
        "bt_header_dendrite_ip": "0.0.0.0",
        "bt_header_dendrite_version": str(DENDRITE_VERSION),
        "bt_header_dendrite_nonce": str(nonce if nonce is not None else time.time_ns()),
        "bt_header_dendrite_uuid": dendrite_uuid or str(uuid_module.uuid1()),
        "bt_header_dendrite_hotkey": keypair.ss58_address,
        "computed_body_hash": streamprompting_body_hash(messages),
        "content-type": "application/json",
    }
    document = {"name": "StreamPrompting", "timeout": timeout, "roles": roles, "messages": messages,
                "completion": "", "required_hash_fields": ["messages"]}
    request = V10Request(headers, document)
    request.resign(keypair)
    return request
