"""The decode loop the engine drives: prefill one slot, then one step for every active slot at a time.

State lives on the device in fixed-size per-slot buffers (last token, position, sampling parameters, echo
targets) next to the model's static KV cache, so a step needs no host-to-device copy and exactly one host
sync (reading the sampled ids). The step runs over a prefix of the cache rows (the batch bucket) and a
prefix of the positions (the context bucket), both powers of two, so a few short streams do not pay for
``max_batch`` x ``max_context``. ``_compile_steps`` is the one place torch.compile is applied.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .config import ModelOptions, context_for
from .device import dtype_name, select
from .llama import FAMILIES as LLAMA_FAMILIES
from .llama import PRESETS as LLAMA_PRESETS
from .llama import LlamaConfig, LlamaLM, checkpoint_family, load_llama, read_config
from .model import PRESETS, SimulatedLM, load_gpt2

logger = logging.getLogger("minercore.runner")

# Sampling work a step needs, from cheapest to dearest; a step runs the dearest any of its rows needs.
GREEDY = 0  # argmax (temperature 0, and every echo row)
SAMPLE = 1  # + temperature and Gumbel noise
FILTER = 2  # + top-k / top-p (a sort over the vocabulary)
KINDS = (GREEDY, SAMPLE, FILTER)

MIN_CTX_BUCKET = 64  # smallest attended-context bucket; below it the saving is noise


@dataclass(frozen=True)
class SlotParams:
    echo: bool = True  # steer greedy output to reproduce the prompt, then EOS
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0

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


class CachedLM(Protocol):
    """A model with a static KV cache, as ``ModelRunner`` drives it: ``minercore.model.SimulatedLM`` (GPT-2) and
    ``minercore.llama.LlamaLM`` (the Llama family). An ``nn.Module`` (the runner moves and casts it)."""

    config: Any  # has vocab_size
    max_positions: int

    def describe(self) -> str: ...

    def setup_caches(self, max_batch: int, max_context: int) -> int:
        """Allocate caches for ``max_batch`` rows of ``max_context`` positions; returns KV bytes per slot."""
        ...

    def forward(self, idx: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, V) logits, no cache (the reference)."""
        ...

    def prefill(self, idx: Tensor, slots: int | Tensor, start: int = 0, last: Tensor | None = None) -> Tensor:
        """(B, T) right-padded prompt chunks at positions [start, start + T) -> (B, V) logits at each row's
        ``last`` index (default T - 1); their keys/values land in cache rows ``slots``."""
        ...

    def decode(self, tokens: Tensor, pos: Tensor, ctx: int) -> Tensor:
        """(b,) tokens at (b,) positions -> (b, V) logits over cache rows [0, b), positions [0, ctx)."""
        ...


class ContextOverflow(ValueError):
    """The prompt plus at least one new token does not fit the runner's ``max_context``."""


class Runner(Protocol):
    """What the engine drives, from one thread (its model thread; call warmup there too: CUDA graph trees
    are per thread, and a compiled CUDA runner re-warms on the first decode from another thread). Slots are
    ints in [0, max_batch), allocated lowest first so the batch bucket stays small."""

    max_batch: int
    max_context: int
    vocab_size: int
    eos_id: int
    device: torch.device
    dtype: torch.dtype
    compiled: bool
    description: str
    kv_cache_bytes_per_slot: int  # K and V bytes one slot holds at max_context

    def warmup(self) -> float:
        """Compile / warm every shape serving uses; returns (and logs) the seconds it took."""
        ...

    def prefill(self, slot: int, prompt_ids: Sequence[int], params: SlotParams) -> int:
        """Run the prompt into ``slot``'s cache; return the first new id (one host sync). ValueError for an
        empty prompt, a bad slot or ids outside the vocabulary; ContextOverflow if len >= max_context."""
        ...

    # Optional (ModelRunner has them; the engine falls back to ``prefill`` without them):
    # prefill_batch(slots, prompts, params) -> first ids, whole prompts in one forward, and
    # prefill_chunk(slot, prompt_ids, params, start, end) -> first id or None, a prompt in pieces.

    def decode(self, slots: np.ndarray) -> np.ndarray:
        """One step for the given prefilled slots (int64, any order): each slot's last id in, its next id
        out (int64, aligned with ``slots``). One host sync. The caller bounds max_new_tokens by
        max_context - prompt_len; past that, ContextOverflow."""
        ...

    def release(self, slot: int) -> None:
        """The slot is free; the next prefill overwrites its cache."""
        ...


