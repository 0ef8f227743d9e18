"""Static decode steps captured by hand into CUDA graphs (``graphs="manual"`` on CUDA), as SGLang and vLLM do.

One graph per (batch bucket, context bucket, sampling kind); a step is then one ``replay()`` with nothing on the
host in between. The steps read and write fixed buffers (``decode_steps.STATIC_STEPS``), so a replay needs no
inputs copied in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..models.base import CachedLM
from .sampling import SlotState


class CapturedGraphs:
    """The captured graphs of one runner, keyed by (batch, context, kind)."""

    def __init__(self) -> None:
        self._graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, b: int, ctx: int, kind: int) -> torch.cuda.CUDAGraph | None:
        return self._graphs.get((b, ctx, kind))

    def capture(self, steps: Sequence[Callable[..., None]], model: CachedLM, state: SlotState, sampled: Tensor,
                shapes: Sequence[tuple[int, int]], kinds: Sequence[int], device: torch.device) -> None:
        """Compile and warm every static step on a side stream (capture needs kernels already loaded and
        autotuned), then capture each once, largest batch first, into one shared memory pool: only one graph
        runs at a time, so they can share their intermediates' memory. ``steps`` is indexed by kind."""
        self._graphs.clear()
        keys = [(b, ctx, kind) for kind in kinds for b, ctx in sorted(shapes, reverse=True)]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for b, ctx, kind in keys:
                for _ in range(2):
                    steps[kind](model, state, sampled, b, ctx)
        torch.cuda.current_stream(device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for b, ctx, kind in keys:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                steps[kind](model, state, sampled, b, ctx)
            self._graphs[(b, ctx, kind)] = graph
