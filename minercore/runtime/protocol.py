"""What the engine drives: the ``Runner`` interface and ``Launched``, a decode step in flight. The concrete
runners (``native.ModelRunner``, ``hf.HFRunner``) fit it and never import each other; ``build`` constructs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

    from .sampling import SlotParams

@dataclass(frozen=True)
class Launched:
    """A decode step queued on the device: what ``Runner.launch`` returns and ``Runner.collect`` reads (the CUDA
    event and tensors it holds are opaque here)."""

    slots: np.ndarray
    host_ids: Any  # the runner's host-side result (filled once ``ready`` is set)
    ready: Any = None  # a torch.cuda.Event recorded after the device-to-host copy; None: already filled
    device_ids: Any = None  # the device tensor the copy reads, kept alive until the copy is done
    rows: Any = None  # where each slot's id sits in ``host_ids`` (None: at the slot's own index)


class Runner(Protocol):
    """What the engine drives, from one thread (its model thread; call warmup there too: CUDA graph trees
    are per thread, and a compiled CUDA runner re-warms on the first decode from another thread). Slots are
    ints in [0, max_batch), allocated lowest first so the batch bucket stays small; a runner may keep a slot's
    state in another row of its own (the native runner packs its live rows as streams end)."""

    max_batch: int
    max_context: int
    vocab_size: int
    eos_id: int
    device: torch.device
    dtype: torch.dtype
    compiled: bool
    description: str
    kind: str  # the model.backend value it serves: native or hf
    kv_cache_bytes_per_slot: int  # K and V bytes one slot holds at max_context
    weights_bytes: int  # the model's parameters and buffers, KV cache aside
    kv_bytes: int  # the KV memory it holds at most: the paged pool, or every slot at max_context

    def warmup(self) -> float:
        """Compile / warm every shape serving uses; returns (and logs) the seconds it took."""
        ...

    def prefill(self, slot: int, prompt_ids: Sequence[int], params: SlotParams) -> int:
        """Run the prompt into ``slot``'s cache; return the first new id (one host sync). ValueError for an
        empty prompt, a bad slot or ids outside the vocabulary; ContextOverflow if len >= max_context."""
        ...

    # Optional (ModelRunner has them; the engine falls back to ``prefill`` without them):
    # prefill_batch(slots, prompts, params, cached=None) -> first ids, whole prompts (or, from each one's
    # prefix-cache offset in ``cached``, their rests) in one forward, and
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