def pow2_bucket(n: int, floor: int, cap: int) -> int:
    """The smallest power of two >= max(n, floor), capped at ``cap``."""
    return min(cap, 1 << (max(n, floor) - 1).bit_length())


def pow2_buckets(floor: int, cap: int) -> list[int]:
    """Every value ``pow2_bucket`` can return for n in [1, cap]."""
    buckets = [min(floor, cap)]
    while buckets[-1] < cap:
        buckets.append(min(cap, buckets[-1] * 2))
    return buckets


# ---- sampling (shared with hf_runner) ----

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


# ---- the native runner ----

class SlotState(nn.Module):
    """Per-slot decode state, on the device, indexed by slot."""

    def __init__(self, max_batch: int, max_context: int, device: torch.device) -> None:
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


def check_room(positions: np.ndarray, slots: np.ndarray, max_context: int) -> None:
    """ContextOverflow if a slot's next fed token would sit at or past ``max_context`` (a caller bug: it
    must bound max_new_tokens by max_context - prompt_len)."""
    full = slots[positions[slots] >= max_context]
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
    index = torch.minimum((pos - prompt_len + 1).clamp(min=0), prompt_len)
    target = state.targets[rows].gather(1, index[:, None])[:, 0]
    return choose_tokens(logits, pos, state.echo[rows], target, state.temperature[rows], state.top_k[rows],
                         state.top_p[rows], state.seed[rows], kind)


def _decode_step(model: CachedLM, state: SlotState, b: int, ctx: int, kind: int) -> Tensor:
    """Rows [0, b) fed their last token, attending over positions [0, ctx); returns (b,) next ids."""
    # Rows outside the step (free, or live but not in this step) still compute; clamping keeps a stale
    # position inside the tables. Their cache write lands where their own next real token will overwrite it.
    pos = state.pos[:b].clamp(max=state.targets.shape[1] - 1)
    logits = model.decode(state.tokens[:b], pos, ctx).float()
    return slot_tokens(logits, state, slice(0, b), pos, kind)


def _greedy_step(model: CachedLM, state: SlotState, b: int, ctx: int) -> Tensor:
    return _decode_step(model, state, b, ctx, GREEDY)


def _sample_step(model: CachedLM, state: SlotState, b: int, ctx: int) -> Tensor:
    return _decode_step(model, state, b, ctx, SAMPLE)


def _filter_step(model: CachedLM, state: SlotState, b: int, ctx: int) -> Tensor:
    return _decode_step(model, state, b, ctx, FILTER)


_STEPS = (_greedy_step, _sample_step, _filter_step)  # indexed by kind


def _compile_steps(device: torch.device) -> tuple:
    """The decode steps, compiled: the only torch.compile in minercore's native path.

    ``dynamic=True``: one graph covers the batch and context buckets instead of one inductor compile per
    pair; dynamo still specialises batch 1, so two graphs per sampling kind, both compiled by ``warmup``
    (the cache's spare position keeps the full-context bucket in the dynamic graph). One function per kind
    gives each its own dynamo cache and recompile limit. That cache is per function, not per runner, and
    cache shapes are static: each further runner configuration (max_batch, max_context, dtype, model) in
    the same process adds two graphs per kind, so past four of them dynamo's default limit of 8 sends the
    step back to eager, with a warning. On CUDA, reduce-overhead records a CUDA graph per distinct shape;
    the caller clones the output before the next replay.
    """
    mode = "reduce-overhead" if device.type == "cuda" else None
    return tuple(torch.compile(step, fullgraph=True, dynamic=True, mode=mode) for step in _STEPS)


