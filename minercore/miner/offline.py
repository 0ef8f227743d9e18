"""What a miner or client needs when there is no chain: password-less keys and the axon info file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import bittensor as bt

INFO_KEYS = ("ip", "port", "hotkey", "coldkey", "pid")


def ensure_wallet(name: str, hotkey: str, path: str) -> bt.Wallet:
    """The wallet at ``path``/``name``/``hotkey``, creating whichever keys are missing without a password.

    Only for offline use: an unencrypted coldkey is fine for a throwaway identity, never for one holding TAO.
    """
    wallet = bt.Wallet(name=name, hotkey=hotkey, path=path)
    if not wallet.coldkeypub_file.exists_on_device():
        wallet.create_new_coldkey(use_password=False, overwrite=False, suppress=True)
    if not wallet.hotkey_file.exists_on_device():
        wallet.create_new_hotkey(use_password=False, overwrite=False, suppress=True)
    return wallet


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
