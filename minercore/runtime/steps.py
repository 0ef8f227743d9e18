"""A decode step in flight: what ``Runner.launch`` returns and ``Runner.collect`` reads. Shared by every runner
and the engine; torch-free (the CUDA event and tensors it holds are opaque here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Launched:
    """A decode step queued on the device, for ``Runner.collect``."""

    slots: np.ndarray
    host_ids: Any  # the runner's host-side result (filled once ``ready`` is set)
    ready: Any = None  # a torch.cuda.Event recorded after the device-to-host copy; None: already filled
    device_ids: Any = None  # the device tensor the copy reads, kept alive until the copy is done
