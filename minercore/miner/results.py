"""What a client saw of one stream, whichever protocol carried it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StreamResult:
    """One stream as the caller saw it."""

    text: str
    status_code: int | None  # the miner's status, or the dendrite's 408/503/... for transport failures
    status_message: str | None
    ttft_s: float | None  # request start to the first text
    duration_s: float  # request start to the end of the stream
    chunks: int  # text pieces as they came off the network
    error: str | None = None  # an exception outside the protocol's own error handling

    @property
    def ok(self) -> bool:
        return self.status_code == 200 and self.error is None
