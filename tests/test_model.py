"""GPT2LM: presets, the static KV cache against full recompute, and real GPT-2 weight loading."""

from __future__ import annotations

import pytest
import torch
from checkpoints import tiny_gpt2

from minercore.models.base import prompt_attention
from minercore.models.gpt2 import GPT2LM, GPTConfig
from minercore.models.loading.safetensors import load_gpt2
from minercore.models.presets import GPT2_PRESETS as PRESETS

SMALL = GPTConfig(vocab_size=97, n_positions=64, n_layer=2, n_head=4, n_embd=32)


def test_presets_shapes() -> None:
    tiny = PRESETS["tiny"]
    assert tiny.vocab_size == 50257 and tiny.n_positions >= 4096  # GPT-2's vocabulary: echo needs every id
    gpt2, medium = PRESETS["gpt2"], PRESETS["gpt2-medium"]
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head, gpt2.n_positions) == (12, 768, 12, 1024)
    assert (medium.n_layer, medium.n_embd, medium.n_head) == (24, 1024, 16)
    params = sum(p.numel() for p in GPT2LM(gpt2).parameters())
    assert 124e6 < params < 125e6  # the tied head is counted once, as in GPT-2 124M


def test_random_weights_follow_the_seed() -> None:
    a, b, c = GPT2LM.random(SMALL, 1), GPT2LM.random(SMALL, 1), GPT2LM.random(SMALL, 2)
    assert torch.equal(a.wte.weight, b.wte.weight) and torch.equal(a.blocks[1].mlp.c_fc.weight,
                                                                   b.blocks[1].mlp.c_fc.weight)
    assert not torch.equal(a.wte.weight, c.wte.weight)
    assert a.lm_head.weight is a.wte.weight
    assert abs(a.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 0.002


def test_cache_bytes_and_context_limit() -> None:
    model = GPT2LM.random(SMALL)
    per_slot = model.setup_caches(max_batch=3, max_context=40)
    formula = 2 * SMALL.n_layer * 40 * SMALL.n_embd * 4  # K and V x layers x context x width x bytes
    assert per_slot == formula * 41 // 40  # one spare position (see setup_caches)
    cache = model.blocks[0].attn.cache
    assert cache.k.shape == (3, SMALL.n_head, 41, SMALL.head_dim)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        model.setup_caches(max_batch=1, max_context=65)


@torch.inference_mode()
def test_cached_decode_matches_full_recompute() -> None:
    """Rows of different lengths decode together (rows outside the step compute harmlessly), with the
    attended context bucketed below the cache size, and match a no-cache forward over the whole sequence."""
    torch.manual_seed(0)
    model = GPT2LM.random(SMALL, seed=3).eval()
    model.setup_caches(max_batch=4, max_context=48)
    seqs = {0: torch.randint(0, 97, (5,)).tolist(), 2: torch.randint(0, 97, (11,)).tolist()}
    for slot, ids in seqs.items():
        logits = model.prefill(torch.tensor([ids]), slot)
        torch.testing.assert_close(logits[0], model(torch.tensor([ids]))[0, -1], rtol=1e-5, atol=1e-5)
        seqs[slot] = ids + [int(logits.argmax())]
    for _ in range(6):
        tokens = torch.zeros(4, dtype=torch.int64)
        pos = torch.zeros(4, dtype=torch.int64)
        for slot, ids in seqs.items():
            tokens[slot], pos[slot] = ids[-1], len(ids) - 1
        bucketed = model.decode(tokens, pos, 32)
        logits = model.decode(tokens, pos, 48)  # the whole cache: the same logits as the bucket
        for slot, ids in seqs.items():
            torch.testing.assert_close(bucketed[slot], logits[slot], rtol=1e-5, atol=1e-6)
            expected = model(torch.tensor([ids]))[0, -1]
            torch.testing.assert_close(logits[slot], expected, rtol=1e-4, atol=1e-5)
            seqs[slot] = ids + [int(logits[slot].argmax())]


@torch.inference_mode()
@pytest.mark.parametrize("compiled", [False, True])
def test_flex_decode_reads_only_each_rows_own_blocks(compiled) -> None:
    """FlexAttention with the positions' block mask gives the masked-SDPA logits, for rows whose positions lie
    in different 128-key blocks of a 300-key context, eager and compiled."""
    from dataclasses import replace

    model = GPT2LM.random(replace(SMALL, n_positions=512), seed=4).eval()
    model.setup_caches(max_batch=3, max_context=300)
    for slot, length in enumerate((3, 130, 290)):
        model.prefill(torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(slot)), slot)
    tokens, pos = torch.tensor([5, 6, 7]), torch.tensor([3, 130, 290])
    masked = model.decode(tokens, pos, 300)
    model.flex_attention = True
    decode = torch.compile(model.decode, fullgraph=True, dynamic=False) if compiled else model.decode
    torch.testing.assert_close(decode(tokens, pos, 300), masked, rtol=1e-4, atol=1e-5)


