"""What waits for a slot and in which order, and which whole prompts share one batched prefill.

The engine's model thread decides when to admit; this module holds the pieces that do not depend on the runner:
the request as the model thread sees it (``Job``), the priority queue of waiting jobs and the grouping of
prompts admitted together.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..contract.generation import SamplingParams
    from ..runtime.sampling import SlotParams
    from .delivery import Mailbox


class Job:
    """A request as the model thread sees it. Fields after ``mailbox`` belong to the model thread only."""

    __slots__ = ("request_id", "prompt_ids", "slot_params", "sampling", "deadline", "priority", "seq",
                 "mailbox", "slot", "tokens", "prefilled", "cached", "admission", "resume")

    def __init__(self, request_id: str, prompt_ids: list[int], slot_params: SlotParams, sampling: SamplingParams,
                 deadline: float | None, priority: float, seq: int, mailbox: Mailbox) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.slot_params = slot_params
        self.sampling = sampling
        self.deadline = deadline
        self.priority = priority
        self.seq = seq
        self.mailbox = mailbox
        self.slot = -1
        self.tokens = 0  # ids handed to the stream loop for this job, set when it leaves its slot
        self.prefilled = 0  # prompt tokens in its slot's cache so far (chunked prefill)
        self.cached = 0  # of those, the leading ones found in the prefix cache (paged KV)
        self.admission = 0  # admission order (paged KV): the most recently admitted stream is preempted first
        self.resume: list[int] | None = None  # a preempted stream's prompt and output so far, while prefilled again

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def __lt__(self, other: Job) -> bool:  # heap order: higher priority first, then arrival
        return (-self.priority, self.seq) < (-other.priority, other.seq)


class WaitQueue:
    """Jobs waiting for a slot, highest priority first, then arrival. Unlocked: the engine's lock guards it,
    since the event loop adds and withdraws jobs while the model thread admits them."""

    def __init__(self) -> None:
        self._heap: list[Job] = []

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, job: Job) -> bool:
        return job in self._heap

    def push(self, job: Job) -> None:
        """A new job, or one taken out with ``pop_next`` that must wait again: it keeps its place (its seq)."""
        heapq.heappush(self._heap, job)

    def remove(self, job: Job) -> None:
        self._heap.remove(job)
        heapq.heapify(self._heap)

    def pop_next(self, now: float, room: float) -> tuple[Job | None, list[Job]]:
        """The next job to admit, or None if its prompt is longer than ``room`` (it keeps its place); and the
        expired jobs found in front of it, taken out on the way."""
        expired = []
        while self._heap:
            job = self._heap[0]
            if job.expired(now):
                expired.append(heapq.heappop(self._heap))
            elif len(job.prompt_ids) > room:
                break
            else:
                return heapq.heappop(self._heap), expired
        return None, expired

    def pop_expired(self, now: float) -> list[Job]:
        """Every job past its deadline, wherever it waits."""
        expired = [job for job in self._heap if job.expired(now)]
        if expired:
            self._heap = [job for job in self._heap if not job.expired(now)]
            heapq.heapify(self._heap)
        return expired

    def drain(self) -> list[Job]:
        drained, self._heap = self._heap, []
        return drained


_MAX_PADDING = 1.5  # a batched prefill computes at most this many times its prompts' own tokens


def prefill_groups(jobs: list[Job], max_tokens: int) -> list[list[Job]]:
    """Jobs in groups that are each one batched prefill, shortest first: a job computes its prompt past its
    prefix-cache hit (``cached``), a group is padded to its longest, so only similar lengths share one (one
    2,000-token prompt among 8 short ones would cost 8 x 2,000), and holds at most ``max_tokens`` padded tokens,
    the runner's saturation point: past it a batch computes no faster than its prompts one after another, and
    only delays the first ones' first tokens."""
    groups: list[list[Job]] = []
    tokens = 0
    for job in sorted(jobs, key=lambda j: len(j.prompt_ids) - j.cached):
        n = len(job.prompt_ids) - job.cached  # the longest so far: the group's padded length if it joins
        padded = (len(groups[-1]) + 1) * n if groups else 0
        if groups and padded <= _MAX_PADDING * (tokens + n) and padded <= max_tokens:
            groups[-1].append(job)
            tokens += n
        else:
            groups.append([job])
            tokens = n
    return groups
