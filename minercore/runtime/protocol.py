"""What the engine drives (the ``Runner`` interface) and the factory that picks one for ``ModelOptions.backend``.

The concrete runners (``runner.ModelRunner``, ``hf_runner.HFRunner``) import torch and are loaded only when
built, so importing this module costs nothing; neither runner imports the other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ..contract.config import NATIVE_BACKENDS, NATIVE_MODEL_TYPES

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..contract.config import ModelOptions
    from .sampling import SlotParams
    from .steps import Launched

log = logging.getLogger(__name__)


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

    def launch(self, slots: np.ndarray) -> Launched:
        """Queue one step for the given prefilled slots (int64, any order): each slot's last id in, its next
        id sampled on the device. May return before the device is done; ``collect`` gives the ids. At most
        one launched step may be left uncollected when the next is launched (the engine's one step of
        lookahead), and steps are collected in launch order. The caller bounds max_new_tokens by
        max_context - prompt_len; past that, ContextOverflow. Prefill and release may come between a launch
        and its collect: the device runs them in order, after the launched step."""
        ...

    def collect(self, step: Launched) -> np.ndarray:
        """The launched step's ids (int64, aligned with its ``slots``); waits for the device if needed."""
        ...

    def decode(self, slots: np.ndarray) -> np.ndarray:
        """``collect(launch(slots))``: one synchronous step."""
        ...

    def release(self, slot: int) -> None:
        """The slot is free; the next prefill overwrites its cache."""
        ...


def build_runner(options: ModelOptions, *, max_batch: int, eos_id: int, stop_ids: Sequence[int] = ()) -> Runner:
    """The runner for ``options.backend``: ``native`` (alias ``simulated``: GPT-2 and the Llama family, compiled,
    one batched decode loop) or ``hf`` (any causal LM directory, eager). ``stop_ids`` (default: ``eos_id``) are
    the ids a row's ``SlotParams.min_new`` keeps from being sampled. A native ``path`` of an architecture
    without a native implementation goes to hf, with a log line."""
    from .device import configure_threads, select_device

    # Before any model work: torch's thread pool takes its size when a thread first runs a parallel op.
    configure_threads(select_device(options.device), options.threads)
    backend = options.backend
    if backend in NATIVE_BACKENDS and options.path:
        from ..models.loading import inspect

        checkpoint = inspect(options.path)
        if not checkpoint.native:
            log.warning("%s: %r has no native implementation (a %s checkpoint; native serves %s); using the hf "
                        "backend (eager, one forward per stream per step)", options.path, checkpoint.architecture,
                        checkpoint.format, ", ".join(NATIVE_MODEL_TYPES))
            backend = "hf"
    if backend in NATIVE_BACKENDS:
        from .native import build_model_runner

        return build_model_runner(options, max_batch=max_batch, eos_id=eos_id, stop_ids=stop_ids)
    if backend == "hf":
        from .hf import HFRunner

        return HFRunner.from_options(options, max_batch=max_batch, eos_id=eos_id, stop_ids=stop_ids)
    raise ValueError(f"backend must be native (or simulated) or hf, got {options.backend!r}")
