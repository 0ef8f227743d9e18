"""Device and dtype selection, CUDA branches exercised by faking torch's CUDA queries."""

import pytest
import torch

from minercore.runtime import device as dev
from minercore.runtime.device import DeviceError, select, select_device, select_dtype


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two visible GPUs: cuda:0 (capability 7.5, 2 GiB free) and cuda:1 (capability 9.0, 60 GiB free)."""
    free = {0: 2 << 30, 1: 60 << 30}
    capability = {0: (7, 5), 1: (9, 0)}

    def index(d):
        if isinstance(d, torch.device):
            return d.index or 0
        return int(d)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=0: (free[index(d)], 80 << 30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=0: capability[index(d)])
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    return free


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_a_cpu_is_bfloat16_where_the_cpu_computes_it(monkeypatch, native, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    assert select("auto", "auto") == (torch.device("cpu"), dtype)
    assert select("cpu", "float32") == (torch.device("cpu"), torch.float32)  # asked for: never overridden


def test_auto_picks_gpu_with_most_free_memory(fake_cuda):
    assert select_device("auto") == torch.device("cuda", 1)
    fake_cuda[0], fake_cuda[1] = 70 << 30, 1 << 30
    assert select_device("auto") == torch.device("cuda", 0)
    assert select_device("cuda") == torch.device("cuda", 0)


def test_auto_dtype_follows_capability(fake_cuda):
    assert select_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16
    assert select_dtype("auto", torch.device("cuda", 0)) == torch.float16
    assert select("cuda:0", "auto") == (torch.device("cuda", 0), torch.float16)


def test_explicit_cuda_index(fake_cuda):
    assert select_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"cuda:7.*available: cpu, cuda, cuda:0, cuda:1"):
        select_device("cuda:7")


def test_mps_preferred_over_cpu_when_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert select_device("auto") == torch.device("mps")
    assert select_dtype("auto", torch.device("mps")) == torch.float32


def test_unavailable_device_lists_what_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    with pytest.raises(DeviceError, match=r"'cuda' is not available here; available: cpu$"):
        select_device("cuda")
    with pytest.raises(DeviceError, match="'mps' is not available"):
        select_device("mps")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu", "cuda:-1", ""])
def test_unknown_device_is_a_clear_error(spec):
    with pytest.raises(DeviceError, match="unknown device"):
        select_device(spec)


def test_dtypes():
    cpu = torch.device("cpu")
    assert select_dtype("bfloat16", cpu) == torch.bfloat16
    assert select_dtype("FLOAT16", cpu) == torch.float16
    with pytest.raises(DeviceError, match="unknown dtype 'fp8'"):
        select_dtype("fp8", cpu)


@pytest.mark.parametrize("avx512_bf16, amx, native", [(True, False, True), (False, True, True),
                                                      (False, False, False)])
def test_native_bf16_is_what_torchs_probes_say(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(dev, "_cpuinfo_flags", lambda: {"avx512_bf16", "amx_bf16"})  # not asked: torch answers
    assert dev.cpu_has_native_bf16() is native


@pytest.mark.parametrize("flags, native", [({"avx2", "avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True),
                                           ({"avx2", "avx512f", "avx512_vnni"}, False), (set(), False)])
def test_native_bf16_falls_back_to_the_cpu_flags(monkeypatch, flags, native):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(dev, "_cpuinfo_flags", lambda: flags)
    assert dev.cpu_has_native_bf16() is native


def test_cpuinfo_flags_are_read_from_the_flags_line():
    flags = dev._cpuinfo_flags()
    assert isinstance(flags, set)
    assert all(flag and not any(c.isspace() for c in flag) for flag in flags)  # one word each (empty off Linux)


@pytest.mark.parametrize("cores, requested, threads", [(4, 0, 4), (2, 0, 2), (1, 0, 1), (4, 6, 6), (2, 1, 1)])
def test_cpu_serving_takes_every_usable_core_unless_told(monkeypatch, cores, requested, threads):
    monkeypatch.setattr(dev.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert dev.cpu_threads(requested) == threads
    assert dev.serving_threads(torch.device("cpu"), requested) == threads


def test_other_devices_keep_torchs_threads_unless_told(monkeypatch):
    monkeypatch.setattr(dev.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert dev.serving_threads(torch.device("cuda", 0)) == torch.get_num_threads()
    assert dev.serving_threads(torch.device("cuda", 0), 2) == 2


def test_configure_threads_sets_torchs_pool():
    before = torch.get_num_threads()
    try:
        assert dev.configure_threads(torch.device("cpu"), 1) == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_auto_max_batch_is_256_only_on_cuda_with_the_paged_cache():
    assert dev.auto_max_batch(torch.device("cuda", 0), paged=True) == 256
    assert dev.auto_max_batch(torch.device("cuda", 0), paged=False) == 64  # every slot's full context up front
    assert dev.auto_max_batch(torch.device("cpu"), paged=True) == 64


def test_the_auto_kv_pool_on_a_cpu_is_a_gibibyte_at_most_what_the_slots_need():
    cpu = torch.device("cpu")
    assert dev.auto_kv_pool_bytes(cpu, 10 << 30, 0.9, 1 << 20) == 1 << 30
    assert dev.auto_kv_pool_bytes(cpu, 5 << 20, 0.9, 1 << 20) == 5 << 20


def test_the_auto_kv_pool_on_cuda_is_what_the_weights_leave_up_to_the_fraction(fake_cuda, monkeypatch):
    """80 GiB devices: with 60 GiB free (20 GiB of weights) and fraction 0.9, 8 GiB stay unused: 52 GiB of pool,
    capped at what every slot needs, measured after the allocator's cache is given back; with 2 GiB free
    nothing is left, and with room for less than one full-context stream, a clear error."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    gpu = torch.device("cuda", 1)
    assert dev.auto_kv_pool_bytes(gpu, 1 << 40, 0.9, 1 << 30) == (60 << 30) - int(0.1 * (80 << 30))
    assert emptied
    assert dev.auto_kv_pool_bytes(gpu, 3 << 30, 0.9, 1 << 30) == 3 << 30
    assert dev.auto_kv_pool_bytes(gpu, 1 << 40, 1.0, 1 << 30) == 60 << 30
    with pytest.raises(DeviceError, match=r"no memory left for the KV cache.*raise kv_memory_fraction"):
        dev.auto_kv_pool_bytes(torch.device("cuda", 0), 1 << 40, 0.9, 1 << 30)
    with pytest.raises(DeviceError, match=r"short of one stream's 60.00 GiB"):
        dev.auto_kv_pool_bytes(gpu, 1 << 40, 0.9, 60 << 30)


def test_tensor_bytes_counts_a_shared_storage_once():
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head})
    model.register_buffer("scale", torch.zeros(3, dtype=torch.bfloat16))
    assert dev.tensor_bytes(model) == 10 * 4 * 4 + 3 * 2
