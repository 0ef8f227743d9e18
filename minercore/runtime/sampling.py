"""Per-slot decode state and sampling, shared by every runner (``native.ModelRunner``, ``hf.HFRunner``):
the same logits give the same ids whichever runner computed them.

Sampling is stateless per step: Gumbel noise hashed from (seed, position, vocabulary index), so a request's
samples do not depend on what shares its batch. Echo rows are steered to reproduce their prompt, then EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

# Sampling work a step needs, from cheapest to dearest; a step runs the dearest any of its rows needs.
GREEDY = 0  # argmax (temperature 0, and every echo row)
SAMPLE = 1  # + temperature and Gumbel noise
FILTER = 2  # + top-k / top-p (a sort over the vocabulary)
KINDS = (GREEDY, SAMPLE, FILTER)
KIND_NAMES = ("greedy", "sample", "filter")  # indexed by kind


@dataclass(frozen=True)
class SlotParams:
    echo: bool = True  # steer greedy output to reproduce the prompt, then EOS
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0
    min_new: int = 0  # the stop ids cannot be sampled for the first min_new outputs (min_tokens, ignore_eos)

    def kind(self) -> int:
        if self.echo or self.temperature == 0.0:
            return GREEDY
        return FILTER if self.top_k > 0 or self.top_p < 1.0 else SAMPLE

    def validate(self) -> None:
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_new < 0:
            raise ValueError(f"min_new must be >= 0, got {self.min_new}")


class ContextOverflow(ValueError):
    """The prompt plus at least one new token does not fit the runner's ``max_context``."""


_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    # A 32-bit integer finaliser on int64 tensors: inputs stay below 2**32 and the multiplier below 2**27,
    # so products never overflow int64 and the same bits come out eager, compiled, on CPU or CUDA.
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def gumbel_noise(seed: Tensor, pos: Tensor, vocab_size: int) -> Tensor:
    """(b, V) Gumbel noise that depends only on (seed, position, vocabulary index): a request's samples are
    the same whatever shares its batch, without a generator object or a host sync."""
    row = _mix32(seed ^ _mix32(pos & _M32))
    idx = torch.arange(vocab_size, device=seed.device, dtype=torch.int64)
    bits = _mix32((row[:, None] + idx * 0x9E3779B1) & _M32)
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # 24 bits: exact in float32, never 0 or 1
    return -torch.log(-torch.log(uniform))


def choose_tokens(logits: Tensor, pos: Tensor, echo: Tensor, target: Tensor, temperature: Tensor,
                  top_k: Tensor, top_p: Tensor, seed: Tensor, kind: int) -> Tensor:
    """(b, V) float32 logits -> (b,) int64 ids. Echo rows get +inf on their target before the argmax, so
    the model's step is always paid for but the output is steered. ``kind`` is a Python int (a compile
    specialisation): work a step's rows do not need is left out of the graph."""
    scores = logits
    if kind >= SAMPLE:
        sampled = temperature > 0
        scaled = logits / torch.where(sampled, temperature, 1.0)[:, None]
        if kind == FILTER:
            scaled = _top_k_top_p(scaled, top_k, top_p)
        # argmax(logits / T + Gumbel) is a draw from softmax(logits / T).
        noisy = scaled + gumbel_noise(seed, pos, logits.shape[1])
        scores = torch.where(sampled[:, None], noisy, logits)
    # One scattered value per row rather than a vocabulary-wide mask: half the cost of the step's tail, eager.
    own = scores.gather(1, target[:, None])
    steered = scores.scatter(1, target[:, None], torch.where(echo[:, None], float("inf"), own))
    return steered.argmax(dim=-1)


