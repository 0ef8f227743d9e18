"""Device and dtype selection: ``auto`` prefers the CUDA GPU with the most free memory, then MPS, then CPU."""

from __future__ import annotations

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


def select(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The (device, dtype) pair every model in minercore runs on."""
    chosen = select_device(device)
    return chosen, select_dtype(dtype, chosen)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
