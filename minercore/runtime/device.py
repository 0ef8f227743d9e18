"""Device and dtype selection: ``auto`` prefers the CUDA GPU with the most free memory, then MPS, then CPU."""

from __future__ import annotations

import gc
import os
import re

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ValueError):
    """The requested device or dtype does not exist or is not usable on this machine."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Every device name ``select_device`` accepts on this machine, ``cpu`` first."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names.append("cuda")
        names.extend(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    if _mps_available():
        names.append("mps")
    return names


def _cuda_with_most_free_memory() -> torch.device:
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    return torch.device("cuda", max(range(len(free)), key=free.__getitem__))


def select_device(spec: str = "auto") -> torch.device:
    """Resolve ``auto|cpu|cuda|cuda:N|mps`` to a usable ``torch.device`` or raise ``DeviceError``."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return _cuda_with_most_free_memory()
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = available_devices()
    unavailable = DeviceError(f"device {spec!r} is not available here; available: {', '.join(available)}")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise unavailable
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise DeviceError(f"unknown device {spec!r}; expected auto, cpu, cuda, cuda:N or mps; available: "
                          f"{', '.join(available)}")
    if not torch.cuda.is_available():
        raise unavailable
    if match.group(1) is None:
        return _cuda_with_most_free_memory()
    index = int(match.group(1))
    if index >= torch.cuda.device_count():
        raise unavailable
    return torch.device("cuda", index)


def _cpuinfo_flags() -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (Linux); empty where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX tiles), where torch's bfloat16
    matmuls run at about twice the float32 rate (notes/real-model.md); elsewhere bfloat16 is converted in software,
    for little or no gain. Asked of torch (the probes its kernels dispatch on), else of /proc/cpuinfo."""
    cpu = torch.cpu
    probes = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(probe) for probe in probes):
        return any(probe() for probe in probes)
    return bool(_cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})


def select_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA capability >= 8.0, float16 on older CUDA, bfloat16 on a CPU that computes it
    natively (``cpu_has_native_bf16``), float32 elsewhere."""
    spec = spec.strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            major, _ = torch.cuda.get_device_capability(device)
            return torch.bfloat16 if major >= 8 else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise DeviceError(f"unknown dtype {spec!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads(requested: int = 0) -> int:
    """torch's intra-op threads for serving on a CPU: ``requested``, or with 0 every usable core, as llama.cpp
    serves. The event loop that streams every answer and holds every deadline takes its turns on them: it
    needs little CPU, and OpenMP's threads yield theirs between kernels once they have spun a while. (One core
    fewer was measured faster only while the model was built on a second thread, whose own OpenMP workers made
    the model thread's sleep between kernels: benchmarks/RESULTS.md.)"""
    return requested if requested > 0 else usable_cores()


def serving_threads(device: torch.device, requested: int = 0) -> int:
    """The intra-op threads serving on ``device`` uses: ``cpu_threads`` on a CPU; elsewhere ``requested``, or
    torch's default (the host only launches work there)."""
    if device.type == "cpu" or requested > 0:
        return cpu_threads(requested)
    return torch.get_num_threads()


def configure_threads(device: torch.device, requested: int = 0) -> int:
    """Set torch's intra-op threads to ``serving_threads`` and return them. Process-wide: call before the model
    runs."""
    threads = serving_threads(device, requested)
    torch.set_num_threads(threads)
    return threads


def select(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The (device, dtype) pair every model in minercore runs on."""
    chosen = select_device(device)
    return chosen, select_dtype(dtype, chosen)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each storage counted once (a tied head shares its
    embedding's)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*module.parameters(), *module.buffers())}
    return sum(storages.values())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Streams decoded together when max_batch is 0 (auto). A GPU's step at batch 1 to a few hundred costs about the
# same (reading the weights; notes/gpu.md), so the paged cache, whose memory follows the tokens in use, serves as
# many as validators send; a cache that reserves every slot's full context up front (static, or transformers'
# own, growing per request) keeps 64, as does a CPU, whose step's cost grows with the batch.
CUDA_AUTO_MAX_BATCH = 256
AUTO_MAX_BATCH = 64
# The paged pool when kv_cache_gb is 0 (auto): on a CPU a fixed size that fits a small machine beside the model
# (SmolLM2 in bfloat16: 46,000 positions); on CUDA what is free once the weights are loaded, down to leaving
# (1 - kv_memory_fraction) of the device's memory for activations, CUDA graphs and the allocator's slack.
CPU_AUTO_KV_BYTES = 2**30


def auto_max_batch(device: torch.device, paged: bool) -> int:
    """``max_batch`` 0 on ``device``; ``paged``: the native runner's paged KV cache holds the streams."""
    return CUDA_AUTO_MAX_BATCH if device.type == "cuda" and paged else AUTO_MAX_BATCH


def auto_kv_pool_bytes(device: torch.device, needed: int, memory_fraction: float, stream: int) -> int:
    """The paged pool's bytes when none were asked for: at most ``needed`` (every slot at its full context, the
    most the streams can use at once); on CUDA the memory free now (weights loaded, the allocator's cache given
    back) less the share of the device's memory ``memory_fraction`` leaves unused, on a CPU
    ``CPU_AUTO_KV_BYTES``. Raises ``DeviceError`` where a CUDA device has no room for one stream at its full
    context (``stream`` bytes): every longer request would otherwise be refused."""
    if device.type != "cuda":
        return min(needed, CPU_AUTO_KV_BYTES)
    gc.collect()
    torch.cuda.empty_cache()  # memory freed while loading the weights is the pool's too
    free, total = torch.cuda.mem_get_info(device)
    room = int(free - (1.0 - memory_fraction) * total)
    if room < stream:
        raise DeviceError(f"{device}: no memory left for the KV cache ({free / 2**30:.1f} of {total / 2**30:.1f} GiB "
                          f"free with the weights loaded, and kv_memory_fraction {memory_fraction} leaves "
                          f"{1 - memory_fraction:.0%} of it unused, short of one stream's {stream / 2**30:.2f} "
                          f"GiB): raise kv_memory_fraction, quantize the weights, lower max_context or set "
                          f"kv_cache_gb")
    return min(needed, room)
