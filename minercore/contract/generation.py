"""The request/response contract every backend and front end shares: what a request is, what comes back, how it
can fail, and the one set of checks a request passes whichever backend serves it.

The engine, the upstream backend, the HTTP server and the miner import their types from here and from no
one else, so a new backend or wire protocol needs this module only. Pure Python: nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_DEADLINE = "deadline"
FINISH_CANCELLED = "cancelled"

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256

_request_ids = itertools.count(1)


# ---- failures -------------------------------------------------------------------------------------------
class GenerationError(Exception):
    """A request that ended without a finish reason. ``outcome`` is the label metrics and logs record for it;
    ``http_status`` the status a front end answers with unless it has a reason to differ (it then says so
    explicitly, e.g. the OpenAI server's 429 for an overload)."""

    outcome = "failed"
    http_status = 500


class InvalidRequest(GenerationError, ValueError):
    """The request itself is wrong (empty prompt, too long, absurd parameters); nothing was generated."""

    outcome = "invalid"
    http_status = 400


class EngineOverloaded(GenerationError, RuntimeError):
    """Every slot is busy and the waiting queue is full; the request was rejected at once."""

    outcome = "overloaded"
    http_status = 503  # the miner's; the OpenAI server answers 429, which OpenAI clients retry


class GenerationFailed(GenerationError, RuntimeError):
    """A model step failed (an exception, CUDA out-of-memory); the request ended with this error."""

    outcome = "failed"
    http_status = 500


class EngineClosed(GenerationError, RuntimeError):
    """The engine is shutting down or stopped and accepts no new requests."""

    outcome = "closed"
    http_status = 503


# ---- requests and answers -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    # vLLM's and llama.cpp's extensions, for answers of a fixed length: the stop ids (EOS, end of turn) cannot
    # end the answer before min_tokens tokens, or at all with ignore_eos; stop strings still can. Echo answers
    # are the prompt and ignore both.
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    """Exactly one of ``prompt`` (text), ``prompt_ids`` or ``messages`` ([{"role": ..., "content": ...}])."""

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    timeout: float | None = None  # seconds from submission; past it the stream ends with FINISH_DEADLINE
    priority: float = 0.0  # higher is admitted first when requests wait for a slot
    request_id: str = field(default_factory=lambda: f"req-{next(_request_ids)}")


@dataclass(frozen=True)
class Piece:
    text: str
    finish_reason: str | None = None  # set on the last piece only
    stats: RequestStats | None = None  # set on the last piece only


@dataclass(frozen=True)
class RequestStats:
    request_id: str
    prompt_tokens: int
    tokens: int
    ttft_s: float | None  # submission to the first text handed to the consumer
    duration_s: float
    tokens_per_s: float
    finish_reason: str


@dataclass(frozen=True)
class EngineStats:
    active: int
    queued: int
    completed: int
    failed: int
    cancelled: int
    rejected: int
    steps: int
    tokens: int
    steps_per_s: float  # over the recent window of steps
    tokens_per_s: float
    # Speculative decoding (engine/speculation.py): steps that checked drafts, draft ids checked, and accepted;
    # steps decoded plainly although streams had drafts, since by its measured cost a verify step would not pay.
    verify_steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_declined: int = 0
    # Paged KV (kv/): blocks held by requests, free (cached ones included) and cached with no holder; prompt
    # blocks found in the prefix cache and computed instead, and blocks whose leading tokens were found in a
    # cached block (copied); cached blocks evicted for room; streams preempted.
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    kv_blocks_cached: int = 0
    prefix_hit_blocks: int = 0
    prefix_miss_blocks: int = 0
    prefix_partial_hits: int = 0
    kv_evictions: int = 0
    kv_preemptions: int = 0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


# ---- the request checks (one set: a request valid for one backend is valid for every other) ---------------
def validated_sampling(sampling: SamplingParams, ceiling: int) -> SamplingParams:
    """``sampling`` with ``max_new_tokens`` capped at ``ceiling`` and ``stop`` a tuple; InvalidRequest if absurd."""
    if not isinstance(sampling, SamplingParams):
        raise InvalidRequest("sampling must be SamplingParams")
    n = sampling.max_new_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidRequest(f"max_new_tokens must be a positive integer, got {n!r}")
    t = sampling.temperature
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise InvalidRequest(f"temperature must be a finite number >= 0, got {t!r}")
    if not isinstance(sampling.top_k, int) or sampling.top_k < 0:
        raise InvalidRequest(f"top_k must be an integer >= 0, got {sampling.top_k!r}")
    p = sampling.top_p
    if not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {p!r}")
    if sampling.seed is not None and (not isinstance(sampling.seed, int) or sampling.seed < 0):
        raise InvalidRequest(f"seed must be a non-negative integer, got {sampling.seed!r}")
    m = sampling.min_tokens
    if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m <= n:
        raise InvalidRequest(f"min_tokens must be an integer in [0, max_new_tokens = {n}], got {m!r}")
    if not isinstance(sampling.ignore_eos, bool):
        raise InvalidRequest(f"ignore_eos must be a boolean, got {sampling.ignore_eos!r}")
    stop = tuple(sampling.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings")
    for s in stop:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise InvalidRequest(f"stop strings must be non-empty strings of at most {MAX_STOP_CHARS} characters")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest("stop strings must be valid Unicode text") from exc
    return dataclasses.replace(sampling, max_new_tokens=min(n, ceiling), stop=stop)


def check_prompt_text(text: Any, max_chars: int) -> str:
    """``text`` if it is a prompt any backend can take: a non-empty string of at most ``max_chars`` characters
    that encodes to UTF-8 (no lone surrogates); InvalidRequest otherwise."""
    if not isinstance(text, str):
        raise InvalidRequest("prompt must be a string")
    if len(text) > max_chars:
        raise InvalidRequest(f"prompt is {len(text)} characters; the limit is {max_chars}")
    if not text:
        raise InvalidRequest("prompt is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest("prompt is not valid Unicode text (it contains a lone surrogate)") from exc
    return text


def check_prompt_ids(ids: Any, vocab_size: int | None = None) -> list[int]:
    """``ids`` as a list if it is a non-empty sequence of token ids (ints, not bools, >= 0, and below
    ``vocab_size`` when the backend knows its vocabulary); InvalidRequest otherwise."""
    ids = list(ids)
    if not ids:
        raise InvalidRequest("prompt is empty")
    limit = vocab_size if vocab_size is not None else float("inf")
    if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < limit for i in ids):
        bounds = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise InvalidRequest(f"prompt_ids must be token ids in {bounds}")
    return ids


def check_messages(messages: Any, max_chars: int) -> list[dict[str, str]]:
    """``messages`` as [{"role", "content"}] (a missing or empty role reads "user"), if it is a non-empty list of
    such dicts whose contents hold at most ``max_chars`` characters in all; InvalidRequest otherwise."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    checked = []
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("content"), str)
                and isinstance(message.get("role", "user"), str)):
            raise InvalidRequest("each message must be {'role': str, 'content': str}")
        checked.append({"role": message.get("role") or "user", "content": message["content"]})
    total = sum(len(m["content"]) for m in checked)
    if total > max_chars:
        raise InvalidRequest(f"messages hold {total} characters; the limit is {max_chars}")
    return checked


def check_one_source(request: GenerationRequest) -> None:
    """InvalidRequest unless exactly one of prompt, prompt_ids and messages is given."""
    if sum(x is not None for x in (request.prompt, request.prompt_ids, request.messages)) != 1:
        raise InvalidRequest("give exactly one of prompt, prompt_ids or messages")