class ModelRunner:
    """A ``CachedLM`` (GPT-2 or a Llama-family model, random or real weights) with its static KV cache: the
    ``Runner`` the engine drives for ``backend="native"``. One decode loop for every architecture."""

    backend = "native"

    def __init__(self, model: CachedLM, *, max_batch: int, max_context: int, eos_id: int,
                 device: torch.device, dtype: torch.dtype, compile: bool, kinds: Sequence[int] = KINDS,
                 name: str = "custom") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {max_context}")
        if not 0 <= eos_id < model.config.vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary (size {model.config.vocab_size})")
        self.max_batch = max_batch
        self.max_context = max_context
        self.vocab_size = model.config.vocab_size
        self.eos_id = eos_id
        self.device = device
        self.dtype = dtype
        self.compiled = compile
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.kv_cache_bytes_per_slot = self.model.setup_caches(max_batch, max_context)
        self.state = SlotState(max_batch, max_context, device)
        self._kinds = tuple(kinds)  # the sampling kinds warmup prepares
        self._cuda_graphs = compile and device.type == "cuda"
        if self._cuda_graphs:
            # Static addresses: CUDA graphs read the cache and slot state in place instead of copying them in.
            for tensor in [*self.model.buffers(), *self.state.buffers()]:
                torch._dynamo.mark_static_address(tensor)
        self._steps = _compile_steps(device) if compile else _STEPS
        # Host mirrors, so bucketing and validation never read the device.
        self._pos = np.zeros(max_batch, dtype=np.int64)
        self._live = np.zeros(max_batch, dtype=bool)
        self._kind = np.zeros(max_batch, dtype=np.int8)
        self._active = np.zeros(max_batch, dtype=bool)
        self._graph_thread: int | None = None  # the thread whose CUDA graph tree holds the warmed graphs
        self.description = (f"native {name} [{model.describe()}], max_batch {max_batch}, "
                            f"max_context {max_context}, {device}, {dtype_name(dtype)}, "
                            f"{'compiled' if compile else 'eager'}")

    # -- Runner API --

    @torch.inference_mode()
    def warmup(self) -> float:
        """Run every step shape serving can use (every batch x context bucket and sampling kind on CUDA
        graphs; one per compiled specialisation otherwise) with no row active, so no slot state changes."""
        started = time.perf_counter()
        self._graph_thread = threading.get_ident()
        self._set_active(np.zeros(self.max_batch, dtype=bool))
        if self._cuda_graphs:
            shapes = [(b, c) for b in pow2_buckets(1, self.max_batch)
                      for c in pow2_buckets(MIN_CTX_BUCKET, self.max_context)]
        else:
            # The compiled specialisations (see _compile_steps), and both context extremes in case this
            # torch version specialises more; eager just touches its kernels.
            shapes = sorted({(b, c) for b in (1, min(2, self.max_batch))
                             for c in (min(MIN_CTX_BUCKET, self.max_context), self.max_context)})
        # CUDA graph trees record a shape on its second call (the first is their own warm-up run).
        for _ in range(2 if self._cuda_graphs else 1):
            for kind in self._kinds:
                for b, ctx in shapes:
                    self._run_step(b, ctx, kind)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        logger.info("warmup: %d step shapes x %d sampling kinds in %.1f s (%s)", len(shapes), len(self._kinds),
                    seconds, self.description)
        return seconds

    def prefill(self, slot: int, prompt_ids: Sequence[int], params: SlotParams) -> int:
        return self.prefill_batch([slot], [prompt_ids], [params])[0]

    @torch.inference_mode()
    def prefill_batch(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                      params: Sequence[SlotParams]) -> list[int]:
        """Whole prompts into their slots in one forward, right-padded to the longest; the first new id of each
        (one host sync). Errors as ``prefill``; nothing is written unless every request is valid."""
        if not len(slots) == len(prompts) == len(params) or not slots:
            raise ValueError("prefill_batch needs one prompt and one SlotParams per slot, and at least one slot")
        for slot, p in zip(slots, params, strict=True):
            check_slot(slot, self.max_batch)
            p.validate()
        if len(set(slots)) != len(slots):
            raise ValueError(f"prefill_batch: duplicate slots in {list(slots)}")
        ids = [check_prompt(prompt, self.max_context, self.vocab_size) for prompt in prompts]
        lengths = [len(i) for i in ids]
        padded = torch.zeros((len(ids), max(lengths)), dtype=torch.int64)
        for row, prompt in enumerate(ids):
            padded[row, :len(prompt)] = prompt
            self.state.start(slots[row], prompt.to(self.device), params[row], self.eos_id)
        rows = torch.tensor(list(slots), dtype=torch.int64, device=self.device)
        last = torch.tensor(lengths, dtype=torch.int64, device=self.device) - 1
        logits = self.model.prefill(padded.to(self.device), rows, 0, last).float()
        return self._first_tokens(list(slots), rows, logits, last, lengths, params)

    @torch.inference_mode()
    def prefill_chunk(self, slot: int, prompt_ids: Sequence[int], params: SlotParams, start: int,
                      end: int) -> int | None:
        """Prompt positions [start, end) into ``slot``'s cache, after [0, start) (chunked prefill: callers go in
        order from 0). Returns None until ``end`` reaches the prompt's end, then its first new id."""
        check_slot(slot, self.max_batch)
        ids = check_prompt(prompt_ids, self.max_context, self.vocab_size)
        if not 0 <= start < end <= len(ids):
            raise ValueError(f"prefill_chunk: need 0 <= start < end <= {len(ids)}, got {start}, {end}")
        if start == 0:
            params.validate()
            self._live[slot] = False
            self.state.start(slot, ids.to(self.device), params, self.eos_id)
        logits = self.model.prefill(ids[None, start:end].to(self.device), slot, start).float()
        if end < len(ids):
            return None
        rows = torch.tensor([slot], dtype=torch.int64, device=self.device)
        last = torch.full((1,), end - 1, dtype=torch.int64, device=self.device)
        return self._first_tokens([slot], rows, logits, last, [end], [params])[0]

    def _first_tokens(self, slots: list[int], rows: Tensor, logits: Tensor, last: Tensor, lengths: list[int],
                      params: Sequence[SlotParams]) -> list[int]:
        """Choose each prefilled slot's first id from its last prompt position's logits; the slots go live."""
        kinds = [p.kind() for p in params]
        token = slot_tokens(logits, self.state, rows, last, max(kinds))
        self.state.tokens[rows] = token
        self._pos[slots] = lengths
        self._live[slots] = True
        self._kind[slots] = kinds
        return token.tolist()

    @torch.inference_mode()
    def decode(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return np.empty(0, dtype=np.int64)
        if self._cuda_graphs and self._graph_thread != threading.get_ident():
            # CUDA graph trees are per thread: graphs warmed on another thread would be recorded again,
            # one shape at a time, in the middle of serving. Record them all now instead.
            logger.warning("decode on a thread other than warmup's; warming CUDA graphs again on this one")
            self.warmup()
        if slots.min() < 0 or slots.max() >= self.max_batch or not self._live[slots].all():
            raise ValueError(f"decode: every slot must be prefilled and in [0, {self.max_batch}); got {slots}")
        active = np.zeros(self.max_batch, dtype=bool)
        active[slots] = True
        if active.sum() != slots.size:
            raise ValueError(f"decode: duplicate slots in {slots}")
        check_room(self._pos, slots, self.max_context)
        if not np.array_equal(active, self._active):
            self._set_active(active)  # a host-to-device copy only when the set of streams changes
        b = pow2_bucket(int(slots.max()) + 1, 1, self.max_batch)
        ctx = pow2_bucket(int(self._pos[slots].max()) + 1, MIN_CTX_BUCKET, self.max_context)
        ids = self._run_step(b, ctx, int(self._kind[slots].max()))
        self._pos[slots] += 1
        return ids.cpu().numpy()[slots]  # the step's one host sync

    def release(self, slot: int) -> None:
        check_slot(slot, self.max_batch)
        self._live[slot] = False

    # -- internals --

    def _run_step(self, b: int, ctx: int, kind: int) -> Tensor:
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        ids = self._steps[kind](self.model, self.state, b, ctx)
        if self._cuda_graphs:
            ids = ids.clone()  # the graph's output buffer is overwritten by the next replay
        # Advance only the rows in this step, in place on the device (outside the graph, no host sync).
        s = self.state
        active = s.active[:b]
        s.tokens[:b] = torch.where(active, ids, s.tokens[:b])
        s.pos[:b] += active
        return ids

    def _set_active(self, active: np.ndarray) -> None:
        self._active = active
        self.state.active.copy_(torch.from_numpy(active))


def _fold_seed(seed: int) -> int:
    # Any Python int to the 32 bits the noise hash takes; negative seeds and the high half of 64-bit seeds
    # still change the result.
    seed &= (1 << 64) - 1
    return (seed ^ (seed >> 32)) & _M32


# ---- construction ----

# compile=auto on CPU: compiled. benchmarks/bench_decode.py (tiny preset, 2 cores, 128-token echo prompts,
# median): 880 -> 1,020 tok/s with 1 stream and 3,430 -> 3,830 tok/s with 8, eager -> compiled. Sampling
# gains more (8 streams at temperature 0.8: 1,500 -> 2,800 tok/s, the noise hash fuses into one loop). The
# price is warmup: two graphs per sampling kind; echo ~8 s with a warm inductor cache, ~20 s cold; generate
# (three kinds) ~30 s more.
CPU_AUTO_COMPILE = True


def _resolve_compile(option: str, device: torch.device) -> bool:
    if option == "on":
        return True
    if option == "off":
        return False
    if option != "auto":
        raise ValueError(f"compile must be auto, on or off, got {option!r}")
    return device.type == "cuda" or (device.type == "cpu" and CPU_AUTO_COMPILE)


def _sampling_kinds(mode: str) -> tuple[int, ...]:
    if mode == "echo":
        return (GREEDY,)
    if mode == "generate":
        return KINDS
    raise ValueError(f"mode must be echo or generate, got {mode!r}")


def _native_model(options: ModelOptions, device: torch.device, dtype: torch.dtype) -> tuple[CachedLM, str]:
    """The model ``options`` name: a checkpoint directory (``path``: GPT-2 or the Llama family; ``weights``:
    GPT-2), else a random-weight preset."""
    if options.path:
        if checkpoint_family(options.path) == "gpt2":
            return load_gpt2(options.path), options.path
        try:
            config = LlamaConfig.from_hf(read_config(options.path))
        except ValueError as exc:
            raise ValueError(f"{options.path}: {exc}; backend hf serves it through transformers") from exc
        return load_llama(options.path, device=device, dtype=dtype, config=config), options.path
    if options.weights:
        return load_gpt2(options.weights), options.weights
    name = f"{options.preset} (seed {options.seed})"
    if options.preset in LLAMA_PRESETS:
        # Drawn on the device in the serving dtype: an 8B shape never exists in float32 on the host.
        return LlamaLM.random(LLAMA_PRESETS[options.preset], options.seed, device, dtype), name
    if options.preset in PRESETS:
        return SimulatedLM.random(PRESETS[options.preset], seed=options.seed), name
    raise ValueError(f"unknown preset {options.preset!r}; expected one of {', '.join([*PRESETS, *LLAMA_PRESETS])}")


def build_model_runner(options: ModelOptions, *, max_batch: int, eos_id: int) -> ModelRunner:
    device, dtype = select(options.device, options.dtype)
    model, name = _native_model(options, device, dtype)
    max_context = context_for(options.max_context, model.max_positions)
    return ModelRunner(model, max_batch=max_batch, max_context=max_context, eos_id=eos_id,
                       device=device, dtype=dtype, compile=_resolve_compile(options.compile, device),
                       kinds=_sampling_kinds(options.mode), name=name)


NATIVE_BACKENDS = ("native", "simulated")  # simulated: the name before the Llama family joined


def native_serves(path: str) -> bool:
    """Whether the checkpoint directory's ``model_type`` has a native implementation."""
    return checkpoint_family(path) in ("gpt2", *LLAMA_FAMILIES)


def build_runner(options: ModelOptions, *, max_batch: int, eos_id: int) -> Runner:
    """The runner for ``options.backend``: ``native`` (alias ``simulated``: GPT-2 and the Llama family, compiled,
    one batched decode loop) or ``hf`` (any causal LM directory, eager). A native ``path`` of an architecture
    without a native implementation goes to hf, with a log line."""
    backend = options.backend
    if backend in NATIVE_BACKENDS and options.path and not native_serves(options.path):
        logger.warning("%s: model_type %r has no native implementation (native serves gpt2, %s); using the hf "
                       "backend (eager, one forward per stream per step)", options.path,
                       checkpoint_family(options.path), ", ".join(LLAMA_FAMILIES))
        backend = "hf"
    if backend in NATIVE_BACKENDS:
        return build_model_runner(options, max_batch=max_batch, eos_id=eos_id)
    if backend == "hf":
        from .hf_runner import HFRunner

        return HFRunner.from_options(options, max_batch=max_batch, eos_id=eos_id)
    raise ValueError(f"backend must be native (or simulated) or hf, got {options.backend!r}")
