"""The install: the compiled stream loop, the pure-Python fallback and the ``info`` report."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INFO_KEYS = {"version", "stream_loop", "torch", "cuda_available", "device", "dtype", "bittensor", "tokenizer",
             "vocab_size", "cpu_native_bf16", "quant", "quant_kernel_dtype", "cpu_kernels", "int8_rows_vnni",
             "activations", "frame_chunks"}


def run_info(**env):
    out = subprocess.run([sys.executable, "-m", "minercore", "info"], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, cwd=ROOT)
    return json.loads(out.stdout)


def test_info_reports_compiled_loop():
    report = run_info(MINERCORE_NO_EXTENSIONS="")
    assert report.keys() >= INFO_KEYS
    assert report["stream_loop"] == "cython"
    assert report["vocab_size"] == 50257
    assert report["bittensor"] == importlib.metadata.version("bittensor")  # 11.x by default, 10.x with [bt10]
    import torch

    assert report["cuda_available"] == torch.cuda.is_available()
    assert report["device"] == ("cpu" if not torch.cuda.is_available() else report["device"])


def test_no_extensions_at_run_time_forces_the_twin():
    assert run_info(MINERCORE_NO_EXTENSIONS="1")["stream_loop"] == "python"


def test_import_site_choice(monkeypatch):
    import importlib

    import minercore.text.streamloop as streamloop

    monkeypatch.setenv("MINERCORE_NO_EXTENSIONS", "1")
    forced = importlib.reload(streamloop)
    assert forced.IMPLEMENTATION == "python"
    from minercore.text import _streamloop_py

    assert forced.StreamTable is _streamloop_py.StreamTable
    monkeypatch.delenv("MINERCORE_NO_EXTENSIONS")
    compiled = importlib.reload(streamloop)
    assert compiled.IMPLEMENTATION == "cython"


def test_import_error_falls_back_with_one_warning(monkeypatch, caplog):
    import importlib

    import minercore.text.streamloop as streamloop

    monkeypatch.delenv("MINERCORE_NO_EXTENSIONS", raising=False)
    monkeypatch.setitem(sys.modules, "minercore.text._streamloop_c", None)  # makes the import raise ImportError
    with caplog.at_level("WARNING", logger="minercore.text.streamloop"):
        fallen = importlib.reload(streamloop)
    assert fallen.IMPLEMENTATION == "python"
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    monkeypatch.undo()
    importlib.reload(streamloop)


def test_info_rejects_unknown_device():
    out = subprocess.run([sys.executable, "-m", "minercore", "info", "--device", "tpu"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "unknown device 'tpu'" in out.stderr


def _install_to(target: Path, **env) -> subprocess.CompletedProcess:
    """pip-install a clean copy of the sources (no build/ cache, no in-place .so), as from a fresh clone."""
    source = target.parent / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "csrc", source / "csrc", ignore=shutil.ignore_patterns("*.c"))
    shutil.copytree(ROOT / "minercore", source / "minercore", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(source)], capture_output=True, text=True, env={**os.environ, **env}, cwd=target.parent, timeout=300)


@pytest.mark.parametrize("how", ["env", "compiler-fails"])
def test_pure_python_install(tmp_path, how):
    env = {"MINERCORE_NO_EXTENSIONS": "1"} if how == "env" else {"MINERCORE_NO_EXTENSIONS": "", "CC": "false"}
    result = _install_to(tmp_path / "site", **env)
    assert result.returncode == 0, result.stderr
    assert "installing the pure-Python twin" in result.stdout + result.stderr
    installed = tmp_path / "site" / "minercore" / "text"
    assert (installed / "_streamloop_py.py").exists()
    assert not list(installed.glob("_streamloop_c*.so"))


def test_info_reports_the_quantized_kernels_dtype():
    from minercore.__main__ import info
    from minercore.runtime.device import cpu_has_native_bf16

    report = info(device="cpu", dtype="float32", quant="int4")
    assert (report["quant"], report["quant_kernel_dtype"]) == ("int4", "bfloat16")  # the CPU kernels' fast path
    assert report["cpu_native_bf16"] is cpu_has_native_bf16()
    assert info(device="cpu")["quant_kernel_dtype"] is None


def test_info_lists_the_cpu_kernels_and_what_activations_auto_gives() -> None:
    from minercore.__main__ import info
    from minercore.models import block_step, q4_i8_rows, q4_rows, q8_i8_rows, step_attention

    report = info(device="cpu", dtype="float32")
    kernels = report["cpu_kernels"]
    assert set(kernels) == {"q4_rows", "q8_rows", "q4_i8_rows", "q8_i8_rows", "int4_rows", "step_attention",
                            "block_step"}
    assert kernels["block_step"] is block_step.AVAILABLE
    assert (kernels["q4_rows"], kernels["step_attention"]) == (q4_rows.AVAILABLE, step_attention.AVAILABLE)
    assert report["int8_rows_vnni"] is (q4_i8_rows.VNNI and q8_i8_rows.VNNI)
    assert report["activations"] == ("int8" if q4_i8_rows.AVAILABLE and step_attention.AVAILABLE else "float")
    assert info(device="cpu", dtype="bfloat16")["activations"] == "float"  # the int8-row kernels take float32
    out = subprocess.run([sys.executable, "-m", "minercore", "info", "--quant", "int3"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 2 and "quant must be one of auto, none, int8, int4" in out.stderr
