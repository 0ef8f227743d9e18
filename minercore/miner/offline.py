"""The axon info file: where a listening miner tells local clients its address and identity.
(Password-less offline keys: ``sdk.ensure_wallet``.)"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

INFO_KEYS = ("ip", "port", "hotkey", "coldkey", "pid")


def write_axon_info(path: str | os.PathLike[str], info: dict[str, Any]) -> None:
    """Write ``info`` as JSON atomically, so a reader polling for the file never sees half of it."""
    missing = [key for key in INFO_KEYS if key not in info]
    if missing:
        raise ValueError(f"axon info lacks {', '.join(missing)}")
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def read_axon_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(Path(path).expanduser(), encoding="utf-8") as handle:
        info = json.load(handle)
    missing = [key for key in INFO_KEYS if key not in info]
    if missing:
        raise ValueError(f"{path} is not an axon info file: it lacks {', '.join(missing)}")
    return info
