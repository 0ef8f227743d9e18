"""Text from the model thread to the consumers on the event loop: one mailbox per request, batched wake-ups.

The model thread appends ``Delivery`` entries to an outbox and posts it; the event loop moves each entry's text
into its request's ``Mailbox`` and wakes the consumer waiting on it. Everything here but ``Poster.post`` runs on
the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import NamedTuple

from ..contract.generation import RequestStats

log = logging.getLogger(__name__)


class Delivery(NamedTuple):
    """One entry of the model thread's outbox: what ``deliver`` hands to a mailbox on the event loop."""

    mailbox: Mailbox
    text: str
    reason: str | None = None  # the finish reason, on a stream's last delivery
    error: BaseException | None = None
    stats: RequestStats | None = None


class Mailbox:
    """What the model thread has produced for one consumer and it has not read yet (coalesced if it lags).

    Event-loop only. ``waiter`` is the future a consumer with nothing to read sleeps on: a bare future rather than
    an ``asyncio.Event``, whose wait/set cost several Python frames per piece on the loop the model thread
    shares the GIL with."""

    __slots__ = ("parts", "finish_reason", "error", "stats", "waiter", "submitted_at", "first_text_at", "expired")

    def __init__(self) -> None:
        self.submitted_at = time.monotonic()
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.stats: RequestStats | None = None
        self.waiter: asyncio.Future | None = None
        self.first_text_at: float | None = None
        self.expired = False  # the request's deadline passed, seen on the event loop (generate's own timer)

    def empty(self) -> bool:
        """Nothing to hand over yet: no text, no end, no error, no expiry."""
        return not self.parts and self.finish_reason is None and self.error is None and not self.expired


class Poster:
    """The model thread's side: queue deliveries for the event loop, waking it only if it has not been woken for
    earlier ones yet. While the loop is busy, each step's deliveries join the pending batch instead of paying
    for another wake-up (a self-pipe write, on which the model thread gives up the GIL)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._posted: list[Delivery] = []  # deliveries the event loop has been woken for and not yet made
        self._lock = threading.Lock()

    def post(self, outbox: list[Delivery]) -> None:
        if not outbox:
            return
        with self._lock:
            wake = not self._posted
            self._posted.extend(outbox)
        if not wake:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver_posted)
        except RuntimeError:  # the loop is closed: nobody is left to read these
            with self._lock:
                dropped, self._posted = len(self._posted), []
            log.debug("event loop closed; dropped %d deliveries", dropped)

    def _deliver_posted(self) -> None:
        with self._lock:
            posted, self._posted = self._posted, []
        deliver(posted)


def deliver(outbox: list[Delivery]) -> None:
    """Hand each entry to its mailbox and wake its consumer; the first text's time is when TTFT ends."""
    now = time.monotonic()
    for mailbox, text, reason, error, stats in outbox:
        if text:
            mailbox.parts.append(text)
            if mailbox.first_text_at is None:
                mailbox.first_text_at = now
        if error is not None:
            mailbox.error = error
        elif reason is not None:
            mailbox.finish_reason = reason
            if stats is not None and mailbox.first_text_at is not None:
                stats = dataclasses.replace(stats, ttft_s=mailbox.first_text_at - mailbox.submitted_at)
            mailbox.stats = stats
        # wake() inlined: this runs once per delivery, on the event loop every stream shares.
        waiter, mailbox.waiter = mailbox.waiter, None
        if waiter is not None and not waiter.done():  # done: its consumer was cancelled while waiting
            waiter.set_result(None)


def expire(mailbox: Mailbox) -> None:
    """The request's deadline has passed on the event loop's clock: its consumer ends the stream."""
    mailbox.expired = True
    wake(mailbox)


def wake(mailbox: Mailbox) -> None:
    waiter, mailbox.waiter = mailbox.waiter, None
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def settle(future: asyncio.Future, error: BaseException | None) -> None:
    """Resolve a future the model thread reports to (start()'s warm-up), once."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
