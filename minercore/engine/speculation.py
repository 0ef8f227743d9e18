"""Prompt-lookup drafts for speculative decoding: what each stream will probably say next, read from what it
has already seen.

A stream's history is its prompt and then its own output. The draft is what followed the most recent earlier
occurrence of the history's longest suffix of ``min_match`` to ``max_match`` ids (vLLM's ``ngram`` method,
transformers' prompt lookup); an echo stream's draft is its prompt's next ids, which it always accepts. The
runner checks a draft in one forward and keeps exactly the ids plain decoding would give, so a draft can only
cost time, never change text: a stream whose drafts find nothing or keep failing stops drafting for a number
of steps that doubles with each failure (up to ``_MAX_BACKOFF_STEPS``), and runs meanwhile on the plain,
overlapped decode steps. Whether a verify step pays at all is measured (``StepCosts``): a verify forward over
k + 1 positions a row costs about one plain step where reading the weights dominates (a GPU at small batch),
but several where the products' work grows with the positions (a CPU), and it gives up the launch/collect
overlap; each stream's acceptance rate says how many ids it would bring.

Host-side numpy, one row per slot: the lookup is a few vectorised comparisons per stream per step.
"""

from __future__ import annotations

import numpy as np

MIN_MATCH = 2  # a shorter suffix matches too often by chance in prose
MAX_MATCH = 4
_MAX_BACKOFF_STEPS = 32
# A new stream's expected share of its draft accepted, until its own verify steps say otherwise.
_PRIOR_ACCEPTANCE = 0.5
_ACCEPTANCE_WEIGHT = 0.3  # of the latest verify step in a stream's running acceptance rate


