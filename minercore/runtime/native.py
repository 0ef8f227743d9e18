"""The decode loop the engine drives: prefill slots (batched, or a long prompt in chunks), then one step for
every active slot at a time.

State lives on the device in fixed-size per-slot buffers (last token, position, sampling parameters, echo
targets) next to the model's static KV cache, so a step needs no host-to-device copy and exactly one host
sync (reading the sampled ids). The step runs over a prefix of the cache rows (the batch bucket) and, with
bucketed attention, a prefix of the positions (the context bucket), both powers of two, so a few short streams
do not pay for ``max_batch`` x ``max_context``. A slot's state lives in a row of the runner's choosing: with the
paged cache the live rows stay packed as streams end, so the bucket follows the number of streams. The step
functions and their compilation (the one place torch.compile is applied) are ``decode_steps``'s.

A step is split in two so the host can work while the device runs: ``launch`` queues it (on CUDA it returns
before the device is done; the sampled ids travel to pinned host memory on a side stream) and ``collect`` waits
for its ids. How a step reaches the device is the ``graphs`` choice:

- ``torch``: torch.compile with ``dynamic=True``; on CUDA ``mode="reduce-overhead"`` (inductor's CUDA-graph
  trees record a graph per shape, and dynamo checks its guards before every replay);
- ``manual``: a static-buffer step (the fed tokens, positions and sampled ids live in fixed device buffers and
  are advanced inside the step), compiled with ``dynamic=False`` and no CUDA graphs; on CUDA, warmup captures
  it once per (batch bucket, context bucket, sampling kind) into ``torch.cuda.CUDAGraph`` objects sharing one
  memory pool, and a step is one ``graph.replay()`` with nothing in between (as SGLang and vLLM do);
- ``off``: no CUDA graphs (the compiled or eager step is launched kernel by kernel).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..contract.config import ATTENTION_CHOICES, GRAPH_CHOICES
from ..kv.paged import PagedKVCache, PagedSpec
from ..models.base import CachedLM
from ..models.quant import describe as describe_quant
from .cuda_graphs import CapturedGraphs
from .decode_steps import (
    STATIC_STEPS,
    STEPS,
    VERIFY_STEPS,
    compile_block_steps,
    compile_steps,
    compile_verify_steps,
    make_room_for,
    raise_recompile_limit,
)
from .device import auto_kv_pool_bytes, dtype_name, tensor_bytes
from .protocol import Launched
from .sampling import (
    KIND_NAMES,
    KINDS,
    ContextOverflow,
    SlotParams,
    SlotState,
    check_room,
    check_slot,
    checked_prompt,
    first_tokens,
)

logger = logging.getLogger(__name__)

MIN_CTX_BUCKET = 64  # smallest attended-context bucket; below it the saving is noise

GRAPH_MODES = tuple(c for c in GRAPH_CHOICES if c != "auto")  # torch | manual | off, as the module doc says
# bucketed: attend over the smallest power-of-two prefix of the cache holding every row's position (a shape per
# bucket); masked: always over the whole max_context, masked per row (one shape per batch bucket); flex:
# FlexAttention over the whole max_context, each row reading only the key blocks up to its own position (one
# shape per batch bucket, the cost of each row's own length).
ATTENTION_MODES = tuple(c for c in ATTENTION_CHOICES if c != "auto")


MIN_VERIFY_WIDTH = 2  # drafts a verify step computes at least (see ModelRunner.verify)


def pow2_bucket(n: int, floor: int, cap: int) -> int:
    """The smallest power of two >= max(n, floor), capped at ``cap``."""
    return min(cap, 1 << (max(n, floor) - 1).bit_length())


def pow2_buckets(floor: int, cap: int) -> list[int]:
    """Every value ``pow2_bucket`` can return for n in [1, cap]."""
    buckets = [min(floor, cap)]
    while buckets[-1] < cap:
        buckets.append(min(cap, buckets[-1] * 2))
    return buckets


class _HostCopy:
    """Sampled ids from the device to the host without stalling the next launch.

    CUDA: the copy runs on a side stream into one of two pinned buffers (one step is collected while the next
    is in flight) and records an event that ``collect`` waits on; before the next step may overwrite the ids
    it copies from, the compute stream waits (on the device, not the host) for that copy. CPU: a plain copy,
    done when ``start`` returns."""

    def __init__(self, max_batch: int, device: torch.device) -> None:
        self._device = device
        self._cuda = device.type == "cuda"
        self._buffers = [torch.zeros(max_batch, dtype=torch.int64, pin_memory=self._cuda) for _ in range(2)]
        self._turn = 0
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._last_copy: Any = None

    def before_step(self) -> None:
        if self._last_copy is not None:
            torch.cuda.current_stream(self._device).wait_event(self._last_copy)

    def start(self, ids: Tensor) -> tuple[Tensor, Any]:
        host = self._buffers[self._turn][:ids.shape[0]]
        self._turn ^= 1
        if not self._cuda:
            host.copy_(ids)
            return host, None
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            host.copy_(ids, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self._last_copy = done
        return host, done


class ModelRunner:
    """A ``CachedLM`` (GPT-2 or a Llama-family model, random or real weights) with its static KV cache: the
    ``Runner`` the engine drives for ``backend="native"``. One decode loop for every architecture.

    ``graphs`` and ``attention`` are described in the module docstring; ``batch_buckets`` are the batch sizes
    a step runs at (a step pads to the smallest one that holds its highest live row; default: powers of two up
    to ``max_batch``); a benchmark that only needs a few sizes saves their compiles and captures.
    ``speculative_tokens`` > 0 adds ``verify`` steps of that many drafts, compiled where ``compile_verify`` says
    (default: with ``compile``, on CUDA only). ``compile_blocks`` compiles the forwards, with one nested block
    region, and the samplers instead of whole steps (``decode_steps.compile_block_steps``; with ``graphs="off"``
    only). ``kv_block_size`` > 0 keeps
    the keys and values in a paged pool of blocks that size (``kv.paged``) holding ``kv_cache_bytes`` (0:
    ``device.auto_kv_pool_bytes`` with ``kv_memory_fraction``), whose blocks a slot uses only once
    ``assign_blocks`` names them (the engine's ``KVCacheManager`` decides which)."""

    kind = "native"  # the model.backend value this runner serves

    def __init__(self, model: CachedLM, *, max_batch: int, max_context: int, eos_id: int,
                 device: torch.device, dtype: torch.dtype, compile: bool, kinds: Sequence[int] = KINDS,
                 name: str = "custom", graphs: str = "off", attention: str = "bucketed",
                 batch_buckets: Sequence[int] | None = None, stop_ids: Sequence[int] = (),
                 speculative_tokens: int = 0, compile_verify: bool | None = None,
                 compile_blocks: bool = False, kv_block_size: int = 0,
                 kv_cache_bytes: int = 0, kv_memory_fraction: float = 0.9) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {max_context}")
        if not 0 <= eos_id < model.config.vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary (size {model.config.vocab_size})")
        if graphs not in GRAPH_MODES:
            raise ValueError(f"graphs must be one of {', '.join(GRAPH_MODES)}, got {graphs!r}")
        if graphs == "torch" and not compile:
            raise ValueError("graphs=torch records torch.compile's CUDA graphs: it needs compile on")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        if speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0 (0: no verify steps), got {speculative_tokens}")
        if kv_block_size < 0 or kv_cache_bytes < 0:
            raise ValueError(f"kv_block_size and kv_cache_bytes must be >= 0, got {kv_block_size}, {kv_cache_bytes}")
        if not 0 < kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {kv_memory_fraction}")
        buckets = sorted(set(batch_buckets or pow2_buckets(1, max_batch)))
        if buckets[0] < 1 or buckets[-1] != max_batch:
            raise ValueError(f"batch_buckets must be >= 1 and end at max_batch {max_batch}, got {batch_buckets}")
        self.max_batch = max_batch
        self.max_context = max_context
        self.vocab_size = model.config.vocab_size
        self.eos_id = eos_id
        self.device = device
        self.dtype = dtype
        self.compiled = compile
        self.graphs = graphs
        self.attention = attention
        self.batch_buckets = tuple(buckets)
        if attention == "flex":
            if not hasattr(model, "flex_attention"):
                raise ValueError(f"attention=flex: {type(model).__name__} has no FlexAttention decode")
            model.flex_attention = True
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.weights_bytes = tensor_bytes(self.model)  # before setup_caches adds the cache's buffers
        self.kv_paged = (self._paged_spec(kv_block_size, kv_cache_bytes, kv_memory_fraction) if kv_block_size
                         else None)
        self.kv_cache_bytes_per_slot = self.model.setup_caches(
            max_batch, max_context, *([self.kv_paged.layer_cache] if self.kv_paged else []))
        self.kv_bytes = self.kv_pool_bytes if self.kv_paged else self.kv_cache_bytes_per_slot * max_batch
        self._paged_layers = [m for m in self.model.modules() if isinstance(m, PagedKVCache)]
        self.state = SlotState(max_batch, max_context, device, stop_ids or (eos_id,))
        self._kinds = tuple(kinds)  # the sampling kinds warmup prepares
        self._tree_graphs = compile and graphs == "torch" and device.type == "cuda"
        self._manual = graphs == "manual"
        self._captured = CapturedGraphs()  # graphs=manual on CUDA
        self._sampled = torch.zeros(max_batch, dtype=torch.int64, device=device)  # the static steps' output
        if self._tree_graphs:
            # Static addresses: CUDA graphs read the cache and slot state in place instead of copying them in.
            for tensor in [*self.model.buffers(), *self.state.buffers(),
                           *([self.kv_paged.table] if self.kv_paged else [])]:
                torch._dynamo.mark_static_address(tensor)
        # Compiling one block and the samplers instead of whole steps (decode_steps) starts in a fraction of the
        # time; hand-captured CUDA graphs replay whole static steps, so they never do.
        if compile_blocks and graphs != "off":
            raise ValueError(f"compiled blocks go with graphs=off: CUDA graphs ({graphs}) replay whole steps")
        self.compiled_blocks = compile and compile_blocks
        if compile:
            # A static compile adds a graph per step shape; a dynamic one at most its batch-1 and context-extreme
            # specialisations (see warmup), and compiled blocks as many again for the verify forward.
            self._recompile_limit = make_room_for(
                len(self.batch_buckets) * len(self.context_buckets) if self._manual else 8)
            if self.compiled_blocks:
                self._steps, block_verify_steps = compile_block_steps(self.model, self._recompile_limit)
            else:
                self._steps = compile_steps(device, graphs, self._recompile_limit)
        else:
            self._steps = STATIC_STEPS if self._manual else STEPS
        # On a CPU the verify steps' glue and sampling run eagerly (with compiled blocks, their forward is
        # compiled): compiling their three kinds whole multiplies the warm-up. On CUDA a step's launches
        # dominate: compiled whole.
        self._compiled_verify = compile and (device.type == "cuda" if compile_verify is None else compile_verify)
        if self._compiled_verify:
            self._verify_steps = compile_verify_steps(self._recompile_limit)
        else:
            self._verify_steps = block_verify_steps if self.compiled_blocks else VERIFY_STEPS
        # Drafts a verify step checks per row at most (0: the runner only decodes); each step computes the draft
        # width it is given (at least MIN_VERIFY_WIDTH) plus one position per row.
        self.speculative_tokens = speculative_tokens
        self._draft_lengths = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self._copy = _HostCopy(max_batch, device)
        # Host mirrors, so bucketing and validation never read the device.
        self._pos = np.zeros(max_batch, dtype=np.int64)
        self._live = np.zeros(max_batch, dtype=bool)
        self._kind = np.zeros(max_batch, dtype=np.int8)
        self._active: np.ndarray | None = np.zeros(max_batch, dtype=bool)  # None: rewrite the device's at the next step
        # Slot -> row of the state and cache, and back. A stream takes the lowest free row (``_claim``); with the
        # paged cache the highest held row moves into a row a finished stream frees (``release``), so the live
        # rows stay packed and a step's batch bucket follows the number of streams, not the highest row still
        # live (streams that end at different times otherwise leave, say, 4 live in rows 1, 3, 5 and 7: 8 rows
        # computed where 4 would do). The host mirrors above and the device state are indexed by row.
        self._row_of = np.arange(max_batch)
        self._slot_of = np.arange(max_batch)
        self._claimed = np.zeros(max_batch, dtype=bool)  # rows a stream holds: blocks assigned or prefilled
        self._graph_thread: int | None = None  # the thread whose CUDA graph tree holds the warmed graphs
        # Prompt tokens one batched prefill may hold (the engine groups prompts up to it): past about this many,
        # a forward is compute-bound, so batching more only delays the first prompts' first tokens. On a CPU
        # one 256-token prompt already is (RESULTS.md, prefill); a GPU has room for thousands.
        self.prefill_batch_tokens = 2048 if device.type == "cuda" else 256
        # Positions one verify step may compute (rows x (drafts + 1)): the engine narrows the drafts as the batch
        # grows and decodes plainly past it. Every row of a verify step computes its full width, drafts or not;
        # on a CPU that is compute, and wide verify steps at 8 streams lost to plain decoding
        # (RESULTS.md, speculative). A GPU step is bound by reading the weights until far wider.
        self.verify_tokens = 1024 if device.type == "cuda" else 16
        # Drafts a verify step computes a row at least (narrower drafts are padded): the engine drafts that many.
        self.min_verify_width = MIN_VERIFY_WIDTH
        self.quantization = describe_quant(self.model)  # "none", or e.g. "int4 g32"
        self.description = (f"native {name} [{model.describe()}], max_batch {max_batch}, "
                            f"max_context {max_context}, {device}, {dtype_name(dtype)}, "
                            f"weights {self.quantization}, "
                            f"{'compiled blocks' if self.compiled_blocks else 'compiled' if compile else 'eager'}, "
                            f"graphs {graphs}, attention {attention}")
        if speculative_tokens:
            self.description += (f", speculative {speculative_tokens} "
                                 f"({'compiled' if self._compiled_verify or self.compiled_blocks else 'eager'} verify)")
        if self.kv_paged:
            self.description += (f", paged KV {self.kv_paged.num_blocks} blocks of {kv_block_size} "
                                 f"({self.kv_pool_bytes / 2**30:.2f} GiB)")

    def _paged_spec(self, block_size: int, pool_bytes: int, memory_fraction: float) -> PagedSpec:
        """The pool and block table: ``pool_bytes`` of blocks (0: ``auto_kv_pool_bytes``, at most the static
        cache's positions), at least one block besides the null block; a table row per slot covering every
        position the model asks for."""
        # Bytes a position costs over all layers: what a one-slot, two-position static cache holds, halved.
        per_position = self.model.setup_caches(1, 1) // 2
        positions = self.max_context + 1  # the models' spare position (see GPT2LM.setup_caches)
        if not pool_bytes:
            pool_bytes = auto_kv_pool_bytes(self.device, self.max_batch * positions * per_position, memory_fraction,
                                            positions * per_position)
        num_blocks = max(2, pool_bytes // (block_size * per_position) + 1)  # + the null block
        self.kv_bytes_per_position = per_position
        self.kv_pool_bytes = (num_blocks - 1) * block_size * per_position
        return PagedSpec.create(num_blocks, block_size, self.max_batch, -(-positions // block_size), self.device)

    def assign_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        """Point ``slot`` at its KV blocks (paged only): block i holds its positions [i * size, (i + 1) * size)."""
        check_slot(slot, self.max_batch)
        row = self._claim(slot) if len(blocks) else int(self._row_of[slot])
        self.kv_paged.set_blocks(row, blocks)

    @torch.inference_mode()
    def copy_block(self, src: int, dst: int) -> None:
        """Paged KV block ``dst`` of every layer made a copy of block ``src`` (a prefix-cache hit inside a block:
        the stream writes its own copy from the shared positions on), ordered before any later step."""
        if not self._paged_layers:
            raise ValueError("copy_block needs the paged KV cache")
        for cache in self._paged_layers:
            cache.copy_block(src, dst)

    @property
    def context_buckets(self) -> list[int]:
        """Every attended-context length a step can use."""
        if self.attention != "bucketed":
            return [self.max_context]
        return pow2_buckets(MIN_CTX_BUCKET, self.max_context)

    @property
    def captured_graphs(self) -> int:
        """CUDA graphs captured by hand (``graphs="manual"`` on CUDA)."""
        return len(self._captured)

    # -- Runner API --

    @torch.inference_mode()
    def warmup(self) -> float:
        """Run every step shape serving can use (every batch x context bucket and sampling kind where CUDA
        graphs are recorded or captured, or the compile is static; one per compiled specialisation
        otherwise) with no row active, so no slot state changes."""
        started = time.perf_counter()
        if self.compiled:
            raise_recompile_limit(self._recompile_limit)  # dynamo's config is per thread: set it where compiles run
        self._graph_thread = threading.get_ident()
        if self.device.type == "cuda":
            # Graph replays and stream waits use the calling thread's current device: make it this runner's.
            torch.cuda.set_device(self.device)
        self._set_active(np.zeros(self.max_batch, dtype=bool))
        if self._tree_graphs or self._manual:
            shapes = [(b, c) for b in self.batch_buckets for c in self.context_buckets]
        else:
            # The compiled specialisations (see decode_steps.compile_steps), and both context extremes in case this
            # torch version specialises more; eager just touches its kernels.
            shapes = self._specialisations()
        if self._manual and self.device.type == "cuda":
            self._captured.capture(self._steps, self.model, self.state, self._sampled, shapes, self._kinds,
                                   self.device)
        else:
            # CUDA graph trees record a shape on its second call (the first is their own warm-up run).
            for _ in range(2 if self._tree_graphs else 1):
                for kind in self._kinds:
                    for b, ctx in shapes:
                        self._run_step(b, ctx, kind)
                    self._log_progress(f"decode steps, sampling kind {KIND_NAMES[kind]}", started)
        if self.speculative_tokens:
            # Eager verify steps only touch their kernels, unless their forward is compiled (compiled blocks).
            compiled = self._compiled_verify or self.compiled_blocks
            shapes = self._specialisations() if compiled else self._specialisations()[:1]
            for kind in self._kinds:
                for b, ctx in shapes:
                    drafts = self._step_drafts(np.zeros((b, max(MIN_VERIFY_WIDTH, self.speculative_tokens)),
                                                        dtype=np.int64))
                    self._verify_steps[kind](self.model, self.state, drafts, self._draft_lengths[:b],
                                             b, ctx)
                self._log_progress(f"verify steps, sampling kind {KIND_NAMES[kind]}", started)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        logger.info("warmup: %d step shapes x %d sampling kinds in %.1f s (%s)", len(shapes), len(self._kinds),
                    seconds, self.description)
        return seconds

    def _log_progress(self, done: str, started: float) -> None:
        if self.compiled:  # compiles make warmup long enough to want news of it
            logger.info("warmup: %s ready after %.1f s", done, time.perf_counter() - started)

    @torch.inference_mode()
    def prefill(self, slot: int, prompt_ids: Sequence[int], params: SlotParams) -> int:
        return self._prefill_range(slot, prompt_ids, params, 0, None, 0)

    @torch.inference_mode()
    def prefill_batch(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], params: Sequence[SlotParams],
                      cached: Sequence[int] | None = None) -> list[int]:
        """Whole prompts into their slots in one forward, right-padded to the longest; the first new id of each
        (one host sync). ``cached``: how many of each prompt's first positions its slot's blocks hold already
        (prefix-cache hits, paged cache only): only the rest is computed, each row from its own offset. Errors
        as ``prefill``; nothing is written unless every request is valid."""
        if not len(slots) == len(prompts) == len(params) or not slots:
            raise ValueError("prefill_batch needs one prompt and one SlotParams per slot, and at least one slot")
        ids = [self._checked(slot, prompt, p) for slot, prompt, p in zip(slots, prompts, params, strict=True)]
        if len(set(slots)) != len(slots):
            raise ValueError(f"prefill_batch: duplicate slots in {list(slots)}")
        lengths = [len(i) for i in ids]
        offsets = [0] * len(ids) if cached is None else list(cached)
        if len(offsets) != len(ids) or not all(0 <= c < n for c, n in zip(offsets, lengths, strict=True)):
            raise ValueError(f"prefill_batch: cached must give each prompt an offset in [0, its length), got "
                             f"{offsets} for lengths {lengths}")
        if any(offsets) and not self.kv_paged:
            raise ValueError("prefill_batch: a cached prefix needs the paged KV cache")
        rests = [n - c for n, c in zip(lengths, offsets, strict=True)]
        padded = torch.zeros((len(ids), max(rests)), dtype=torch.int64)
        held = [self._claim(slot) for slot in slots]
        for i, prompt in enumerate(ids):
            padded[i, :rests[i]] = prompt[offsets[i]:]
            self.state.start(held[i], prompt.to(self.device), params[i], self.eos_id)
        rows = torch.tensor(held, dtype=torch.int64, device=self.device)
        start = offsets if any(offsets) else 0
        logits = self.model.prefill(padded.to(self.device), rows, start,
                                    torch.tensor(rests, dtype=torch.int64, device=self.device) - 1).float()
        last = torch.tensor(lengths, dtype=torch.int64, device=self.device) - 1
        return self._first_tokens(held, rows, logits, last, lengths, params)

    @torch.inference_mode()
    def prefill_chunk(self, slot: int, prompt_ids: Sequence[int], params: SlotParams, start: int,
                      end: int, cached: int = 0, prompt_len: int | None = None) -> int | None:
        """Prompt positions [start, end) into ``slot``'s cache, after [0, start) (chunked prefill: callers go in
        order from ``cached``, the positions its blocks hold already: a prefix-cache hit). Returns None until
        ``end`` reaches the prompt's end, then its first new id.

        ``prompt_len``: only the first ``prompt_len`` ids are the request's prompt, the rest its own output so
        far (a preempted stream resumed): echo targets and ``min_new`` count outputs from there, so the id
        returned is the one the stream would have chosen next."""
        return self._prefill_range(slot, prompt_ids, params, start, end, cached, prompt_len)

    def _checked(self, slot: int, prompt_ids: Sequence[int], params: SlotParams) -> Tensor:
        return checked_prompt(slot, prompt_ids, params, max_batch=self.max_batch, max_context=self.max_context,
                              vocab_size=self.vocab_size)

    def _prefill_range(self, slot: int, prompt_ids: Sequence[int], params: SlotParams, start: int,
                       end: int | None, cached: int, prompt_len: int | None = None) -> int | None:
        """Prompt positions [start, end) (None: its end) into ``slot``'s cache; the slot's state is reset at the
        first computed position. Returns the first new id once the prompt's end is reached, else None."""
        ids = self._checked(slot, prompt_ids, params)
        end = len(ids) if end is None else end
        if not 0 <= cached <= start < end <= len(ids):
            raise ValueError(f"prefill_chunk: need 0 <= cached <= start < end <= {len(ids)}, got {cached}, "
                             f"{start}, {end}")
        if cached and not self.kv_paged:
            raise ValueError("prefill_chunk: a cached prefix needs the paged KV cache")
        if prompt_len is not None and not 1 <= prompt_len <= len(ids):
            raise ValueError(f"prefill_chunk: prompt_len must be in [1, {len(ids)}], got {prompt_len}")
        row = self._claim(slot)
        if start == cached:
            self._live[row] = False
            self.state.start(row, ids[:prompt_len].to(self.device), params, self.eos_id)
            if prompt_len is not None:
                self.state.pos[row] = len(ids)  # the first new id is fed after the output so far
        logits = self.model.prefill(ids[None, start:end].to(self.device), row, start).float()
        if end < len(ids):
            return None
        rows = torch.tensor([row], dtype=torch.int64, device=self.device)
        last = torch.full((1,), end - 1, dtype=torch.int64, device=self.device)
        return self._first_tokens([row], rows, logits, last, [end], [params])[0]

    def _first_tokens(self, held: list[int], rows: Tensor, logits: Tensor, last: Tensor, lengths: list[int],
                      params: Sequence[SlotParams]) -> list[int]:
        """Choose each prefilled row's first id from its last prompt position's logits; the rows go live."""
        kinds = [p.kind() for p in params]
        token = first_tokens(self.state, logits, rows, last, max(kinds))
        self._pos[held] = lengths
        self._live[held] = True
        self._kind[held] = kinds
        return token.tolist()

    def _claim(self, slot: int) -> int:
        """``slot``'s row, once it holds one: a free slot takes the lowest free row (free rows hold nothing, so
        only the mapping changes)."""
        row = int(self._row_of[slot])
        if self._claimed[row]:
            return row
        free = int(np.flatnonzero(~self._claimed)[0])
        if free != row:
            self._swap_rows(row, free)
        self._claimed[free] = True
        return free

    def _swap_rows(self, a: int, b: int) -> None:
        """The slots of rows ``a`` and ``b`` trade rows (the mapping only)."""
        slot_a, slot_b = self._slot_of[a], self._slot_of[b]
        self._row_of[slot_a], self._row_of[slot_b] = b, a
        self._slot_of[a], self._slot_of[b] = slot_b, slot_a

    def _pack(self, free: int) -> None:
        """The highest held row, if above the ``free`` row, moves into it: its state, its block table row and its
        host mirrors, all on the device in stream order after the step in flight (whose ids are read by the rows
        it was launched with). The device's active flags are rewritten at the next step."""
        held = np.flatnonzero(self._claimed)
        if not held.size or held[-1] < free:
            return
        src = int(held[-1])
        self.state.move(src, free)
        self.kv_paged.move_row(src, free)
        for mirror in (self._pos, self._live, self._kind, self._claimed):
            mirror[free] = mirror[src]
        self._live[src] = self._claimed[src] = False
        self._active = None
        self._swap_rows(src, free)

    @torch.inference_mode()
    def launch(self, slots: np.ndarray) -> Launched:
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return Launched(slots, torch.empty(0, dtype=torch.int64))
        if self._tree_graphs and self._graph_thread != threading.get_ident():
            # CUDA graph trees are per thread: graphs warmed on another thread would be recorded again,
            # one shape at a time, in the middle of serving. Record them all now instead.
            logger.warning("decode on a thread other than warmup's; warming CUDA graphs again on this one")
            self.warmup()
        rows = self._rows(slots, "decode")
        active = np.zeros(self.max_batch, dtype=bool)
        active[rows] = True
        if active.sum() != slots.size:
            raise ValueError(f"decode: duplicate slots in {slots}")
        check_room(self._pos, slots, self.max_context, rows)
        if not np.array_equal(active, self._active):
            self._set_active(active)  # a host-to-device copy only when the set of streams changes
        b = next(b for b in self.batch_buckets if b > rows.max())
        ctx = self._context_bucket(int(self._pos[rows].max()) + 1)
        self._copy.before_step()
        ids = self._run_step(b, ctx, int(self._kind[rows].max()))
        self._pos[rows] += 1
        host, ready = self._copy.start(ids)
        return Launched(slots, host, ready, ids, rows)

    def collect(self, step: Launched) -> np.ndarray:
        if step.slots.size == 0:
            return np.empty(0, dtype=np.int64)
        if step.ready is not None:
            step.ready.synchronize()  # the step's one host sync
        return step.host_ids.numpy()[step.rows]  # a copy: the buffer serves a later step

    def _rows(self, slots: np.ndarray, what: str) -> np.ndarray:
        """The rows of ``slots``; ValueError unless every one is a slot in range whose prompt is prefilled."""
        if slots.min() < 0 or slots.max() >= self.max_batch or not self._live[self._row_of[slots]].all():
            raise ValueError(f"{what}: every slot must be prefilled and in [0, {self.max_batch}); got {slots}")
        return self._row_of[slots]

    def decode(self, slots: np.ndarray) -> np.ndarray:
        return self.collect(self.launch(slots))

    @torch.inference_mode()
    def verify(self, slots: np.ndarray, drafts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One speculative step, synchronous: slot ``slots[i]`` is fed its last id and the first ``lengths[i]``
        ids of ``drafts[i]`` ((n, w) int64, 1 <= w <= speculative_tokens; a length may be 0). Returns the (n, w + 1) ids
        chosen at each position and how many of them each slot emits, in order (1 to lengths[i] + 1): exactly
        the ids that many plain decode steps would give. Not while a launched step is uncollected."""
        if not self.speculative_tokens:
            raise ValueError("verify: this runner was built without speculative_tokens")
        slots = np.asarray(slots, dtype=np.int64)
        drafts = np.asarray(drafts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        k = drafts.shape[1] if drafts.ndim == 2 else 0
        if (slots.size == 0 or drafts.shape != (slots.size, k) or not 1 <= k <= self.speculative_tokens
                or lengths.shape != (slots.size,)):
            raise ValueError(f"verify: need n >= 1 slots, (n, w) drafts with 1 <= w <= {self.speculative_tokens} "
                             f"and (n,) lengths; got {slots.shape}, {drafts.shape}, {lengths.shape}")
        rows = self._rows(slots, "verify")
        if lengths.min() < 0 or lengths.max() > k:
            raise ValueError(f"verify: draft lengths must be in [0, {k}], got {lengths}")
        if drafts.min() < 0 or drafts.max() >= self.vocab_size:
            raise ValueError(f"verify: draft ids must be in [0, {self.vocab_size})")
        active = np.zeros(self.max_batch, dtype=bool)
        active[rows] = True
        if active.sum() != slots.size:
            raise ValueError(f"verify: duplicate slots in {slots}")
        ends = self._pos[rows] + lengths  # the position of each row's last real query
        if ends.max() >= self.max_context:
            raise ContextOverflow(f"verify: drafts of slots {slots[ends >= self.max_context].tolist()} run past "
                                  f"max_context {self.max_context}")
        if not np.array_equal(active, self._active):
            self._set_active(active)
        b = next(b for b in self.batch_buckets if b > rows.max())
        ctx = self._context_bucket(int(ends.max()) + 1)
        # The step's drafts are contiguous and at least MIN_VERIFY_WIDTH wide (padding rows' lengths keep out):
        # a compiled verify forward would recompile for a strided view of the buffer, and once more for width 1
        # (dynamo specialises size 1), at serving time.
        width = max(k, MIN_VERIFY_WIDTH)
        host_drafts = np.zeros((b, width), dtype=np.int64)
        host_lengths = np.zeros(b, dtype=np.int64)
        host_drafts[rows, :k], host_lengths[rows] = drafts, lengths
        step_drafts = self._step_drafts(host_drafts)
        self._draft_lengths[:b].copy_(torch.from_numpy(host_lengths))
        self._copy.before_step()
        chosen, emitted = self._verify_steps[int(self._kind[rows].max())](
            self.model, self.state, step_drafts, self._draft_lengths[:b], b, ctx)
        chosen, emitted = chosen[:, :k + 1].cpu().numpy()[rows], emitted.cpu().numpy()[rows]  # the host sync
        self._pos[rows] += emitted
        return chosen, emitted

    def release(self, slot: int) -> None:
        check_slot(slot, self.max_batch)
        row = int(self._row_of[slot])
        self._live[row] = self._claimed[row] = False
        if self.kv_paged:
            # Free rows below a step's batch bucket still compute and write at their stale position: pointed
            # at the null block, this one writes nothing into blocks the pool gives to other streams.
            self.kv_paged.set_blocks(row, [])
            self._pack(row)

    # -- internals --

    def _specialisations(self) -> list[tuple[int, int]]:
        """The (batch, context) shapes a dynamic compile may specialise on: batch 1 and above, each context
        extreme. The widest context goes first: dynamo gives dimensions of equal size one symbol, so a first
        compile at the 64-position bucket would tie it to the head size and recompile at the next bucket."""
        first = self.batch_buckets[0]
        second = next((b for b in self.batch_buckets if b > 1), first)
        contexts = dict.fromkeys((self.context_buckets[-1], self.context_buckets[0]))
        return list(dict.fromkeys((b, c) for c in contexts for b in (second, first)))

    def _step_drafts(self, host: np.ndarray) -> Tensor:
        """A verify step's (b, width) drafts on the device, not a view (dynamo guards a view's base). The width is
        a symbol of its own in a compiled verify forward: left to duck sizing, a warm-up width equal to another
        size (the paged block table's ``max_batch`` rows, where max_batch equals it) is tied to that size, and
        every other width recompiles the forward at serving time, stalling every stream for seconds."""
        drafts = torch.from_numpy(host).to(self.device)
        torch._dynamo.maybe_mark_dynamic(drafts, 1)
        return drafts

    def _context_bucket(self, needed: int) -> int:
        if self.attention != "bucketed":
            return self.max_context
        return pow2_bucket(needed, MIN_CTX_BUCKET, self.max_context)

    def _run_step(self, b: int, ctx: int, kind: int) -> Tensor:
        """Queue one step over rows [0, b); returns its (b,) ids on the device, valid until the next step."""
        if self._manual:
            graph = self._captured.get(b, ctx, kind)
            if graph is not None:
                graph.replay()
            else:
                self._steps[kind](self.model, self.state, self._sampled, b, ctx)
            return self._sampled[:b]
        if self._tree_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        ids = self._steps[kind](self.model, self.state, b, ctx)
        if self._tree_graphs:
            ids = ids.clone()  # the graph's output buffer is overwritten by the next replay
        # Advance only the rows in this step, in place on the device (outside the graph, no host sync).
        s = self.state
        active = s.active[:b]
        s.tokens[:b] = torch.where(active, ids, s.tokens[:b])
        s.pos[:b] += active
        return ids

    def _set_active(self, active: np.ndarray) -> None:
        self._active = active
        host = torch.from_numpy(active)
        if self.device.type == "cuda":
            # Pinned and asynchronous: a pageable copy would wait for the step in flight. The caching host
            # allocator keeps the pinned block until the copy has run.
            host = host.pin_memory()
        self.state.active.copy_(host, non_blocking=True)
