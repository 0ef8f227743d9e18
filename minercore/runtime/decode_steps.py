"""The step functions the native runner launches, and the one place torch.compile is applied to them.

A decode step feeds every row of the batch bucket its last token and chooses the next; the static variant does
the same on fixed buffers (so a CUDA graph captured by hand replays it with nothing on the host); a verify step
checks speculative drafts in one forward. Each comes as one function per sampling kind, indexed by kind, so
each has its own dynamo cache and recompile limit.

Two scopes of compilation. ``compile_steps`` compiles whole steps (one graph per step, which is also what CUDA
graphs replay). ``compile_block_steps`` (``compile=blocks``) compiles a step's forward to its logits and the
sampler per kind apart, with the transformer block's step marked a nested compile region: inductor compiles the
block once and every layer calls that code, so the forward compiles in a fraction of a whole 30-layer step's time
(SmolLM2 on two CPU cores: about a minute cold against 13), and dynamo's guards run once per forward instead of
once per layer (RESULTS.md, start-up).
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import CachedLM, verify_positions
from .sampling import FILTER, GREEDY, SAMPLE, SlotState, slot_tokens


def step_logits(model: CachedLM, state: SlotState, b: int, ctx: int) -> tuple[Tensor, Tensor]:
    """Rows [0, b) fed their last token, attending over positions [0, ctx): their (b, V) float32 logits and
    the (b,) positions they were fed at."""
    pos = _step_positions(state, b)
    return model.decode(state.tokens[:b], pos, ctx).float(), pos


def _step_positions(state: SlotState, b: int) -> Tensor:
    """Rows [0, b)'s positions, clamped into the tables. Rows outside the step (free, or live but not in this
    step) still compute; clamping keeps a stale position inside the tables, and their cache write lands where
    their own next real token will overwrite it."""
    if b != 1:
        # All a compiled step's facts about b before its first block: dynamo must not narrow b inside a nested
        # compile region (with max_batch 2, to the constant 2), which its reuse of the region cannot follow.
        torch._check(b >= 2)
    return state.pos[:b].clamp(max=state.targets.shape[1] - 1)


def decode_step(model: CachedLM, state: SlotState, b: int, ctx: int, kind: int) -> Tensor:
    """Rows [0, b) fed their last token, attending over positions [0, ctx); returns (b,) next ids."""
    logits, pos = step_logits(model, state, b, ctx)
    return slot_tokens(logits, state, slice(0, b), pos, kind)


def _greedy_step(model: CachedLM, state: SlotState, b: int, ctx: int) -> Tensor:
    return decode_step(model, state, b, ctx, GREEDY)


def _sample_step(model: CachedLM, state: SlotState, b: int, ctx: int) -> Tensor:
    return decode_step(model, state, b, ctx, SAMPLE)


def _filter_step(model: CachedLM, state: SlotState, b: int, ctx: int) -> Tensor:
    return decode_step(model, state, b, ctx, FILTER)


STEPS = (_greedy_step, _sample_step, _filter_step)  # indexed by kind


def _choose_greedy(logits: Tensor, state: SlotState, b: int, pos: Tensor) -> Tensor:
    return slot_tokens(logits, state, slice(0, b), pos, GREEDY)


def _choose_sample(logits: Tensor, state: SlotState, b: int, pos: Tensor) -> Tensor:
    return slot_tokens(logits, state, slice(0, b), pos, SAMPLE)


def _choose_filter(logits: Tensor, state: SlotState, b: int, pos: Tensor) -> Tensor:
    return slot_tokens(logits, state, slice(0, b), pos, FILTER)


CHOOSERS = (_choose_greedy, _choose_sample, _choose_filter)  # indexed by kind


def _block_step(model: CachedLM, state: SlotState, b: int, ctx: int, *,
                logits_of: Callable[[CachedLM, SlotState, int, int], tuple[Tensor, Tensor]],
                choose: Callable[[Tensor, SlotState, int, Tensor], Tensor]) -> Tensor:
    """``decode_step`` as a compiled forward (``logits_of``) and a compiled sampler (``choose``) after it. The
    samplers take batch 1 as a batch of two (row 1's id dropped), so that each compiles one graph instead of two
    (a batch-1 specialisation): sampling is per row, and one more row costs microseconds."""
    logits, pos = logits_of(model, state, b, ctx)
    if b == 1 and state.tokens.shape[0] > 1:
        return choose(F.pad(logits, (0, 0, 0, 1)), state, 2, F.pad(pos, (0, 1)))[:1]
    return choose(logits, state, b, pos)


def _static_step(model: CachedLM, state: SlotState, sampled: Tensor, b: int, ctx: int, kind: int) -> None:
    """The whole step on fixed buffers, so a CUDA graph can replay it with no work on the host: rows [0, b)
    read their fed token and position from ``state``, the ids land in ``sampled[:b]``, and the active rows
    advance (token and position) in place."""
    ids = decode_step(model, state, b, ctx, kind)
    active = state.active[:b]
    state.tokens[:b] = torch.where(active, ids, state.tokens[:b])
    state.pos[:b] += active
    sampled[:b] = ids


def _static_greedy(model: CachedLM, state: SlotState, sampled: Tensor, b: int, ctx: int) -> None:
    _static_step(model, state, sampled, b, ctx, GREEDY)


def _static_sample(model: CachedLM, state: SlotState, sampled: Tensor, b: int, ctx: int) -> None:
    _static_step(model, state, sampled, b, ctx, SAMPLE)


def _static_filter(model: CachedLM, state: SlotState, sampled: Tensor, b: int, ctx: int) -> None:
    _static_step(model, state, sampled, b, ctx, FILTER)


STATIC_STEPS = (_static_greedy, _static_sample, _static_filter)  # indexed by kind


def verify_logits(model: CachedLM, state: SlotState, drafts: Tensor, b: int, ctx: int) -> tuple[Tensor, Tensor]:
    """Rows [0, b) fed their last token and their (b, k) ``drafts``, attending over [0, ctx): their
    (b, k + 1, V) float32 logits and the (b,) positions of their first tokens."""
    pos = _step_positions(state, b)
    tokens = torch.cat((state.tokens[:b, None], drafts), dim=1)
    return model.verify(tokens, pos, ctx).float(), pos


def _verify_step(model: CachedLM, state: SlotState, drafts: Tensor, lengths: Tensor, b: int, ctx: int,
                 kind: int, logits_of: Callable[[CachedLM, SlotState, Tensor, int, int], tuple[Tensor, Tensor]]
                 = verify_logits) -> tuple[Tensor, Tensor]:
    """Rows [0, b) fed their last token and their ``drafts`` ((b, k) ids, the first ``lengths[i]`` of row i
    real) in one forward: (b, k + 1) ids chosen at each position, and how many of them each row emits (its
    drafts up to the first the model disagrees with, plus the model's own id there). The ids are those plain
    decoding would choose one step at a time: the same sampling rule at the same positions (the noise is keyed
    by position). Active rows advance by what they emit; rejected positions stay in the cache unread, and are
    overwritten when the stream reaches them. ``logits_of`` computes the forward (compiled apart in
    ``compile_block_steps``)."""
    t = drafts.shape[1] + 1
    logits, pos = logits_of(model, state, drafts, b, ctx)
    at = verify_positions(pos, t)
    rows = torch.arange(b, device=pos.device).repeat_interleave(t)
    chosen = slot_tokens(logits.view(b * t, -1), state, rows, at.reshape(-1), kind).view(b, t)
    real = torch.arange(t - 1, device=pos.device) < lengths[:, None]
    agreed = ((chosen[:, :-1] == drafts) & real).long().cumprod(dim=1).sum(dim=1)
    active = state.active[:b]
    state.tokens[:b] = torch.where(active, chosen.gather(1, agreed[:, None])[:, 0], state.tokens[:b])
    emitted = agreed + 1
    state.pos[:b] += torch.where(active, emitted, 0)
    return chosen, emitted


def _verify_greedy(model: CachedLM, state: SlotState, drafts: Tensor, lengths: Tensor, b: int,
                   ctx: int) -> tuple[Tensor, Tensor]:
    return _verify_step(model, state, drafts, lengths, b, ctx, GREEDY)


def _verify_sample(model: CachedLM, state: SlotState, drafts: Tensor, lengths: Tensor, b: int,
                   ctx: int) -> tuple[Tensor, Tensor]:
    return _verify_step(model, state, drafts, lengths, b, ctx, SAMPLE)


def _verify_filter(model: CachedLM, state: SlotState, drafts: Tensor, lengths: Tensor, b: int,
                   ctx: int) -> tuple[Tensor, Tensor]:
    return _verify_step(model, state, drafts, lengths, b, ctx, FILTER)


VERIFY_STEPS = (_verify_greedy, _verify_sample, _verify_filter)  # indexed by kind


def compile_steps(device: torch.device, graphs: str, recompile_limit: int) -> tuple:
    """The decode steps, compiled: the only torch.compile in minercore's native path.

    ``graphs="manual"``: the static steps with ``dynamic=False`` and no CUDA graphs of inductor's own; one
    graph per (batch bucket, context bucket) and kind, all compiled by ``warmup`` (the runner raises dynamo's
    recompile limit to fit them) and then captured by hand on CUDA.

    Otherwise ``dynamic=True``: one graph covers the batch and context buckets instead of one inductor compile
    per pair; dynamo still specialises batch 1, so two graphs per sampling kind, both compiled by ``warmup``
    (the cache's spare position keeps the full-context bucket in the dynamic graph). One function per kind
    gives each its own dynamo cache and recompile limit. That cache is per function, not per runner, and
    cache shapes are static: each further runner configuration (max_batch, max_context, dtype, model) in
    the same process adds graphs to it, so each compiled runner raises the limit by what it may add
    (``make_room_for``). With ``graphs="torch"`` on CUDA, reduce-overhead records a CUDA
    graph per distinct shape; the caller clones the output before the next replay.
    """
    # Where torch.compile takes the limit itself (2.13), dynamo applies it during each compile of these steps,
    # on whichever thread compiles; older torch reads the config warmup raises on its own thread.
    limit = {"recompile_limit": recompile_limit} if _PER_CALL_LIMIT else {}
    if graphs == "manual":
        return tuple(torch.compile(step, fullgraph=True, dynamic=False, **limit) for step in STATIC_STEPS)
    mode = "reduce-overhead" if device.type == "cuda" and graphs == "torch" else None
    return tuple(torch.compile(step, fullgraph=True, dynamic=True, mode=mode, **limit) for step in STEPS)


def compile_block_steps(model: CachedLM, recompile_limit: int) -> tuple[tuple, tuple]:
    """The decode steps and the verify steps (each indexed by kind) with the forwards compiled (``dynamic=True``)
    and ``model``'s blocks marked one nested compile region, the samplers compiled apart, the rest eager.

    Each block's ``step`` becomes its class's step wrapped once by ``torch.compiler.nested_compile_region``, so
    every layer reuses the code compiled for the first. The forwards are compiled once for all sampling kinds:
    the decode forward (batch 1 and larger batches) and the verify forward (its widths). The samplers are one per
    kind: the sampled kinds' vocabulary passes cost more than the rest of the glue. Blocks already marked (the
    model of an earlier runner) are left as they are. Floats the blocks read (norm epsilons) are specialised: a
    nested region takes tensors and integers only."""
    limit = {"recompile_limit": recompile_limit} if _PER_CALL_LIMIT else {}
    for block in model.blocks:
        block.__class__ = _regional(type(block))
        block.region_key = _structure(block)
        for module in block.modules():
            if type(module) is nn.Linear and module.bias is not None:
                module.__class__ = _FlatLinear

    def compiled(fn: Callable, **options: Any) -> Callable:
        return _specialising_floats(torch.compile(fn, fullgraph=True, dynamic=True, **options, **limit))

    # The forwards' guards on the model's modules and weights (dynamo checks each of them on every call, about
    # 0.5 ms a step for SmolLM2's 30 layers) are left out: each runner compiles its own copy of the forwards'
    # code, so its graphs are only ever called with its own model, whose modules do not change once built. For
    # the same reason inductor's checks of every input's sizes and strides, and of each custom op's output, are
    # left out of the forwards: a dozen a block, each a Python call (about 0.5 ms a step for SmolLM2).
    unguarded = {"options": {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                             "size_asserts": False, "alignment_asserts": False}}
    logits_of = compiled(_own_code(step_logits), **unguarded)
    verify_logits_of = compiled(_own_code(verify_logits), **unguarded)
    steps = tuple(functools.partial(_block_step, logits_of=logits_of, choose=compiled(choose))
                  for choose in CHOOSERS)
    verify_steps = tuple(functools.partial(_verify_step, kind=kind, logits_of=verify_logits_of)
                         for kind in (GREEDY, SAMPLE, FILTER))
    return steps, verify_steps


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own: dynamo keeps its compiled graphs per code object, so a function
    compiled through this copy shares no graphs (and no recompile limit) with other compiles of ``fn``."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__, copy.__doc__ = fn.__qualname__, fn.__doc__
    return copy


@functools.cache
def _regional(block_class: type) -> type:
    """``block_class`` with its ``step`` one nested compile region. A subclass, so that dynamo calls the region as
    each block's method (a region bound to an instance would be traced with the first block's weights)."""
    if getattr(block_class, "regional", False):
        return block_class
    keyed = {"reuse_hash_fn": _region_key} if _REUSE_BY_KEY else {}
    return type(block_class.__name__, (block_class,), {
        "step": torch.compiler.nested_compile_region(block_class.step, **keyed), "regional": True,
        "__module__": block_class.__module__, "__qualname__": block_class.__qualname__})


def _structure(block: nn.Module) -> int:
    """A key equal for blocks that trace to the same graph: their modules' kinds, their plain settings (sizes,
    epsilons, flags such as an int4 layer's ``rows_kernel``) and their tensors' shapes, strides, dtypes and
    devices (a layer left unquantized, or quantized differently, gives another key)."""
    plain = (int, float, bool, str, type(None))
    parts = []
    for name, module in block.named_modules():
        settings = tuple(sorted((k, v) for k, v in vars(module).items() if isinstance(v, plain)))
        tensors = tuple((n, tuple(t.shape), t.stride(), str(t.dtype), str(t.device)) for n, t in
                        (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
                        if t is not None)
        parts.append((name, type(module).__qualname__, settings, tensors))
    return hash(tuple(parts))


def _region_key(block: nn.Module, *args: Any, **kwargs: Any) -> int:
    """The nested region's reuse key (``reuse_hash_fn``): dynamo reuses a traced block for every block with the
    same key without comparing their inputs' guards one by one (SmolLM2 on two cores: 0.9 s of a 13.6 s warm
    start, RESULTS.md). The inputs' shapes need no part in it: within a forward every block gets the same ones."""
    return block.region_key