def verify_width(k: int, verify_tokens: int, streams: int, min_width: int = 1) -> int:
    """Drafts per row in a verify step of ``streams`` rows computing at most ``verify_tokens`` positions (each
    row its drafts and its last id), at most ``k``; below 1 the step decodes plainly. A runner that computes at
    least ``min_width`` drafts a row (narrower ones padded) gets that many: they cost nothing more."""
    width = min(k, verify_tokens // streams - 1)
    return max(width, min(k, min_width)) if width >= 1 else width


class Drafter:
    """Per-slot history and drafting state for ``max_batch`` slots of up to ``max_context`` ids each."""

    def __init__(self, max_batch: int, max_context: int, k: int, *, echo: bool, eos_id: int,
                 min_match: int = MIN_MATCH, max_match: int = MAX_MATCH) -> None:
        if not 1 <= min_match <= max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match}, {max_match}")
        self.k = k
        self.echo = echo
        self.eos_id = eos_id
        self.min_match, self.max_match = min_match, max_match
        self.max_context = max_context
        self._history = np.zeros((max_batch, max_context + 1), dtype=np.int64)
        self._length = np.zeros(max_batch, dtype=np.int64)  # ids in the history: prompt + output so far
        self._prompt = np.zeros(max_batch, dtype=np.int64)
        self._max_new = np.zeros(max_batch, dtype=np.int64)
        self._misses = np.zeros(max_batch, dtype=np.int64)  # drafts in a row that gained nothing
        self._wait = np.zeros(max_batch, dtype=np.int64)  # steps left before the slot drafts again
        self._acceptance = np.zeros(max_batch)  # running share of the slot's drafts accepted
        self.verify_steps = 0
        self.drafted = 0  # draft ids checked
        self.accepted = 0  # of them, the ones the model agreed with

    def start(self, slot: int, prompt_ids: list[int], max_new_tokens: int) -> None:
        n = len(prompt_ids)
        self._history[slot, :n] = prompt_ids
        self._length[slot] = self._prompt[slot] = n
        self._max_new[slot] = max_new_tokens
        self._misses[slot] = self._wait[slot] = 0
        self._acceptance[slot] = _PRIOR_ACCEPTANCE

    def extend(self, slots: np.ndarray, ids: np.ndarray) -> None:
        """One new output id for each of ``slots``."""
        room = self._length[slots] < self._history.shape[1]
        slots, ids = slots[room], ids[room]
        self._history[slots, self._length[slots]] = ids
        self._length[slots] += 1

    def wants(self, slots: np.ndarray) -> bool:
        """Whether any of ``slots`` would draft this step (else the step is a plain one: see ``skip``)."""
        return bool((self._wait[slots] == 0).any())

    def expected_ids(self, slots: np.ndarray, width: int) -> float:
        """The ids a verify step of ``width`` drafts a row would emit for ``slots``, by each drafting slot's
        acceptance so far (a plain step emits ``slots.size``)."""
        drafting = slots[self._wait[slots] == 0]
        return slots.size + width * float(self._acceptance[drafting].sum())

    def skip(self, slots: np.ndarray) -> None:
        """A step without drafts: the waiting slots count it."""
        self._wait[slots] = np.maximum(self._wait[slots] - 1, 0)

    def propose(self, slots: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n, width) drafts (default width: k) and (n,) lengths for ``slots`` (length 0: no draft); a slot
        that finds none waits."""
        width = self.k if width is None else width
        drafts = np.zeros((slots.size, width), dtype=np.int64)
        lengths = np.zeros(slots.size, dtype=np.int64)
        outputs = self._length[slots] - self._prompt[slots]
        # Drafts never run past the answer's end or the context (each verify emits up to lengths + 1 ids).
        limits = np.minimum(self._max_new[slots] - outputs - 1, self.max_context - self._length[slots])
        limits = np.clip(limits, 0, width)
        waiting = slots[self._wait[slots] > 0]
        for i, slot in enumerate(slots.tolist()):
            if self._wait[slot] or not limits[i]:
                continue
            draft = self._echo_draft(slot) if self.echo else self._lookup(slot)
            n = min(len(draft), int(limits[i]))
            if n:
                drafts[i, :n] = draft[:n]
                lengths[i] = n
            else:
                self._back_off(slot)
        self._wait[waiting] -= 1
        return drafts, lengths

    def record(self, slots: np.ndarray, lengths: np.ndarray, emitted: np.ndarray) -> None:
        """What a verify step gave: ``emitted`` ids per slot, of which ``emitted - 1`` were accepted drafts."""
        self.verify_steps += 1
        drafted = lengths > 0
        accepted = emitted - 1
        self.drafted += int(lengths.sum())
        self.accepted += int(accepted.sum())
        rows = slots[drafted]
        self._acceptance[rows] += _ACCEPTANCE_WEIGHT * (accepted[drafted] / lengths[drafted]
                                                        - self._acceptance[rows])
        for slot in slots[drafted & (accepted == 0)].tolist():
            self._back_off(slot)
        self._misses[slots[drafted & (accepted > 0)]] = 0

    def _back_off(self, slot: int) -> None:
        self._misses[slot] += 1
        self._wait[slot] = min(1 << int(self._misses[slot]), _MAX_BACKOFF_STEPS)

    def _echo_draft(self, slot: int) -> np.ndarray:
        """An echo's next outputs are its prompt's next ids, then EOS."""
        start, prompt = int(self._length[slot] - self._prompt[slot]), int(self._prompt[slot])
        draft = self._history[slot, start:min(start + self.k, prompt)]
        return draft if start + self.k <= prompt else np.append(draft, self.eos_id)

    def _lookup(self, slot: int) -> np.ndarray:
        """The ids after the latest earlier occurrence of the longest history suffix of min..max_match ids."""
        n = int(self._length[slot])
        history = self._history[slot, :n]
        if n < self.min_match + 1:
            return history[:0]
        # Candidate ends: earlier positions holding the last id; each further step keeps those whose preceding
        # ids also match, so the work shrinks with the match length.
        ends = np.flatnonzero(history[:n - 1] == history[n - 1])
        matched = 1
        best = ends if self.min_match <= 1 else ends[:0]
        while ends.size and matched < self.max_match:
            ends = ends[ends >= matched]
            ends = ends[history[ends - matched] == history[n - 1 - matched]]
            matched += 1
            if ends.size and matched >= self.min_match:
                best = ends
        if not best.size:
            return history[:0]
        start = int(best[-1]) + 1
        return history[start:start + self.k]


class StepCosts:
    """Whether a verify step pays: the running mean wall time of plain and of verify steps by their number of
    rows, as the engine runs them, against the ids each emits (a plain step one a row; a verify step what the
    rows' acceptance predicts, scaled by how much of that prediction verify steps of that many rows realised).

    The prediction alone is optimistic: a row's acceptance is over the drafts it had, and a step's drafts are
    often shorter than its width, or missing. The realised share (emitted over predicted ids, a running mean)
    corrects for that from the steps themselves.

    A row count whose verify step was never timed is tried once; one whose plain step was not is decoded plainly
    first. A verify step judged not to pay is tried again after ``recheck_after`` such judgements, since the
    streams' acceptance only moves when they verify."""

    WEIGHT = 0.2  # of the latest step in a running mean

    def __init__(self, recheck_after: int = 32) -> None:
        self.recheck_after = recheck_after
        self._plain: dict[int, float] = {}
        self._verify: dict[int, float] = {}
        self._realised: dict[int, float] = {}
        self._declined = 0
        self.declined_steps = 0  # verify steps not taken because they would not pay

    def pays(self, rows: int, expected_ids: float) -> bool:
        verify, plain = self._verify.get(rows), self._plain.get(rows)
        if verify is None:
            return True
        if plain is None:
            return False
        realised = self._realised.get(rows, 1.0)
        if expected_ids * realised / verify > rows / plain or self._declined >= self.recheck_after:
            self._declined = 0
            return True
        self._declined += 1
        self.declined_steps += 1
        return False

    def record_plain(self, rows: int, seconds: float) -> None:
        self._plain[rows] = self._mean(self._plain.get(rows), seconds)

    def record_verify(self, rows: int, seconds: float, expected_ids: float | None = None,
                      emitted_ids: int | None = None) -> None:
        """A verify step of ``rows`` rows took ``seconds``; with the ids ``pays`` was told it would emit and the
        ids it did, the realised share is updated too."""
        self._verify[rows] = self._mean(self._verify.get(rows), seconds)
        if expected_ids and emitted_ids is not None:
            self._realised[rows] = self._mean(self._realised.get(rows), min(emitted_ids / expected_ids, 1.0))

    def _mean(self, mean: float | None, seconds: float) -> float:
        return seconds if mean is None else mean + self.WEIGHT * (seconds - mean)
