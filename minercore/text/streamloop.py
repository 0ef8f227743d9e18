"""The one import site of the stream loop: the compiled module when importable, else its pure-Python twin.

``MINERCORE_NO_EXTENSIONS=1`` at run time forces the twin (as ``YARL_NO_EXTENSIONS`` does for yarl).
"""

from __future__ import annotations

import logging
import os

NO_EXTENSIONS = os.environ.get("MINERCORE_NO_EXTENSIONS", "") not in ("", "0")

if NO_EXTENSIONS:
    from ._streamloop_py import FINISH_REASONS, StreamTable

    IMPLEMENTATION = "python"
else:
    try:
        from ._streamloop_c import FINISH_REASONS, StreamTable

        IMPLEMENTATION = "cython"
    except ImportError as exc:
        logging.getLogger(__name__).warning(
            "compiled stream loop unavailable (%s); using the pure-Python twin", exc)
        from ._streamloop_py import FINISH_REASONS, StreamTable

        IMPLEMENTATION = "python"

__all__ = ["FINISH_REASONS", "IMPLEMENTATION", "StreamTable"]
