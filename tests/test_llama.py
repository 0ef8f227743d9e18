"""The Llama family in the native core against transformers, on tiny random checkpoints saved by the tests.

One checkpoint per member (llama with Llama 3.1 RoPE scaling, qwen2 with q/k/v biases and a tied head, qwen3
with q/k norms and an explicit head_dim, mistral), one sharded, float32 on the CPU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import tiny_llama_family

from minercore.contract.config import ModelOptions
from minercore.models.llama import LlamaConfig, LlamaLM
from minercore.models.loading.safetensors import load_llama
from minercore.runtime.build import build_runner
from minercore.runtime.hf import HFRunner
from minercore.runtime.native import ModelRunner
from minercore.runtime.sampling import SlotParams

VOCAB = 256
GREEDY = SlotParams(echo=False)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, eos_token_id=VOCAB - 1,
              bos_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _hf_model(family: str, **extra):
    return tiny_llama_family(family, **{**COMMON, **extra})


MEMBERS = {
    "llama": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=32)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "llama-sharded": ("llama", dict(tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, object]]:
    """name -> (directory, the transformers model saved there)."""
    out = {}
    for name, (family, extra) in MEMBERS.items():
        model = _hf_model(family, **extra)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, max_shard_size="40KB" if name.endswith("sharded") else "5GB")
        out[name] = (str(path), model)
    return out


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, VOCAB - 1, n).tolist()


def native_runner(path: str, *, max_batch: int = 4, max_context: int = 128, compile: str = "off") -> ModelRunner:
    options = ModelOptions(path=path, device="cpu", dtype="float32", max_context=max_context, compile=compile,
                           mode="generate")
    runner = build_runner(options, max_batch=max_batch, eos_id=VOCAB - 1)
    assert isinstance(runner, ModelRunner) and runner.kind == "native"
    return runner


def greedy(runner, requests: dict[int, list[int]], steps: int) -> dict[int, list[int]]:
    out = {slot: [runner.prefill(slot, ids, GREEDY)] for slot, ids in requests.items()}
    slots = np.array(sorted(out))
    for _ in range(steps):
        for slot, token in zip(slots.tolist(), runner.decode(slots).tolist(), strict=True):
            out[slot].append(token)
    return out


@pytest.mark.parametrize("name", list(MEMBERS))
def test_logits_match_transformers(checkpoints, name: str) -> None:
    path, reference = checkpoints[name]
    ours = load_llama(path)
    ids = torch.tensor([prompt(64, 1)])
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert ours.config.family == MEMBERS[name][0]
    assert Path(path, "model.safetensors.index.json").exists() == name.endswith("sharded")


def test_checkpoint_features_are_read(checkpoints) -> None:
    configs = {name: load_llama(path).config for name, (path, _) in checkpoints.items()}
    assert configs["llama"].rope_scaling is not None and configs["llama"].rope_theta == 500000.0
    assert configs["qwen2"].qkv_bias and not configs["qwen2"].o_bias and configs["qwen2"].tie_embeddings
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim == 32 != 64 // 4
    assert configs["llama-sharded"].tie_embeddings
    index = Path(checkpoints["llama-sharded"][0], "model.safetensors.index.json")
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    tied = load_llama(checkpoints["qwen2"][0])
    assert tied.lm_head.weight is tied.embed_tokens.weight


@pytest.mark.parametrize("name", list(MEMBERS))
def test_greedy_tokens_match_generate(checkpoints, name: str) -> None:
    path, reference = checkpoints[name]
    ids = prompt(40, 2)
    reference.generation_config.eos_token_id = None  # 32 tokens whatever they are
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                      pad_token_id=0)[0, len(ids):].tolist()
    got = greedy(native_runner(path), {0: ids}, steps=31)[0]
    assert got == expected
    assert len(set(expected)) > 4  # the checkpoint's weights are large enough for greedy output to vary


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_batch_of_different_lengths_equals_each_alone(checkpoints, name: str) -> None:
    path, _ = checkpoints[name]
    requests = {0: prompt(5, 3), 1: prompt(37, 4), 2: prompt(64, 5), 3: prompt(1, 6)}
    together = greedy(native_runner(path), requests, steps=20)
    for slot, ids in requests.items():
        assert together[slot] == greedy(native_runner(path, max_batch=1), {0: ids}, steps=20)[0]


def test_compiled_equals_eager(checkpoints) -> None:
    path, _ = checkpoints["qwen2"]
    requests = {0: prompt(9, 7), 1: prompt(30, 8), 2: prompt(70, 9)}
    compiled = native_runner(path, max_batch=4, compile="on")
    compiled.warmup()
    assert compiled.compiled
    assert greedy(compiled, requests, steps=24) == greedy(native_runner(path), requests, steps=24)


def test_unsupported_model_type_falls_back_to_hf_with_a_log_line(tmp_path, caplog) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path)
    options = ModelOptions(path=str(tmp_path), device="cpu", dtype="float32", max_context=32)
    assert options.backend == "native"
    with caplog.at_level(logging.WARNING, logger="minercore.runtime.build"):
        runner = build_runner(options, max_batch=2, eos_id=VOCAB - 1)
    assert isinstance(runner, HFRunner) and runner.kind == "hf"
    assert "'gpt_neox' has no native implementation" in caplog.text and "hf backend" in caplog.text
    assert runner.prefill(0, [1, 2, 3], GREEDY) in range(VOCAB)


@pytest.mark.parametrize(("change", "message"), [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unsupported_feature_is_a_clear_error(checkpoints, tmp_path, change, message) -> None:
    path, _ = checkpoints["llama"]
    raw = json.loads(Path(path, "config.json").read_text())
    raw.update(change)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(Path(path, "model.safetensors"))
    with pytest.raises(ValueError, match=message) as failure:
        build_runner(ModelOptions(path=str(tmp_path), device="cpu", dtype="float32"), max_batch=1, eos_id=1)
    assert "backend hf serves it" in str(failure.value)


def test_sliding_window_beyond_max_context_is_refused() -> None:
    config = LlamaConfig(family="mistral", vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2, n_kv_head=1,
                         head_dim=16, intermediate_size=64, max_positions=256, sliding_window=64)
    model = LlamaLM.random(config)
    assert model.setup_caches(1, 64) > 0  # within the window, sliding attention is full attention
    with pytest.raises(ValueError, match="sliding-window attention .64 positions. is not implemented"):
        model.setup_caches(1, 65)


def test_missing_or_misshapen_tensors_are_errors(checkpoints, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    path, _ = checkpoints["mistral"]
    tensors = load_file(f"{path}/model.safetensors")
    (tmp_path / "config.json").write_text(Path(path, "config.json").read_text())
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp" not in k}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks .*layers.1.mlp"):
        load_llama(tmp_path)
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight has shape"):
        load_llama(tmp_path)


def test_presets_build_and_echo() -> None:
    runner = build_runner(ModelOptions(preset="llama-tiny", device="cpu", dtype="float32", max_context=64,
                                       compile="off"), max_batch=2, eos_id=50256)
    assert runner.vocab_size == 50257 and "llama" in runner.description
    ids = prompt(10, 11)
    out = [runner.prefill(1, ids, SlotParams(echo=True))]
    out += [int(runner.decode(np.array([1]))[0]) for _ in range(10)]
    assert out == [*ids, 50256]


def _decode_all(runner, first: dict[int, int], steps: int) -> dict[int, list[int]]:
    out = {slot: [token] for slot, token in first.items()}
    slots = np.array(sorted(out))
    for _ in range(steps):
        for slot, token in zip(slots.tolist(), runner.decode(slots).tolist(), strict=True):
            out[slot].append(token)
    return out


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_batched_and_chunked_prefill_equal_one_prompt_at_a_time(checkpoints, name: str) -> None:
    def make():
        if name == "gpt2":  # the same prefill path serves GPT-2
            return build_runner(ModelOptions(preset="tiny", device="cpu", dtype="float32", max_context=128,
                                             compile="off", mode="generate"), max_batch=4, eos_id=VOCAB - 1)
        return native_runner(checkpoints[name][0])

    prompts = {0: prompt(5, 3), 2: prompt(50, 4), 3: prompt(17, 5), 1: prompt(1, 6)}
    alone = greedy(make(), prompts, steps=12)
    runner = make()
    first = runner.prefill_batch(list(prompts), list(prompts.values()), [GREEDY] * len(prompts))
    assert _decode_all(runner, dict(zip(prompts, first, strict=True)), steps=12) == alone
    runner = make()
    chunked = {}
    for slot, ids in prompts.items():
        bounds = [0, *range(7, len(ids), 7), len(ids)]  # 7-token chunks, the last one shorter
        for start, end in zip(bounds, bounds[1:], strict=False):
            token = runner.prefill_chunk(slot, ids, GREEDY, start, end)
            assert (token is None) == (end < len(ids))
        chunked[slot] = token
    assert _decode_all(runner, chunked, steps=12) == alone