def _top_k_top_p(scaled: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    # Top-k, then top-p on the renormalised top-k distribution (the order HF and vLLM apply them): keep
    # the longest prefix of the sorted vocabulary inside both, where the token that crosses p is kept.
    vocab = scaled.shape[1]
    ordered = scaled.sort(dim=-1, descending=True).values
    rank = torch.arange(vocab, device=scaled.device)
    in_k = rank < torch.where(top_k > 0, top_k, vocab)[:, None]
    probs = ordered.masked_fill(~in_k, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    # top_p == 1 keeps everything even where the float32 cumsum reaches 1 before the tail.
    nucleus = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    # At least the top token: rows that were never prefilled (top_p 0) still run inside a bucket.
    kept = (in_k & nucleus).sum(dim=-1, keepdim=True).clamp(min=1)
    threshold = ordered.gather(1, kept - 1)
    return scaled.masked_fill(scaled < threshold, float("-inf"))


class SlotState(nn.Module):
    """Per-slot decode state, on the device, indexed by slot."""

    def __init__(self, max_batch: int, max_context: int, device: torch.device,
                 stop_ids: Sequence[int] = ()) -> None:
        super().__init__()

        def buf(name: str, dtype: torch.dtype, *shape: int) -> None:
            self.register_buffer(name, torch.zeros(shape or (max_batch,), dtype=dtype, device=device),
                                 persistent=False)

        buf("tokens", torch.int64)  # the last token of each slot (fed to the next step)
        buf("pos", torch.int64)  # the position that token occupies
        buf("prompt_len", torch.int64)
        buf("echo", torch.bool)
        buf("temperature", torch.float32)
        buf("top_k", torch.int64)
        buf("top_p", torch.float32)
        buf("seed", torch.int64)
        buf("active", torch.bool)  # rows the current step advances; other rows in the bucket are left as is
        buf("targets", torch.int64, max_batch, max_context)  # echo: prompt ids then EOS
        buf("min_new", torch.int64)
        # The ids that end a stream, masked for rows still short of min_new outputs.
        self.register_buffer("stop_ids", torch.tensor(list(stop_ids), dtype=torch.int64, device=device),
                             persistent=False)

    def move(self, src: int, dst: int) -> None:
        """Row ``src``'s state into row ``dst`` (the runner packing its live rows; ``src`` is then free)."""
        for name, buf in self.named_buffers():
            if name != "stop_ids":
                buf[dst] = buf[src]

    def start(self, slot: int, ids: Tensor, params: SlotParams, eos_id: int) -> None:
        """Reset row ``slot`` for a new (1-D, on-device) prompt; its first fed token is set after prefill."""
        n = ids.shape[0]
        self.prompt_len[slot] = n
        self.pos[slot] = n
        self.echo[slot] = params.echo
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.seed[slot] = _fold_seed(params.seed)
        self.min_new[slot] = params.min_new
        self.targets[slot, :n] = ids
        self.targets[slot, n] = eos_id


def check_prompt(prompt_ids: Sequence[int], max_context: int, vocab_size: int) -> Tensor:
    """The prompt as a CPU int64 tensor; ValueError if empty or out of the vocabulary, ContextOverflow if it
    leaves no room for a new token."""
    n = len(prompt_ids)
    if n == 0:
        raise ValueError("empty prompt: at least one token is needed")
    if n >= max_context:
        raise ContextOverflow(f"prompt of {n} tokens leaves no room for a new token in max_context "
                              f"{max_context} (at most {max_context - 1} prompt tokens)")
    ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
    if ids.dim() != 1:
        raise ValueError(f"prompt ids must be a flat sequence, got shape {tuple(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"prompt ids must be in [0, {vocab_size}), got values {low}..{high}")
    return ids


def check_room(positions: np.ndarray, slots: np.ndarray, max_context: int, rows: np.ndarray | None = None) -> None:
    """ContextOverflow if a slot's next fed token would sit at or past ``max_context`` (a caller bug: it
    must bound max_new_tokens by max_context - prompt_len). ``positions`` is indexed by ``rows`` where given
    (the slots' rows), else by the slots."""
    full = slots[positions[slots if rows is None else rows] >= max_context]
    if full.size:
        raise ContextOverflow(f"decode: slots {full.tolist()} have filled max_context {max_context}; "
                              f"bound max_new_tokens by max_context - prompt_len")


def check_slot(slot: int, max_batch: int) -> None:
    if not isinstance(slot, (int, np.integer)) or isinstance(slot, bool) or not 0 <= slot < max_batch:
        raise ValueError(f"slot must be an int in [0, {max_batch}), got {slot!r}")


def slot_tokens(logits: Tensor, state: SlotState, rows: slice | Tensor, pos: Tensor, kind: int) -> Tensor:
    """Next ids for state rows ``rows`` (a slice or an index tensor) from their (b, V) float32 logits, the
    fed tokens sitting at positions ``pos``."""
    prompt_len = state.prompt_len[rows]
    # The token fed at pos yields output j = pos - prompt_len + 1 (output 0 comes from the prompt's last
    # position). An echo row's output j is targets[j]: the prompt, then EOS for every j >= prompt_len.
    output = pos - prompt_len + 1
    index = torch.minimum(output.clamp(min=0), prompt_len)
    if isinstance(rows, slice):
        target = state.targets[rows].gather(1, index[:, None])[:, 0]
    else:  # one element per row: never a copy of the rows' whole targets
        target = state.targets[rows, index]
    if state.stop_ids.numel():
        # In place and over the stop ids' columns only: rows free to stop pay for a gather, not a vocabulary pass.
        stops = logits[:, state.stop_ids]
        logits[:, state.stop_ids] = torch.where((output < state.min_new[rows])[:, None], float("-inf"), stops)
    return choose_tokens(logits, pos, state.echo[rows], target, state.temperature[rows], state.top_k[rows],
                         state.top_p[rows], state.seed[rows], kind)


def checked_prompt(slot: int, prompt_ids: Sequence[int], params: SlotParams, *, max_batch: int, max_context: int,
                   vocab_size: int) -> Tensor:
    """The checks every prefill makes before it writes anything: the slot, the sampling parameters and the
    prompt. Returns the prompt as (n,) ids on the host."""
    check_slot(slot, max_batch)
    params.validate()
    return check_prompt(prompt_ids, max_context, vocab_size)


def first_tokens(state: SlotState, logits: Tensor, rows: slice | Tensor, last: Tensor, kind: int) -> Tensor:
    """Each prefilled row's first new id, chosen from its last prompt position's (b, V) float32 logits (at
    positions ``last``) and fed to the row's next step."""
    token = slot_tokens(logits, state, rows, last, kind)
    state.tokens[rows] = token
    return token


def prefill_slot(state: SlotState, slot: int, prompt_ids: Sequence[int], params: SlotParams, *, vocab_size: int,
                 eos_id: int, last_logits: Callable[[Tensor], Tensor]) -> int:
    """A whole prompt's prefill around a runner's own model call: checks, the slot's state reset, the first
    new id chosen and fed to the slot's next step.

    ``last_logits`` gets the prompt as (n,) ids on the state's device and returns the (1, V) float32 logits of
    its last position. Returns the first new id (the prefill's one host sync); the runner updates its own host
    mirrors (position, sampling kind) afterwards.
    """
    max_batch, max_context = state.targets.shape
    ids = checked_prompt(slot, prompt_ids, params, max_batch=max_batch, max_context=max_context,
                         vocab_size=vocab_size).to(state.targets.device)
    state.start(slot, ids, params, eos_id)
    last = torch.full((1,), ids.shape[0] - 1, dtype=torch.int64, device=ids.device)
    return int(first_tokens(state, last_logits(ids), slice(slot, slot + 1), last, params.kind()).item())


def _fold_seed(seed: int) -> int:
    # Any Python int to the 32 bits the noise hash takes; negative seeds and the high half of 64-bit seeds
    # still change the result.
    seed &= (1 << 64) - 1
    return (seed ^ (seed >> 32)) & _M32
