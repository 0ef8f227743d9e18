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

import numpy as np
import torch
from torch import Tensor

from .config import ModelOptions, context_for
from .device import dtype_name, select
from .model import PRESETS, SimulatedLM, describe, load_gpt2
from .sampling import (
    FILTER,
    GREEDY,
    KINDS,
    SAMPLE,
    SlotParams,
    SlotState,
    check_room,
    check_slot,
    prefill_slot,
    slot_tokens,
)

logger = logging.getLogger("minercore.runner")

MIN_CTX_BUCKET = 64  # smallest attended-context bucket; below it the saving is noise


def pow2_bucket(n: int, floor: int, cap: int) -> int:
    """The smallest power of two >= max(n, floor), capped at ``cap``."""
    return min(cap, 1 << (max(n, floor) - 1).bit_length())


def pow2_buckets(floor: int, cap: int) -> list[int]:
    """Every value ``pow2_bucket`` can return for n in [1, cap]."""
    buckets = [min(floor, cap)]
    while buckets[-1] < cap:
        buckets.append(min(cap, buckets[-1] * 2))
    return buckets


# ---- the simulated model's runner ----

def _decode_step(model: SimulatedLM, state: SlotState, b: int, ctx: int, kind: int) -> Tensor:
    """Rows [0, b) fed their last token, attending over positions [0, ctx); returns (b,) next ids."""
    # Rows outside the step (free, or live but not in this step) still compute; clamping keeps a stale
    # position inside the tables. Their cache write lands where their own next real token will overwrite it.
    pos = state.pos[:b].clamp(max=state.targets.shape[1] - 1)
    logits = model.decode(state.tokens[:b], pos, ctx).float()
    return slot_tokens(logits, state, slice(0, b), pos, kind)


def _greedy_step(model: SimulatedLM, state: SlotState, b: int, ctx: int) -> Tensor:
    return _decode_step(model, state, b, ctx, GREEDY)


def _sample_step(model: SimulatedLM, state: SlotState, b: int, ctx: int) -> Tensor:
    return _decode_step(model, state, b, ctx, SAMPLE)


def _filter_step(model: SimulatedLM, state: SlotState, b: int, ctx: int) -> Tensor:
    return _decode_step(model, state, b, ctx, FILTER)


_STEPS = (_greedy_step, _sample_step, _filter_step)  # indexed by kind


def _compile_steps(device: torch.device) -> tuple:
    """The decode steps, compiled: the only torch.compile in minercore's simulated path.

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
    """A SimulatedLM (random or real GPT-2 weights) with its static KV cache: the ``Runner`` the engine drives
    for ``backend="simulated"``."""

    def __init__(self, model: SimulatedLM, *, max_batch: int, max_context: int, eos_id: int,
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
        self.description = (f"simulated {name} [{describe(model.config)}], max_batch {max_batch}, "
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


def build_model_runner(options: ModelOptions, *, max_batch: int, eos_id: int) -> ModelRunner:
    device, dtype = select(options.device, options.dtype)
    if options.weights:
        model = load_gpt2(options.weights)
        name = options.weights
    else:
        model = SimulatedLM.random(PRESETS[options.preset], seed=options.seed)
        name = f"{options.preset} (seed {options.seed})"
    max_context = context_for(options.max_context, model.config.n_positions)
    return ModelRunner(model, max_batch=max_batch, max_context=max_context, eos_id=eos_id,
                       device=device, dtype=dtype, compile=_resolve_compile(options.compile, device),
                       kinds=_sampling_kinds(options.mode), name=name)