class _FlatLinear(nn.Linear):
    """``nn.Linear`` on the input flattened to two dimensions, the product aten's linear computes for a 3-D input
    with a bias. aten's linear flattens it with integer sizes, which inside a nested compile region that writes
    the cache pins the batch size (torch 2.13: a recompile per batch size); this flattening keeps it a symbol."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).view(*x.shape[:-1], -1)


def _specialising_floats(compiled: Callable) -> Callable:
    """``compiled``, called with dynamo's ``specialize_float`` on in the calling thread (dynamo's config is per
    thread, and a compile happens on whichever thread calls): a float input would otherwise become a symbol,
    which a nested compile region cannot take. Set and left on, as patching it per call costs 0.1 ms."""
    config: Any = torch._dynamo.config

    @functools.wraps(compiled)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not config.specialize_float:
            config.specialize_float = True
        return compiled(*args, **kwargs)
    return call


def compile_verify_steps(recompile_limit: int) -> tuple:
    """The speculative verify steps, compiled with ``dynamic=True`` and no CUDA graphs of their own (their one
    width, k + 1, is static; batch and context vary as in the decode steps); warmup runs their shapes. CUDA
    only (see ``ModelRunner.__init__``)."""
    limit = {"recompile_limit": recompile_limit} if _PER_CALL_LIMIT else {}
    return tuple(torch.compile(step, fullgraph=True, dynamic=True, **limit) for step in VERIFY_STEPS)


_PER_CALL_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters
# Older torch has nested compile regions without reuse by key: dynamo then compares each block's guards.
_REUSE_BY_KEY = (hasattr(torch.compiler, "nested_compile_region")
                 and "reuse_hash_fn" in inspect.signature(torch.compiler.nested_compile_region).parameters)


_graphs_compiled = 0  # graphs every compiled runner in this process may add to a step function's dynamo cache


def make_room_for(graphs: int) -> int:
    """The recompile limit a new runner's steps need. Dynamo's cache is per step function, shared by every runner
    in the process, and with ``fullgraph=True`` a step past its recompile limit (8 by default) fails instead of
    falling back to eager: each runner adds what it may compile (as SGLang raises the limit for its per-batch-size
    graphs), so a process building several runners (tests, benchmarks, a server reloading its model) keeps
    compiling."""
    global _graphs_compiled
    _graphs_compiled += graphs
    return _graphs_compiled + 8


def raise_recompile_limit(needed: int) -> None:
    """On the calling thread: torch's dynamo config is thread-local (2.13), and the engine compiles on its model
    thread, not on the thread that built the runner."""
    config: Any = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), needed))
            break
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * needed)
