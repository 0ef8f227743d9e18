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
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .config import ModelOptions, context_for
from .device import dtype_name, select
from .llama import PRESETS as LLAMA_PRESETS
from .llama import LlamaConfig, LlamaLM, load_llama, read_config
from .model import PRESETS, SimulatedLM, load_gpt2
from .sampling import (
    FILTER,
    GREEDY,
    KINDS,
    SAMPLE,
    SlotParams,
    SlotState,
    check_prompt,
    check_room,
    check_slot,
    prefill_slot,
    slot_tokens,
)

logger = logging.getLogger("minercore.runner")

MIN_CTX_BUCKET = 64  # smallest attended-context bucket; below it the saving is noise


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


def pow2_bucket(n: int, floor: int, cap: int) -> int:
    """The smallest power of two >= max(n, floor), capped at ``cap``."""
    return min(cap, 1 << (max(n, floor) - 1).bit_length())


def pow2_buckets(floor: int, cap: int) -> list[int]:
    """Every value ``pow2_bucket`` can return for n in [1, cap]."""
    buckets = [min(floor, cap)]
    while buckets[-1] < cap:
        buckets.append(min(cap, buckets[-1] * 2))
    return buckets


# ---- the native runner ----

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
        # Prompt tokens one batched prefill may hold (the engine groups prompts up to it): past about this many,
        # a forward is compute-bound, so batching more only delays the first prompts' first tokens. On a CPU
        # one 256-token prompt already is (benchmarks/bench_prefill.py: batched median TTFT 640 ms against 436
        # ms one prompt at a time); a GPU has room for thousands.
        self.prefill_batch_tokens = 2048 if device.type == "cuda" else 256
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

    @torch.inference_mode()
    def prefill(self, slot: int, prompt_ids: Sequence[int], params: SlotParams) -> int:
        first = prefill_slot(self.state, slot, prompt_ids, params, vocab_size=self.vocab_size, eos_id=self.eos_id,
                             last_logits=lambda ids: self.model.prefill(ids[None], slot).float())
        self._pos[slot] = len(prompt_ids)
        self._live[slot] = True
        self._kind[slot] = params.kind()
        return first

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


# ---- construction ----

# compile=auto on CPU: compiled. benchmarks/bench_decode.py (tiny preset, 2 cores, 128-token echo prompts,
# median): 880 -> 1,020 tok/s with 1 stream and 3,430 -> 3,830 tok/s with 8, eager -> compiled. Sampling
# gains more (8 streams at temperature 0.8: 1,500 -> 2,800 tok/s, the noise hash fuses into one loop). The
# price is warmup: two graphs per sampling kind; echo ~8 s with a warm inductor cache, ~20 s cold; generate
# (three kinds) ~30 s more.
CPU_AUTO_COMPILE = True


def _resolve_compile(option: str, device: torch.device) -> bool:
    """``option`` is one of config.COMPILE_CHOICES (ModelOptions checks it)."""
    if option != "auto":
        return option == "on"
    return device.type == "cuda" or (device.type == "cpu" and CPU_AUTO_COMPILE)


def _sampling_kinds(mode: str) -> tuple[int, ...]:
    """The sampling kinds warmup prepares: echo rows are always greedy."""
    return (GREEDY,) if mode == "echo" else KINDS


def _native_model(options: ModelOptions, device: torch.device, dtype: torch.dtype) -> tuple[CachedLM, str]:
    """The model ``options`` name: a checkpoint directory (``path``: GPT-2 or the Llama family; ``weights``:
    GPT-2), else a random-weight preset."""
    if options.path:
        raw = read_config(options.path)
        if raw.get("model_type") == "gpt2":
            return load_gpt2(options.path), options.path
        try:
            config = LlamaConfig.from_hf(raw)
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
