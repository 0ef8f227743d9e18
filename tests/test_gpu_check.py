"""scripts/gpu_check.sh --smoke on the CPU: the device check runs end to end and writes the results schema the
GPU run is read by, so the script cannot rot between GPU runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_gpu_check_smoke_writes_the_results_schema(tmp_path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=590)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((tmp_path / "gpu-results.json").read_text(encoding="utf-8"))

    assert results["device"] == "CPU" and results["smoke"] is True
    assert results["torch"] and results["date"] and results["command"] == "bash scripts/gpu_check.sh --smoke"
    assert set(results["phases"]) == {"kv", "decode", "correctness", "engine", "hf", "variants", "llama", "gguf",
                                      "quant", "speculative", "paged", "int4_rows", "gguf_rows"}
    assert all(phase["status"] == "ok" for phase in results["phases"].values()), results["phases"]
    assert not results.get("errors"), results["errors"]

    checks = results["correctness"]
    assert checks and all(isinstance(ok, bool) for ok in checks.values())
    assert all(checks.values()), {name for name, ok in checks.items() if not ok}
    assert any(name.startswith("cached decode == full recompute (bfloat16") for name in checks)
    assert any(name.startswith("minercore == Hugging Face generate") for name in checks)

    decode = results["decode"]
    assert {row["impl"] for row in decode} == {"minercore", "hf-static", "hf-eager"}
    for impl in ("minercore", "hf-static", "hf-eager"):
        assert {row["batch"] for row in decode if row["impl"] == impl} == {1, 2}
    assert all(isinstance(row["tokens_per_s"], float) and row["tokens_per_s"] > 0 for row in decode)
    assert {row["variant"] for row in decode if row["impl"] == "minercore"} >= {
        "manual/masked/eager", "off/bucketed/eager", "off/bucketed/compiled blocks"}

    engine = results["engine"]
    assert [row["streams"] for row in engine] == [2, 4]

    from minercore.models import int4_rows
    assert results["int4_rows"]["available"] == int4_rows.AVAILABLE
    if int4_rows.AVAILABLE:  # timed at two row counts, and bit-identical to torch's kernel
        assert [(row["rows"], row["identical"]) for row in results["int4_rows_layer"]] == [(8, True), (64, True)]
    from minercore.models import q4_rows
    assert results["gguf_rows"]["q4_available"] == q4_rows.AVAILABLE
    if q4_rows.AVAILABLE:  # timed at two row counts, every row in the batch equal to it alone
        assert [(row["rows"], row["batch_independent"]) for row in results["gguf_rows_layer"]] == [(1, True),
                                                                                                    (8, True)]
        assert all(row["q4_us"] > 0 and row["int4_us"] > 0 and row["q4_int8_rows_us"] > 0
                   and row["q8_int8_rows_head_us"] > 0 and row["step_attention_us"] > 0
                   and row["sdpa_attention_us"] > 0 for row in results["gguf_rows_layer"])
    assert all(row["engine_tokens_per_s"] > 0 and row["raw_tokens_per_s"] > 0 for row in engine)
    assert all(row["tokens"] == row["expected_tokens"] for row in engine)

    kv = results["kv_bytes_per_slot"]
    assert isinstance(kv["measured"], int) and isinstance(kv["formula"], int)
    assert kv["formula"] <= kv["measured"] <= 1.02 * kv["formula"]

    quant = results["quant_decode"]
    assert {(row["mode"], row["batch"]) for row in quant} == {(m, b) for m in ("none", "int8", "int4") for b in (1, 2)}
    assert all(row["tokens_per_s"] > 0 and row["read_limit_tok_s"] > 0 for row in quant)
    bytes_of = {row["mode"]: row["weight_bytes"] for row in quant}
    assert bytes_of["int4"] < bytes_of["int8"] < bytes_of["none"]
    assert set(results["quant"]["over_bf16"]) == {f"{m} batch {b}" for m in ("none", "int8", "int4") for b in (1, 2)}
    layers = results["quant_layers"]
    assert {row["mode"] for row in layers} == {"int8", "int4", "int4 Q4_1 blocks"} and len(layers) == 15
    assert any(name.startswith("quant int4 Q4_1 blocks lm_head") for name in checks)

    speculative = results["speculative"]
    assert [row["batch"] for row in speculative["rows"]] == [1, 2]
    assert all(0.5 <= row["agreement"] <= 1.0 and row["tokens_per_s_verified"] > 0 for row in speculative["rows"])

    paged = results["paged"]
    assert [row["batch"] for row in paged["decode"]] == [2, 4]
    assert all(row["agreement"] == 1.0 and row["tokens_per_s_paged"] > 0 for row in paged["decode"])
    assert paged["pack"]["agreement"] == 1.0 and paged["pack"]["moved_step_ms"] > 0
    hit = paged["hits"]
    assert hit["cached_positions"] == 32 and hit["same_first_ids"] == 1.0
    assert hit["together_ms"] > 0 and hit["one_by_one_ms"] > 0
    repeated = paged["repeats"]
    # Prompts of 45-48 tokens asked again: everything but the last token found, through a copy of the last block.
    assert repeated["cached_positions"] == [44, 47] and repeated["same_first_ids"] == 1.0
    assert repeated["inside_blocks_ms"] > 0 and repeated["whole_blocks_ms"] > 0
    resumed = paged["resume"]
    assert resumed["same_next_id_full"] and resumed["same_next_id_cached"]
    assert 0 < resumed["cached_positions"] < resumed["positions"] and resumed["resume_cached_ms"] > 0
    room = paged["capacity"]
    assert room["paged_streams_of_32"] > room["paged_streams_of_128"] >= room["static_slots_of_max_context"] > 0

    assert "one decode step" in (tmp_path / "profile.txt").read_text(encoding="utf-8")
    log = (tmp_path / "gpu-check.log").read_text(encoding="utf-8")
    assert "stream loop:" in log and "== engine ==" in log and "checks:" in log


def test_a_failing_variant_is_recorded_and_fails_the_summary(tmp_path, monkeypatch) -> None:
    """One variant's exception (a capture or compile failure on the device) is kept as a result, the phase goes on,
    and the summary does not call the run good."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    part = gpu_check.Part(tmp_path / "part.json")
    with part.attempt("decode manual/flex"):
        raise RuntimeError("operation not permitted when stream is capturing")
    with part.attempt("decode torch/bucketed"):
        part.add(decode=[{"impl": "minercore", "batch": 1, "tokens_per_s": 10.0, "ms_per_step": 100.0}])
    saved = json.loads((tmp_path / "part.json").read_text(encoding="utf-8"))
    assert saved["errors"] == {"decode manual/flex": "RuntimeError: operation not permitted when stream is capturing"}
    assert len(saved["decode"]) == 1
    results = {"device": "CPU", "torch": "x", "date": "d", "smoke": True, "phases": {"decode": {"status": "ok"}},
               "correctness": {}, "engine": [], "kv_bytes_per_slot": {}, **saved}
    text, ok = gpu_check.summary(results)
    assert not ok and "error in decode manual/flex: RuntimeError" in text


def test_a_rerun_resumes_the_earlier_results(tmp_path) -> None:
    """--phases with --resume: the rerun's file holds the earlier phases' results and its own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke"]
    first, second = tmp_path / "first", tmp_path / "second"
    for argv in ([*script, "--phases", "kv", "--out", str(first)],
                 [*script, "--phases", "llama", "--out", str(second), "--resume", str(first / "gpu-results.json")]):
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((second / "gpu-results.json").read_text(encoding="utf-8"))
    assert list(results["phases"]) == ["kv", "llama"]
    assert results["kv_bytes_per_slot"]["measured"] > 0 and "llama" in results
    assert "--phases kv" in results["command"] and "--phases llama" in results["command"]
