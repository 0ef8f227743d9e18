"""HFRunner: echo and generate through per-slot caches, on tiny random models saved to a tmp dir."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import tiny_gpt2, tiny_llama_family

from minercore.contract.config import ModelOptions
from minercore.models.loading.safetensors import load_gpt2
from minercore.runtime.build import build_runner
from minercore.runtime.hf import HFRunner
from minercore.runtime.native import ModelRunner
from minercore.runtime.sampling import ContextOverflow, SlotParams

VOCAB, EOS = 128, 127


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(path, n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama_family("llama", seed=0, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128).save_pretrained(path)
    return path


def hf_runner(path, max_batch: int = 3, max_context: int = 48) -> HFRunner:
    options = ModelOptions(backend="hf", path=str(path), device="cpu", dtype="float32", max_context=max_context)
    runner = build_runner(options, max_batch=max_batch, eos_id=EOS)
    assert isinstance(runner, HFRunner)
    return runner


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, EOS, n).tolist()


def run(runner, requests: dict[int, tuple[list[int], SlotParams]], steps: int) -> dict[int, list[int]]:
    out = {slot: [runner.prefill(slot, ids, params)] for slot, (ids, params) in requests.items()}
    slots = np.array(sorted(out, reverse=True))
    for _ in range(steps):
        for slot, token in zip(slots.tolist(), runner.decode(slots).tolist(), strict=True):
            out[slot].append(token)
    return out


@pytest.mark.parametrize("model_dir", ["gpt2_dir", "llama_dir"])
def test_hf_echo_and_greedy(model_dir, request) -> None:
    path = request.getfixturevalue(model_dir)
    runner = hf_runner(path)
    assert runner.warmup() >= 0
    assert "hf" in runner.description and "cpu" in runner.description and not runner.compiled
    assert runner.kv_cache_bytes_per_slot == 2 * 2 * 48 * (64 if model_dir == "gpt2_dir" else 16) * 4
    a, b = prompt(5, 1), prompt(9, 2)
    out = run(runner, {0: (a, SlotParams()), 2: (b, SlotParams(echo=False))}, steps=6)
    assert out[0] == a + [EOS, EOS]  # past EOS an echo row keeps returning EOS
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.inference_mode():
        logits = reference(torch.tensor([b + out[2]])).logits[0]
    assert out[2] == logits[len(b) - 1:-1].argmax(-1).tolist()
    runner.release(0)  # slot reuse
    c = prompt(3, 3)
    assert run(runner, {0: (c, SlotParams())}, steps=3)[0] == c + [EOS]


def test_hf_sampling_is_seeded_and_independent_of_companions(llama_dir) -> None:
    params = SlotParams(echo=False, temperature=1.0, top_k=40, seed=77)
    alone = run(hf_runner(llama_dir), {0: (prompt(6, 4), params)}, steps=12)[0]
    crowded = run(hf_runner(llama_dir), {0: (prompt(4, 5), SlotParams()), 2: (prompt(6, 4), params),
                                         1: (prompt(7, 6), SlotParams(echo=False, temperature=0.5, seed=1))},
                  steps=12)[2]
    assert alone == crowded and len(set(alone)) > 3


def test_hf_and_simulated_runners_agree_on_gpt2_weights(gpt2_dir) -> None:
    simulated = ModelRunner(load_gpt2(str(gpt2_dir)), max_batch=3, max_context=48, eos_id=EOS,
                            device=torch.device("cpu"), dtype=torch.float32, compile=False)
    requests = {0: (prompt(8, 7), SlotParams(echo=False)),
                1: (prompt(5, 8), SlotParams(echo=False, temperature=0.8, top_p=0.9, seed=3))}
    assert run(hf_runner(gpt2_dir), requests, steps=10) == run(simulated, requests, steps=10)


def test_hf_errors(gpt2_dir, tmp_path) -> None:
    runner = hf_runner(gpt2_dir, max_context=16)
    with pytest.raises(ContextOverflow):
        runner.prefill(0, prompt(16, 0), SlotParams())
    with pytest.raises(ValueError, match="empty"):
        runner.prefill(0, [], SlotParams())
    with pytest.raises(ValueError, match="slot"):
        runner.prefill(3, [1], SlotParams())
    with pytest.raises(ValueError, match="prefilled"):
        runner.decode(np.array([1]))
    with pytest.raises(ValueError, match="missing: no such file or directory"):
        build_runner(ModelOptions(backend="hf", path=str(tmp_path / "missing")), max_batch=1, eos_id=EOS)
    for compile in ("on", "blocks"):
        with pytest.raises(ValueError, match="eager"):
            build_runner(ModelOptions(backend="hf", path=str(gpt2_dir), compile=compile), max_batch=1, eos_id=EOS)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        build_runner(ModelOptions(backend="hf", path=str(gpt2_dir), max_context=65), max_batch=1, eos_id=EOS)