def _tiny_gpt2_dir(tmp_path, vocab_size: int = 101, n_positions: int = 64):
    return tiny_gpt2(tmp_path, n_layer=2, n_embd=64, n_head=4, vocab_size=vocab_size, n_positions=n_positions)


@torch.inference_mode()
def test_gpt2_checkpoint_logits_parity(tmp_path) -> None:
    hf = _tiny_gpt2_dir(tmp_path)
    ours = load_gpt2(str(tmp_path)).eval()
    assert ours.config == GPTConfig(vocab_size=101, n_positions=64, n_layer=2, n_head=4, n_embd=64)
    ids = torch.randint(0, 101, (2, 30))
    expected = hf(ids).logits
    got = ours(ids)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    # and through the cache: prefill + one decode step
    ours.setup_caches(max_batch=1, max_context=64)
    torch.testing.assert_close(ours.prefill(ids[:1, :29], 0)[0], expected[0, 28], rtol=1e-4, atol=1e-5)
    step = ours.decode(ids[0, 29:30], torch.tensor([29]), 64)
    torch.testing.assert_close(step[0], expected[0, 29], rtol=1e-4, atol=1e-5)


def test_gpt2_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        (tmp_path / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 5, "n_positions": 8, '
                                              '"n_layer": 1, "n_head": 1, "n_embd": 4}')
        load_gpt2(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a GPT-2-family checkpoint"):
        load_gpt2(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        load_gpt2("gpt2")  # a hub name is not fetched


@torch.inference_mode()
def test_prompt_attention_gives_each_padded_row_the_bits_it_has_alone() -> None:
    """A right-padded batch of prompts of different lengths: each row's attention is exactly (bit for bit) the
    attention of its prompt alone, from position 0 and after a cached chunk; and the causal result itself."""
    g = torch.Generator().manual_seed(0)
    lengths, heads, dim = [23, 5, 40, 1], 3, 16
    for start in (0, 17):
        q = torch.randn(4, heads, max(lengths), dim, generator=g)
        k = torch.randn(4, heads, start + max(lengths), dim, generator=g)
        v = torch.randn(4, heads, start + max(lengths), dim, generator=g)
        batched = prompt_attention(q, k, v, start, lengths)
        for i, n in enumerate(lengths):
            alone = prompt_attention(q[i:i + 1, :, :n].clone(), k[i:i + 1, :, :start + n].clone(),
                                     v[i:i + 1, :, :start + n].clone(), start)
            assert torch.equal(batched[i:i + 1, :, :n], alone)
            assert not batched[i, :, n:].any()
            scores = (q[i, :, :n] @ k[i, :, :start + n].transpose(-1, -2)) / dim ** 0.5
            visible = torch.arange(start + n) <= torch.arange(start, start + n)[:, None]
            expected = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v[i, :, :start + n]
            torch.testing.assert_close(alone[0], expected, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_prompt_attention_from_each_rows_own_start_is_each_rows_attention_alone() -> None:
    """Rows resuming from different cached lengths in one padded batch: each row's queries attend its own keys up to
    their own positions, bit for bit as alone where the lengths are known (a CPU), and within rounding in the one
    masked call taken without them (a GPU)."""
    g = torch.Generator().manual_seed(1)
    starts, lengths, heads, dim = [16, 0, 48, 3], [7, 23, 13, 1], 3, 16
    t, reach = max(lengths), max(s + n for s, n in zip(starts, lengths, strict=True))
    q = torch.randn(4, heads, t, dim, generator=g)
    k, v = (torch.randn(4, heads, reach + 5, dim, generator=g) for _ in range(2))
    per_row = prompt_attention(q, k, v, starts, lengths)
    fused = prompt_attention(q, k, v, starts)
    for i, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        alone = prompt_attention(q[i:i + 1, :, :n].clone(), k[i:i + 1, :, :start + n].clone(),
                                 v[i:i + 1, :, :start + n].clone(), start)
        assert torch.equal(per_row[i:i + 1, :, :n], alone)
        torch.testing.assert_close(fused[i:i + 1, :, :n], alone, rtol=1e-5, atol=1e-5)

