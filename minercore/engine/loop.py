"""The engine: one decode loop for every concurrent stream (continuous batching), off the event loop.

``async for piece in engine.generate(request)`` yields ``Piece`` objects; the last one carries the
finish reason. Errors reach only the request they concern, as ``minercore.generation``'s exceptions.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import gc
import heapq
import itertools
import logging
import math
import random
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..contract.config import LLAMA_PRESET_NAMES, NATIVE_BACKENDS, EngineOptions, ModelOptions
from ..contract.generation import (
    FINISH_CANCELLED,
    FINISH_DEADLINE,
    EngineClosed,
    EngineOverloaded,
    EngineStats,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    Piece,
    RequestStats,
    validated_sampling,
)
from ..kv.block_pool import BlockPool
from ..kv.manager import KVCacheManager
from ..text import streamloop
from .delivery import Delivery, Mailbox, Poster, expire, settle
from .prompts import PromptPreparer
from .scheduler import Job, WaitQueue, prefill_groups
from .speculation import Drafter, StepCosts, verify_width

if TYPE_CHECKING:
    from ..models.loading import Checkpoint
    from ..runtime.protocol import Launched, Runner

log = logging.getLogger(__name__)

_RATE_WINDOW_STEPS = 256
# When the device finishes a step, the model thread needs the GIL back to launch the next one; if the event loop
# is running a burst of consumers then, it keeps the GIL until CPython's switch interval (5 ms by default) forces a
# hand-off, and every syscall the loop makes in between restarts that clock. The device idles meanwhile, so the
# engine bounds the wait well under a decode step.
_GIL_SWITCH_INTERVAL_S = 200e-6
# How long past a deadline generate() waits for the model thread to end the stream at a step boundary before it
# ends the stream itself: longer than a normal step, well inside the miner's 0.5 s deadline margin.
_DEADLINE_BACKSTOP_S = 0.2


class Engine:
    """Continuous batching over one model runner, driven from a dedicated model thread.

    The event loop only validates, tokenizes short prompts and moves text from mailboxes to consumers;
    prefill, decode and detokenization (the compiled stream loop, one call per step) run in the thread.
    """

    def __init__(self, model: ModelOptions | None = None, options: EngineOptions | None = None, *,
                 runner: Runner | None = None, tokenizer: Any = None) -> None:
        self.model_options = model or ModelOptions()
        self.options = options or EngineOptions()
        self._runner = runner
        self._tokenizer = tokenizer
        self.checkpoint: Checkpoint | None = None  # what options.path holds, once built
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poster: Poster | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._waiting = WaitQueue()
        self._active: dict[int, Job] = {}  # slot -> job, decoding; model thread only
        self._prefilling: dict[int, Job] = {}  # slot -> job whose long prompt is prefilled in chunks; model thread
        self._strip_first_space = False
        self._prompts: PromptPreparer | None = None
        self._admitted = 0  # jobs admitted to a slot and not finished; read under _cond for admission
        self._cancelled: collections.deque[Job] = collections.deque()
        self._seq = itertools.count()
        self._closing = False
        self._abort = False
        self._stopped = False
        self._counts = collections.Counter()
        # The decode step launched and not yet collected (overlap): its Launched and the tenancy of each of its
        # slots at launch, so that ids for a job that has left its slot since are dropped; model thread only.
        self._in_flight: tuple[Launched, np.ndarray] | None = None
        # (time, tokens so far) at each of the recent decode steps: the window the rates are measured over
        self._recent_steps: collections.deque[tuple[float, int]] = collections.deque(maxlen=_RATE_WINDOW_STEPS)
        self.warmup_seconds = 0.0
        self.stream_loop = streamloop.IMPLEMENTATION
        self._drafter: Drafter | None = None
        self._step_costs = StepCosts()
        self._kv: KVCacheManager | None = None  # paged KV: which blocks each admitted job holds
        # Paged KV, model thread only: decoding streams whose blocks were taken for others, by admission order;
        # each keeps its slot, its stream loop state and its drafts, and is prefilled again to continue.
        self._preempted: list[Job] = []
        self._admissions = itertools.count()

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the tokenizer and model, then start the model thread and wait for its warm-up (compile)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._poster = Poster(self._loop)
        sys.setswitchinterval(min(sys.getswitchinterval(), _GIL_SWITCH_INTERVAL_S))
        ready = self._loop.create_future()
        thread = threading.Thread(target=self._model_thread, args=(ready,), name="minercore-model", daemon=True)
        thread.start()
        try:
            await ready
        except BaseException:
            await asyncio.to_thread(thread.join)
            raise
        self._thread = thread
        # What is alive now (the model, the tokenizer, the token table, compiled code, the imported libraries)
        # lives as long as the engine. Frozen out of the collector, a full collection scans only what serving
        # allocates. Unfrozen, one on two busy cores stalled the event loop and, with the GIL held, the model
        # thread for longer than the deadline margin.
        gc.collect()
        gc.freeze()

    def _build(self) -> None:
        from ..text.token_bytes import strips_first_space, token_bytes_table
        from ..text.tokenizer import load_tokenizer, stop_token_ids, tokenizer_for

        options = self.model_options
        checkpoint = None
        if options.path and options.backend != "upstream":
            from ..models.loading import inspect

            checkpoint = inspect(options.path)  # an embedded model's name is fetched here, once
            options = self.model_options = dataclasses.replace(options, path=checkpoint.path)
        self.checkpoint = checkpoint
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(tokenizer_for(options.tokenizer,
                                                           checkpoint.tokenizer if checkpoint else None))
        self._prompts = PromptPreparer(self._tokenizer, echo=options.mode == "echo",
                                       max_prompt_chars=self.options.max_prompt_chars)
        stops = stop_token_ids(self._tokenizer, checkpoint.eos_ids if checkpoint else ())
        if not stops:
            raise ValueError("the tokenizer has no EOS token and the checkpoint's configs name none")
        eos_id = stops[0]
        # A generated stream ends at any stop id (Llama 3: end of text and end of turn). The stream loop knows
        # one EOS, so the others are handed to it as that one, and like the EOS none adds text: a stop id marks
        # the end of the answer, not a part of it. (They are special tokens in the supported families; a
        # non-special one would show its text in transformers' decode of generate's ids, not here.) Echo output
        # is steered onto the prompt and ends at eos_id only.
        self._eos_id = eos_id
        self._other_stops = (np.array(stops[1:], dtype=np.int64)
                             if options.mode == "generate" and len(stops) > 1 else None)
        if not self.options.max_batch:
            self.options = dataclasses.replace(self.options, max_batch=self._auto_max_batch())
        if self._runner is None:
            from ..runtime.build import build_runner

            paged = self.options.kv_cache == "paged"
            self._runner = build_runner(self.model_options, max_batch=self.options.max_batch, eos_id=eos_id,
                                        stop_ids=stops if options.mode == "generate" else (eos_id,),
                                        speculative_tokens=self._speculative_tokens(),
                                        kv_block_size=self.options.kv_block_size if paged else 0,
                                        kv_cache_bytes=int(self.options.kv_cache_gb * 2**30) if paged else 0,
                                        kv_memory_fraction=self.options.kv_memory_fraction)
        if self._runner.max_batch < self.options.max_batch:
            raise ValueError(f"runner holds {self._runner.max_batch} slots, engine wants {self.options.max_batch}")
        self._free_slots = list(range(self.options.max_batch))
        heapq.heapify(self._free_slots)
        self._drafter = self._build_drafter(eos_id)
        self._kv = self._build_kv()
        # Per slot, counted with one array operation per step (no per-job Python work): ids handed to the stream
        # loop for its current job, and its tenancy, advanced each time a job leaves it.
        self._slot_tokens = np.zeros(self.options.max_batch, dtype=np.int64)
        self._tenancy = np.zeros(self.options.max_batch, dtype=np.int64)
        if self._kv is not None:
            # Per slot: the ids handed to the stream loop (what a preempted stream is prefilled again with),
            # its prompt's length, and the positions its blocks hold.
            self._outputs = np.zeros((self.options.max_batch, self._kv.max_positions), dtype=np.int32)
            self._prompt_len = np.zeros(self.options.max_batch, dtype=np.int64)
            self._kv_room = np.zeros(self.options.max_batch, dtype=np.int64)
            # Positions a step may write past a stream's prompt and ids handed over so far: the next step's
            # (the step in flight writes the last handed id's) and a verify step's drafts.
            self._kv_ahead = 1 + self._speculative_tokens()
        table = token_bytes_table(self._tokenizer)
        # Models often pad their vocabulary past the tokenizer's (e.g. to a multiple of 64): ids the tokenizer
        # does not know decode to nothing, as tokenizer.decode would skip them, instead of failing the step.
        table += [b""] * (self._runner.vocab_size - len(table))
        # SentencePiece-style tokenizers decode a text without the space their normalizer put before its first
        # word; the stream loop drops it from each stream's first byte (the per-token table cannot know what is
        # first), before stop strings are matched, so they see the text the caller gets.
        self._strip_first_space = strips_first_space(self._tokenizer)
        self._table = streamloop.StreamTable(
            table, self.options.max_batch, eos_id=eos_id,
            flush_tokens=self.options.flush_tokens, flush_ms=self.options.flush_ms)

    def _auto_max_batch(self) -> int:
        """max_batch 0: a given runner's slots, else as many as suit the device and the KV cache."""
        if self._runner is not None:
            return self._runner.max_batch
        from ..runtime.device import auto_max_batch, select_device

        paged = self.options.kv_cache == "paged" and self.model_options.backend in NATIVE_BACKENDS
        return auto_max_batch(select_device(self.model_options.device), paged)

    def _speculative_tokens(self) -> int:
        return self.options.speculative_tokens if self.options.speculative == "ngram" else 0

    def _build_drafter(self, eos_id: int) -> Drafter | None:
        """Speculation's host side, where asked for and the runner verifies drafts of that many ids."""
        k = self._speculative_tokens()
        if not k:
            return None
        if getattr(self._runner, "speculative_tokens", 0) != k:
            log.warning("speculative ngram: the %s runner does not verify %d-id drafts; decoding one token a "
                        "step", self.backend_name, k)
            return None
        return Drafter(self.options.max_batch, self._runner.max_context, k,
                       echo=self.model_options.mode == "echo", eos_id=eos_id)

    def _build_kv(self) -> KVCacheManager | None:
        """The block tables over the runner's paged pool, where asked for and the runner keeps one."""
        if self.options.kv_cache != "paged":
            return None
        spec = getattr(self._runner, "kv_paged", None)
        if spec is None:
            log.info("kv_cache paged: the %s runner keeps its own KV cache; using it", self.backend_name)
            return None
        return KVCacheManager(BlockPool(spec.num_blocks, spec.block_size), spec.max_blocks_per_slot,
                              prefix_caching=self.options.prefix_cache,
                              copy_block=getattr(self._runner, "copy_block", None))

    def _warm_up(self, ready: asyncio.Future) -> bool:
        """On the model thread, the build as well as the warm-up: CUDA graphs belong to the thread that records
        them, and on a CPU each thread that runs a parallel torch op keeps its own OpenMP workers; a second
        set (the build's, on another thread) outnumbers the cores, and then OpenMP wakes the model thread's
        workers from sleep for every kernel instead of keeping them spinning between kernels: a decode step
        took 2.2 times as long with two threads (RESULTS.md)."""
        try:
            self._build()
            self.warmup_seconds = self._runner.warmup()
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
            self._stopped = True
            self._loop.call_soon_threadsafe(settle, ready, exc)
            return False
        import torch

        from ..runtime.device import usable_cores

        log.info("engine ready: %s; warm-up %.2fs; stream loop %s; max_batch %d, max_queue %d; torch threads %d "
                 "of %d usable cores", self._runner.description, self.warmup_seconds, self.stream_loop,
                 self.options.max_batch, self.options.max_queue, torch.get_num_threads(), usable_cores())
        self._loop.call_soon_threadsafe(settle, ready, None)
        return True

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def backend_name(self) -> str:
        """native or hf: the runner's kind, once built (a native path may fall back to hf)."""
        if self._runner is None:
            return "hf" if self.model_options.backend == "hf" else "native"
        return getattr(self._runner, "kind", "native")

    @property
    def runner_description(self) -> str:
        return self._runner.description if self._runner is not None else "not started"

    @property
    def serving(self) -> dict[str, Any]:
        """Backend, checkpoint format and architecture, the weights' quantization (as served, and as the file
        stores them), the dtype, the device, and once built the KV cache's kind and the memory the weights and
        the KV cache hold."""
        options, checkpoint, runner = self.model_options, self.checkpoint, self._runner
        if checkpoint is not None:
            facts = {"format": checkpoint.format, "architecture": checkpoint.architecture,
                     "checkpoint_quantization": checkpoint.quantization}
        elif options.weights:
            facts = {"format": "transformers", "architecture": "gpt2", "checkpoint_quantization": "none"}
        else:
            facts = {"format": f"random ({options.preset} preset)",
                     "architecture": "llama" if options.preset in LLAMA_PRESET_NAMES else "gpt2",
                     "checkpoint_quantization": "none"}
        dtype = str(runner.dtype).removeprefix("torch.") if runner is not None else None
        memory = ({"weights_bytes": runner.weights_bytes, "kv_cache_bytes": runner.kv_bytes}
                  if runner is not None else {})
        return {"backend": self.backend_name, **facts, "quantization": getattr(runner, "quantization", "none"),
                "dtype": dtype, "device": str(runner.device) if runner is not None else None,
                "kv_cache": None if runner is None else "paged" if self._kv is not None else (
                    "static" if runner.kind == "native" else "transformers"),
                **memory}

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop admitting; let running and queued requests finish within ``grace`` s, then cancel the rest."""
        with self._cond:
            self._closing = True
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._cond:
                if not self._waiting and self._admitted == 0:
                    break
            await asyncio.sleep(0.01)
        with self._cond:
            self._abort = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._stopped = True
        gc.unfreeze()  # what start() froze may be garbage from now on

    # ---- the consumer side (event loop) --------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        """Stream ``request``'s text. Leaving the loop early cancels the request and frees its slot."""
        if self._thread is None or self._loop is None:
            raise EngineClosed("engine is not started")
        job = await self._submit(request)
        mailbox = job.mailbox
        # The deadline is held here, on the event loop, as well as by the model thread, which sees it only between
        # steps: those grow long under load (a batch of long prefills, a busy CPU), and the caller does not wait.
        # The model thread ends a stream at its deadline itself at its next step boundary, with the text the stream
        # loop still holds back (a stop string the text might yet begin) released; if no boundary comes within
        # _DEADLINE_BACKSTOP_S, the stream ends here with the text delivered so far (whole characters: the stream
        # loop only hands those over) and the model thread is asked to free the slot.
        expiry = None
        if job.deadline is not None:
            at = self._loop.time() + (job.deadline - time.monotonic()) + _DEADLINE_BACKSTOP_S
            expiry = self._loop.call_at(at, expire, mailbox)
        try:
            while True:
                if mailbox.empty():
                    mailbox.waiter = self._loop.create_future()
                    await mailbox.waiter
                text = "".join(mailbox.parts)
                mailbox.parts.clear()
                if mailbox.error is not None:
                    if text:
                        yield Piece(text)
                    raise mailbox.error
                if mailbox.finish_reason is not None:
                    yield Piece(text, mailbox.finish_reason, mailbox.stats)
                    return
                if mailbox.expired:
                    yield Piece(text, FINISH_DEADLINE)
                    return
                if text:
                    yield Piece(text)
        finally:
            if expiry is not None:
                expiry.cancel()
            if mailbox.finish_reason is None and mailbox.error is None:
                with self._cond:
                    if job in self._waiting:  # never admitted: its queue place is free for new arrivals at once
                        self._waiting.remove(job)
                        self._counts["completed" if mailbox.expired else "cancelled"] += 1
                    else:  # in a slot: the model thread frees it at its next iteration
                        self._cancelled.append(job)
                        self._cond.notify()

    async def _submit(self, request: GenerationRequest) -> Job:
        sampling = validated_sampling(request.sampling, self.options.max_new_tokens)
        prompt_ids = await self._prompts.prompt_ids(request)
        room = self._runner.max_context - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(f"prompt is {len(prompt_ids)} tokens; the model's context is "
                                 f"{self._runner.max_context} tokens")
        if self._kv is not None:  # an answer is at most what the pool holds for one stream alone
            held = self._kv.max_positions - len(prompt_ids)
            if held < 1:
                raise InvalidRequest(f"prompt is {len(prompt_ids)} tokens; the KV cache holds at most "
                                     f"{self._kv.max_positions} positions for one request (--engine.kv_cache_gb)")
            room = min(room, held)
        if room < sampling.max_new_tokens:
            sampling = dataclasses.replace(sampling, max_new_tokens=room)
        deadline = None if request.timeout is None else time.monotonic() + max(0.0, float(request.timeout))
        from ..runtime.sampling import SlotParams  # torch: loaded with the runner, not with the contract

        # An unseeded request draws from the random module (seeded by the OS, reseeded after fork) rather than
        # os.urandom: that syscall gives up the GIL mid-burst on the loop, and the model thread keeps it.
        slot_params = SlotParams(
            echo=self.model_options.mode == "echo", temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p,
            seed=sampling.seed if sampling.seed is not None else random.getrandbits(32),
            # ignore_eos: no stop id for the whole answer, which then ends at max_new_tokens (or a stop string)
            min_new=sampling.max_new_tokens if sampling.ignore_eos else min(sampling.min_tokens,
                                                                            sampling.max_new_tokens))
        job = Job(request.request_id, prompt_ids, slot_params, sampling, deadline, float(request.priority),
                  next(self._seq), Mailbox())
        with self._cond:
            if self._closing or self._stopped:
                raise EngineClosed("engine is shutting down")
            capacity = self.options.max_batch + self.options.max_queue
            if self._admitted + len(self._waiting) >= capacity:
                self._counts["rejected"] += 1
                raise EngineOverloaded(f"all {self.options.max_batch} slots are busy and "
                                       f"{self.options.max_queue} requests are already waiting")
            self._waiting.push(job)
            self._cond.notify()
        return job

    # ---- stats -------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        with self._cond:
            active, queued = self._admitted, len(self._waiting)
            counts = dict(self._counts)
            recent = list(self._recent_steps)
        steps_per_s = tokens_per_s = 0.0
        if len(recent) >= 2:
            span = recent[-1][0] - recent[0][0]
            if span > 0:
                steps_per_s = (len(recent) - 1) / span
                tokens_per_s = (recent[-1][1] - recent[0][1]) / span
        drafter = self._drafter if self._runner is not None else None
        kv = self._kv.stats() if self._kv is not None else None
        return EngineStats(active=active, queued=queued, completed=counts.get("completed", 0),
                           failed=counts.get("failed", 0), cancelled=counts.get("cancelled", 0),
                           rejected=counts.get("rejected", 0), steps=counts.get("steps", 0),
                           tokens=counts.get("tokens", 0), steps_per_s=steps_per_s, tokens_per_s=tokens_per_s,
                           verify_steps=drafter.verify_steps if drafter else 0,
                           draft_tokens=drafter.drafted if drafter else 0,
                           accepted_tokens=drafter.accepted if drafter else 0,
                           verify_declined=self._step_costs.declined_steps if drafter else 0,
                           **({"kv_blocks_used": kv.blocks_used, "kv_blocks_free": kv.blocks_free,
                               "kv_blocks_cached": kv.blocks_cached, "prefix_hit_blocks": kv.hits,
                               "prefix_miss_blocks": kv.misses, "prefix_partial_hits": kv.partial_hits,
                               "kv_evictions": kv.evictions, "kv_preemptions": kv.preemptions} if kv else {}))

    # ---- the model thread ---------------------------------------------------------------------------
    def _model_thread(self, ready: asyncio.Future) -> None:
        if not self._warm_up(ready):
            return
        # While a step is in flight, an iteration's deliveries wait for the next launch (see _step), unless a
        # prefill comes first: text must not wait for someone else's prompt.
        outbox: list[Delivery] = []
        while True:
            with self._cond:
                while (not self._abort and not self._active and not self._prefilling and not self._waiting
                       and not self._cancelled and not self._preempted and self._in_flight is None):
                    self._cond.wait()
                if self._abort:
                    break
                cancelled = list(self._cancelled)
                self._cancelled.clear()
            try:
                self._iterate(cancelled, outbox)
            except Exception as exc:  # noqa: BLE001 - a bug here must not kill the thread serving everyone
                log.exception("engine iteration failed; failing the active requests")
                self._in_flight = None
                for job in list(self._active.values()):
                    self._end(job, outbox, error=GenerationFailed(f"engine error: {exc}"))
            # _waiting is read without the lock: a stale answer only posts early or once behind a prefill.
            if self._in_flight is None or self._prefilling or (self._waiting and self._free_slots):
                self._post(outbox)
                outbox.clear()
        self._post(outbox)
        self._abort_all()

    def _iterate(self, cancelled: list[Job], outbox: list[Delivery]) -> None:
        for job in cancelled:
            self._cancel(job)
        now = time.monotonic()
        for job in [j for j in (*self._active.values(), *self._preempted) if j.deadline is not None
                    and now >= j.deadline]:
            self._end(job, outbox, reason=FINISH_DEADLINE, text=self._table.finish(job.slot, drop_incomplete=True),
                      table_done=True)
        if not self._free_slots:
            self._expire_waiting(now, outbox)
        self._admit(now, outbox)
        self._step(outbox)

    def _step(self, outbox: list[Delivery]) -> None:
        """Launch the next decode step for every active slot, then collect the one in flight, if any, and hand
        its ids to the stream loop: with ``overlap``, the device runs step N+1 while the host detokenizes and
        posts step N (the next step's fed tokens are already on the device). A job that ended with step N
        (EOS, stop, length, deadline, cancellation) still sits in step N+1; its id from there is dropped, as is
        any id for a slot that another job has taken since.

        The deliveries so far (step N-1's text among them) are posted only once step N+1 is launched: waking the
        event loop hands it the GIL, and the model thread waits to get it back while the loop runs consumers.
        Posted before the launch, that wait would idle the device; posted after, it overlaps the device's step."""
        if self._kv is not None and self._active:
            self._grow()
        if self._drafter is not None and self._active and self._speculate(outbox):
            return
        launched = None
        start = time.perf_counter()
        if self._active:
            slots = np.fromiter(self._active, dtype=np.int64, count=len(self._active))
            try:
                launched = (self._runner.launch(slots), self._tenancy[slots])
            except Exception as exc:  # noqa: BLE001 - includes CUDA out-of-memory; the step's requests fail
                self._fail_step(exc, len(slots), outbox)
                return
        self._post(outbox)
        outbox.clear()
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            self._collect(previous, outbox)
        if not self.options.overlap and self._in_flight is not None:
            previous, self._in_flight = self._in_flight, None
            self._collect(previous, outbox)
        if launched is not None and previous is not None:
            # A step's cost as speculation weighs it: with the overlap, launching the next step and waiting
            # for the previous one, which in a steady state is one step of the device's time.
            self._step_costs.record_plain(len(launched[1]), time.perf_counter() - start)

    def _speculate(self, outbox: list[Delivery]) -> bool:
        """A verify step in place of a decode step, when a stream has a draft; False: decode as usual.

        Drafts need every stream's latest id on the host, so the step in flight is collected first: a verify
        step costs the launch/collect overlap, which streams that are not drafting (none found, or backing
        off after failures) keep, since then no step is collected early. The drafts narrow as streams are
        added, so that a step computes at most the runner's ``verify_tokens`` positions; past that, and
        wherever no stream drafts, the step is a plain decode step."""
        slots = np.fromiter(self._active, dtype=np.int64, count=len(self._active))
        # Too many streams for a verify step to fit the budget, none drafting, or too few of the drafts likely
        # accepted for the step's measured cost: a plain step.
        width = self._verify_width(slots)
        if (width < 1 or not self._drafter.wants(slots)
                or not self._step_costs.pays(slots.size, self._drafter.expected_ids(slots, width))):
            self._drafter.skip(slots)
            return False
        if self._in_flight is not None:
            previous, self._in_flight = self._in_flight, None
            self._collect(previous, outbox)
            if not self._active:
                return True
            slots = np.fromiter(self._active, dtype=np.int64, count=len(self._active))
        # The step's cost counts the host's drafting and posting too: work a plain step would overlap.
        start = time.perf_counter()
        # Fewer streams than before the collection, so never a narrower width.
        width = self._verify_width(slots)
        expected = self._drafter.expected_ids(slots, width)
        drafts, lengths = self._drafter.propose(slots, width)
        if not lengths.any():
            return False
        self._post(outbox)  # the text so far need not wait for this step
        outbox.clear()
        try:
            chosen, emitted = self._runner.verify(slots, drafts, lengths)
        except Exception as exc:  # noqa: BLE001 - as a decode step's failure: the step's requests fail
            self._fail_step(exc, len(slots), outbox)
            return True
        self._drafter.record(slots, lengths, emitted)
        # The accepted ids go to the stream loop in order, one column at a time, as if each had come from its
        # own step: a stream that ends inside its run (EOS, a stop string, its length) takes nothing after it.
        for j in range(int(emitted.max())):
            keep = emitted > j
            if j:
                keep &= np.fromiter((slot in self._active for slot in slots.tolist()), dtype=bool,
                                    count=slots.size)
            self._consume(slots[keep], chosen[keep, j], outbox)
        self._step_costs.record_verify(slots.size, time.perf_counter() - start, expected, int(emitted.sum()))
        with self._cond:
            self._counts["steps"] += 1
            self._recent_steps.append((time.monotonic(), self._counts["tokens"]))
        return True

    def _verify_width(self, slots: np.ndarray) -> int:
        return verify_width(self._drafter.k, self._runner.verify_tokens, slots.size,
                            getattr(self._runner, "min_verify_width", 1))

    def _collect(self, in_flight: tuple[Launched, np.ndarray], outbox: list[Delivery]) -> None:
        step, tenancy = in_flight
        try:
            ids = self._runner.collect(step)
        except Exception as exc:  # noqa: BLE001 - a device fault surfaces when its ids are read
            self._fail_step(exc, len(tenancy), outbox)
            return
        slots = step.slots
        keep = self._tenancy[slots] == tenancy
        if not keep.all():
            slots, ids = slots[keep], ids[keep]
        self._consume(slots, ids, outbox)
        with self._cond:
            self._counts["steps"] += 1
            self._recent_steps.append((time.monotonic(), self._counts["tokens"]))

    def _fail_step(self, exc: Exception, size: int, outbox: list[Delivery]) -> None:
        """Every active request fails (their next ids may never come), and the step in flight is dropped."""
        log.error("decode step failed for %d requests", size, exc_info=exc)
        _free_cuda_cache()
        self._in_flight = None
        for job in list(self._active.values()):
            self._end(job, outbox, error=GenerationFailed(f"model step failed: {exc}"))

    def _consume(self, slots: np.ndarray, ids: np.ndarray, outbox: list[Delivery]) -> None:
        """Hand one token per slot to the stream loop (one call for the whole batch) and route its events."""
        if not slots.size:
            return
        if self._drafter is not None:
            self._drafter.extend(slots, ids)
        if self._other_stops is not None:
            ids = np.where(np.isin(ids, self._other_stops), self._eos_id, ids)
        if self._kv is not None:
            self._outputs[slots, self._slot_tokens[slots]] = ids
        events = self._table.step(slots, ids)
        self._slot_tokens[slots] += 1
        with self._cond:
            self._counts["tokens"] += len(slots)
        for slot, text, reason in events:
            job = self._active[slot]
            if reason is None:
                outbox.append(Delivery(job.mailbox, text))
            else:
                self._end(job, outbox, reason=reason, text=text, table_done=True)

    def _admit(self, now: float, outbox: list[Delivery]) -> None:
        """Prefill waiting jobs into free slots, highest priority first, at most ``prefill_tokens`` prompt tokens
        per engine step so that running streams keep decoding: a longer prompt is prefilled in chunks over the
        next steps, and started chunks go before new prompts. Whole prompts (or the rests of prefix-cache hits)
        admitted together share one forward. A prompt that would fit a whole step but not what is left of this
        one waits for the next (splitting it would only add a chunk's overhead). Each first text is posted as
        soon as its prefill is done, not after the step."""
        full = budget = max(1, self.options.prefill_tokens)
        for job in list(self._prefilling.values()):
            budget -= self._prefill_part(job, budget, now, outbox)
            if budget <= 0:
                return
        if self._preempted:
            budget = self._resume(budget, now, outbox)
            if self._preempted:  # they go back before new requests come in; those past their deadline end now
                self._expire_waiting(now, outbox)
                return
            if budget <= 0:
                return
        chunked = hasattr(self._runner, "prefill_chunk")
        whole: list[Job] = []
        while self._free_slots and budget > 0:
            # At a fresh step any prompt may start (whole, or its first chunk); later, only one that fits.
            room = budget if chunked and budget < full else math.inf
            job = self._pop_waiting(now, outbox, room)
            if job is None:
                break
            job.slot = heapq.heappop(self._free_slots)
            if self._kv is not None and not self._reserve(job):
                self._requeue(job)  # it keeps its place: nothing behind it goes first (no starving long prompts)
                break
            rest = len(job.prompt_ids) - job.cached  # a prefix-cache hit computes only the rest, from its offset
            if rest <= budget or not chunked:
                whole.append(job)
                budget -= rest
            else:
                self._prefilling[job.slot] = job
                budget -= self._prefill_part(job, budget, now, outbox)
        for group in prefill_groups(whole, getattr(self._runner, "prefill_batch_tokens", 0)):
            self._prefill_whole(group, outbox)

    def _pop_waiting(self, now: float, outbox: list[Delivery], room: float) -> Job | None:
        """The next waiting job to admit (counted as admitted), ending the expired ones on the way; None if the
        next one's prompt is longer than ``room`` (it keeps its place in the queue)."""
        with self._cond:
            job, expired = self._waiting.pop_next(now, room)
            self._counts["completed"] += len(expired)
            if job is not None:
                self._admitted += 1
        outbox.extend(self._unserved(j, FINISH_DEADLINE) for j in expired)
        return job

    def _reserve(self, job: Job) -> bool:
        """Blocks for the job's prompt and its first steps (reusing cached prompt blocks), pointed to by its
        slot; False, holding nothing, while too few are free. Its answer takes blocks as it grows (``_grow``)."""
        # The prefill hands its first id over at once: counted here, it needs no block of its own at _grow.
        cached = self._kv.admit(job, job.prompt_ids, self._kv_positions(len(job.prompt_ids) + 1))
        if cached is None:
            return False
        job.admission = next(self._admissions)
        job.cached = job.prefilled = cached
        self._prompt_len[job.slot] = len(job.prompt_ids)
        self._assign_blocks(job)
        return True

    def _kv_positions(self, held: int) -> int:
        """Positions to hold for a stream with ``held`` ids: room for its next steps, within what one stream
        may hold (``_submit`` cuts every answer to that)."""
        return min(held + self._kv_ahead, self._kv.max_positions)

    def _assign_blocks(self, job: Job) -> None:
        table = self._kv.block_table(job)
        self._runner.assign_blocks(job.slot, table)
        self._kv_room[job.slot] = len(table) * self._kv.block_size

    def _grow(self) -> None:
        """Blocks for every decoding stream's next step, earliest admitted first. Where the pool runs out, the
        most recently admitted decoding stream is preempted (``_preempt``), until the stream fits or is the
        one preempted: a stream admitted alone always fits, since every answer is cut to what the pool holds."""
        slots = np.fromiter(self._active, dtype=np.int64, count=len(self._active))
        held = self._prompt_len[slots] + self._slot_tokens[slots]
        short = slots[np.minimum(held + self._kv_ahead, self._kv.max_positions) > self._kv_room[slots]]
        if not short.size:  # the common step: a stream crosses into a new block once every block_size ids
            return
        for job in sorted((self._active[slot] for slot in short.tolist()), key=lambda j: j.admission):
            if self._active.get(job.slot) is not job:  # preempted for an earlier stream's room
                continue
            wanted = self._kv_positions(len(job.prompt_ids) + int(self._slot_tokens[job.slot]))
            while not self._kv.append_slot(job, wanted):
                victim = max(self._active.values(), key=lambda j: j.admission)
                self._preempt(victim)
                if victim is job:
                    break
            else:
                self._assign_blocks(job)

    def _preempt(self, job: Job) -> None:
        """Free a decoding stream's blocks for others. It keeps its slot, its stream loop state and its drafts,
        and once blocks are free again (``_resume``) its prompt and output so far are prefilled again, from the
        prefix cache where its blocks are still there, and it continues exactly where it stopped."""
        slot = job.slot
        handed = int(self._slot_tokens[slot])
        # Positions [0, prompt + handed - 1) are written by finished steps: cached, they make resumption cheap.
        self._kv.commit(job, job.prompt_ids + self._outputs[slot, :handed - 1].tolist())
        self._runner.release(slot)
        self._kv.preempt(job)
        self._kv_room[slot] = 0
        del self._active[slot]
        self._tenancy[slot] += 1  # its id from the step in flight is dropped: resumption computes it again
        bisect.insort(self._preempted, job, key=lambda j: j.admission)

    def _resume(self, budget: int, now: float, outbox: list[Delivery]) -> int:
        """Preempted streams back into their blocks, earliest admitted first, while blocks are free; returns
        what is left of the step's prefill budget."""
        while self._preempted and budget > 0:
            job = self._preempted[0]
            ids = job.prompt_ids + self._outputs[job.slot, :self._slot_tokens[job.slot]].tolist()
            cached = self._kv.admit(job, ids, self._kv_positions(len(ids) + 1))
            if cached is None:
                break
            del self._preempted[0]
            job.resume = ids
            job.cached = job.prefilled = cached
            self._prefilling[job.slot] = job
            self._assign_blocks(job)
            budget -= self._prefill_part(job, budget, now, outbox)
        return budget

    def _requeue(self, job: Job) -> None:
        """Undo ``_pop_waiting`` and the slot taken for a job that must wait for KV blocks."""
        heapq.heappush(self._free_slots, job.slot)
        job.slot = -1
        with self._cond:
            self._admitted -= 1
            self._waiting.push(job)

    def _prefill_whole(self, jobs: list[Job], outbox: list[Delivery]) -> None:
        """Whole prompts, from their prefix-cache offsets: one batched forward when the runner has one; if it
        fails, one prompt at a time, so only a prompt that fails alone fails its request."""
        firsts = None
        if len(jobs) > 1 and hasattr(self._runner, "prefill_batch"):
            extra = {"cached": [j.cached for j in jobs]} if any(j.cached for j in jobs) else {}
            try:
                firsts = self._runner.prefill_batch([j.slot for j in jobs], [j.prompt_ids for j in jobs],
                                                    [j.slot_params for j in jobs], **extra)
            except Exception:  # noqa: BLE001 - retried one by one below
                log.warning("batched prefill of %d prompts failed; prefilling them one at a time", len(jobs),
                            exc_info=True)
                _free_cuda_cache()
        for i, job in enumerate(jobs):
            if firsts is not None:
                first = firsts[i]
            else:
                try:
                    first = self._prefill_one(job)
                except Exception as exc:  # noqa: BLE001 - only this request fails
                    self._prefill_failed(job, exc, outbox)
                    continue
            self._start_stream(job, first, outbox)
            if firsts is None:  # one prefill at a time: this first text need not wait for the next prefill
                self._post(outbox.copy())
                outbox.clear()
        self._post(outbox.copy())
        outbox.clear()

    def _prefill_one(self, job: Job) -> int:
        """A whole prompt alone: its first id."""
        if not job.cached:
            return self._runner.prefill(job.slot, job.prompt_ids, job.slot_params)
        return self._runner.prefill_chunk(job.slot, job.prompt_ids, job.slot_params, job.cached,
                                          len(job.prompt_ids), cached=job.cached)

    def _prefill_part(self, job: Job, budget: int, now: float, outbox: list[Delivery]) -> int:
        """The next chunk (at most ``budget`` tokens) of a job's prompt; returns the tokens it took."""
        if job.deadline is not None and now >= job.deadline:
            self._end(job, outbox, reason=FINISH_DEADLINE, text=self._finish_text(job), table_done=True)
            return 0
        ids = job.prompt_ids if job.resume is None else job.resume
        start = job.prefilled
        end = min(len(ids), start + budget)
        extra = {"cached": job.cached} if job.cached else {}  # keywords the hf runner does not take
        if job.resume is not None:
            extra["prompt_len"] = len(job.prompt_ids)
        try:
            first = self._runner.prefill_chunk(job.slot, ids, job.slot_params, start, end, **extra)
        except Exception as exc:  # noqa: BLE001 - only this request fails
            self._prefill_failed(job, exc, outbox)
            return end - start
        job.prefilled = end
        if first is not None:
            del self._prefilling[job.slot]
            self._start_stream(job, first, outbox)
            self._post(outbox.copy())
            outbox.clear()
        return end - start

    def _prefill_failed(self, job: Job, exc: Exception, outbox: list[Delivery]) -> None:
        log.error("prefill failed for %s", job.request_id, exc_info=exc)
        _free_cuda_cache()
        self._end(job, outbox, error=GenerationFailed(f"prefill failed: {exc}"), table_done=job.resume is None)

    def _finish_text(self, job: Job) -> str:
        """The text the stream loop still holds for a job ending before its next step: none before its first
        step, a resumed stream's held-back text otherwise."""
        return "" if job.resume is None else self._table.finish(job.slot, drop_incomplete=True)

    def _start_stream(self, job: Job, first: int, outbox: list[Delivery]) -> None:
        """The job's prompt is in its slot: it joins the decode steps, its first token goes to the stream loop."""
        self._active[job.slot] = job
        if job.resume is not None:  # a preempted stream: its stream loop and drafts carry on from where it was
            self._kv.commit(job, job.resume)
            job.resume = None
        else:
            if self._kv is not None:
                self._kv.commit(job, job.prompt_ids)  # its full prompt blocks are written: findable by later prompts
            if self._drafter is not None:
                self._drafter.start(job.slot, job.prompt_ids, job.sampling.max_new_tokens)
            try:
                self._table.add(job.slot, max_new_tokens=job.sampling.max_new_tokens, stop=job.sampling.stop,
                                include_stop=job.sampling.include_stop, strip_first_space=self._strip_first_space)
            except Exception as exc:  # noqa: BLE001 - only this request fails
                self._prefill_failed(job, exc, outbox)
                return
        self._consume(np.array([job.slot], dtype=np.int64), np.array([first], dtype=np.int64), outbox)

    def _expire_waiting(self, now: float, outbox: list[Delivery]) -> None:
        """While every slot is busy, queued requests past their deadline end now: their callers stop waiting and
        their queue places are freed for new arrivals."""
        with self._cond:
            expired = self._waiting.pop_expired(now)
            self._counts["completed"] += len(expired)
        outbox.extend(self._unserved(job, FINISH_DEADLINE) for job in expired)

    def _cancel(self, job: Job) -> None:
        """A job its consumer left after it was admitted (``generate`` frees a waiting one's place itself)."""
        if (self._active.get(job.slot) is job or self._prefilling.get(job.slot) is job
                or job in self._preempted):
            self._table.release(job.slot)
            self._release_slot(job)
            with self._cond:  # ended by generate's deadline timer: counted as the thread's own deadline is
                self._counts["completed" if job.mailbox.expired else "cancelled"] += 1

    def _end(self, job: Job, outbox: list[Delivery], *, reason: str | None = None, text: str = "",
             error: BaseException | None = None, table_done: bool = False) -> None:
        if not table_done:
            self._table.release(job.slot)
        self._release_slot(job)
        with self._cond:
            self._counts["failed" if error is not None else "cancelled" if reason == FINISH_CANCELLED
                         else "completed"] += 1
        stats = None if error is not None else self._request_stats(job, reason)
        outbox.append(Delivery(job.mailbox, text, reason, error, stats))

    def _release_slot(self, job: Job) -> None:
        try:
            self._runner.release(job.slot)
        except Exception:  # noqa: BLE001 - a runner that cannot release still gets its slot reused by prefill
            log.exception("runner failed to release slot %d", job.slot)
        if self._kv is not None and job in self._kv:
            if self._active.get(job.slot) is job:
                # Its answer's full blocks as well as its prompt's, findable by what comes next: the same prompt
                # again (whose last block its answer filled) or the chat's next turn. A step still in flight may
                # write this slot's next position once more, into a block not cached here: harmless, since steps
                # run in order, so a later owner's writes and reads of it come after that step.
                handed = int(self._slot_tokens[job.slot])
                self._kv.commit(job, job.prompt_ids + self._outputs[job.slot, :max(0, handed - 1)].tolist())
            self._kv.release(job)
        # A job ends while decoding, while its prompt is prefilled in chunks, preempted, or in a failed prefill
        # (in none of them).
        self._active.pop(job.slot, None)
        self._prefilling.pop(job.slot, None)
        if job in self._preempted:
            self._preempted.remove(job)
        job.tokens = int(self._slot_tokens[job.slot])
        self._slot_tokens[job.slot] = 0
        self._tenancy[job.slot] += 1
        heapq.heappush(self._free_slots, job.slot)
        with self._cond:
            self._admitted -= 1

    def _request_stats(self, job: Job, reason: str | None) -> RequestStats:
        """TTFT is filled in on the event loop, where the first text is handed over."""
        duration = time.monotonic() - job.mailbox.submitted_at
        tokens = job.tokens
        return RequestStats(request_id=job.request_id, prompt_tokens=len(job.prompt_ids), tokens=tokens,
                            ttft_s=None, duration_s=duration,
                            tokens_per_s=tokens / duration if duration > 0 else 0.0,
                            finish_reason=reason or "")

    def _unserved(self, job: Job, reason: str) -> Delivery:
        """The end of a request that never got a slot."""
        return Delivery(job.mailbox, "", reason, None, self._request_stats(job, reason))

    def _abort_all(self) -> None:
        outbox: list[Delivery] = []
        for job in [*self._active.values(), *self._preempted]:
            self._end(job, outbox, reason=FINISH_CANCELLED, text=self._table.finish(job.slot, drop_incomplete=True),
                      table_done=True)
        for job in list(self._prefilling.values()):
            self._end(job, outbox, reason=FINISH_CANCELLED, text=self._finish_text(job), table_done=True)
        with self._cond:
            waiting = self._waiting.drain()
            self._counts["cancelled"] += len(waiting)
        for job in waiting:
            outbox.append(self._unserved(job, FINISH_CANCELLED))
        self._post(outbox)

    def _post(self, outbox: list[Delivery]) -> None:
        self._poster.post(outbox)


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
