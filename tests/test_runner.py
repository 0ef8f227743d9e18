"""ModelRunner: echo, generate, sampling, slot handling, errors, compile, and build_runner."""

from __future__ import annotations

import concurrent.futures
import logging

import numpy as np
import pytest
import torch
from checkpoints import tiny_gpt2

from minercore.contract.config import ModelOptions
from minercore.models.gpt2 import GPT2LM, GPTConfig
from minercore.runtime.build import CPU_AUTO_COMPILE, build_runner
from minercore.runtime.device import DeviceError, cpu_has_native_bf16, dtype_name
from minercore.runtime.native import ModelRunner
from minercore.runtime.sampling import FILTER, GREEDY, KINDS, SAMPLE, ContextOverflow, SlotParams, choose_tokens
from minercore.text.tokenizer import load_tokenizer

SMALL = GPTConfig(vocab_size=97, n_positions=128, n_layer=2, n_head=4, n_embd=32)
CPU = torch.device("cpu")


def small_runner(*, max_batch: int = 4, max_context: int = 64, compile: bool = False, kinds=KINDS,
                 seed: int = 0) -> ModelRunner:
    return ModelRunner(GPT2LM.random(SMALL, seed), max_batch=max_batch, max_context=max_context, eos_id=0,
                       device=CPU, dtype=torch.float32, compile=compile, kinds=kinds)


def tiny_runner(max_batch: int = 4, max_context: int = 256, **options) -> ModelRunner:
    opts = ModelOptions(device="cpu", compile="off", max_context=max_context, **options)
    return build_runner(opts, max_batch=max_batch, eos_id=50256)


def prompt(n: int, seed: int, vocab: int = 97) -> list[int]:
    return np.random.default_rng(seed).integers(1, vocab, n).tolist()


def test_echo_reproduces_unicode_prompts_in_a_shared_batch_with_slot_reuse() -> None:
    tok = load_tokenizer("gpt2")
    texts = ["Hello, wörld! 你好，世界 🚀🎉 — ñ", "∑ x² ≤ ∞ · naïve café 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ", "short",
             "emoji 👩‍👩‍👧‍👦 family\nnew line\ttab … Ελληνικά عربى"]
    prompts = [tok.encode(text) for text in texts]
    runner = tiny_runner(max_batch=3)
    waiting = list(range(len(texts)))
    slot_of: dict[int, int] = {}  # request -> slot
    outputs: dict[int, list[int]] = {}

    def admit() -> None:
        # Lowest free slot first, as the engine does; one new request per step, so lengths stagger.
        free = [s for s in range(runner.max_batch) if s not in slot_of.values()]
        if waiting and free:
            request = waiting.pop(0)
            slot_of[request] = free[0]
            outputs[request] = [runner.prefill(free[0], prompts[request], SlotParams())]

    admit()
    while slot_of:
        admit()
        running = sorted(slot_of, reverse=True)  # slots in no particular order
        ids = runner.decode(np.array([slot_of[r] for r in running], dtype=np.int64))
        for request, token in zip(running, ids.tolist(), strict=True):
            outputs[request].append(token)
            if token == runner.eos_id:
                runner.release(slot_of.pop(request))
    for request, ids in enumerate(prompts):
        assert outputs[request] == ids + [runner.eos_id]
        assert tok.decode(outputs[request][:-1]) == texts[request]


@torch.inference_mode()
def test_generate_greedy_matches_full_recompute_argmax() -> None:
    runner = small_runner()
    seqs = {1: prompt(7, 1), 3: prompt(19, 2)}
    for slot, ids in seqs.items():
        ids.append(runner.prefill(slot, ids, SlotParams(echo=False)))
    for _ in range(10):
        slots = np.array(sorted(seqs))
        for slot, token in zip(slots.tolist(), runner.decode(slots).tolist(), strict=True):
            seqs[slot].append(token)
    for ids in seqs.values():
        logits = runner.model(torch.tensor([ids]))[0]
        prompt_len = len(ids) - 11
        assert ids[prompt_len:] == logits[prompt_len - 1:-1].argmax(-1).tolist()


def _sampled(runner: ModelRunner, companions: dict[int, tuple[list[int], SlotParams]], slot: int,
             params: SlotParams, steps: int = 24) -> list[int]:
    out = [runner.prefill(slot, prompt(9, 7), params)]
    for other, (ids, other_params) in companions.items():
        runner.prefill(other, ids, other_params)
    slots = np.array([slot, *companions])
    for _ in range(steps):
        out.append(int(runner.decode(slots)[0]))
    return out


def test_seeded_sampling_is_reproducible_and_independent_of_batch_companions() -> None:
    params = SlotParams(echo=False, temperature=1.0, seed=1234)
    alone = _sampled(small_runner(), {}, 0, params)
    companions = {0: (prompt(30, 3), SlotParams()),
                  1: (prompt(4, 4), SlotParams(echo=False, temperature=0.7, top_k=5, top_p=0.8, seed=9)),
                  2: (prompt(12, 5), SlotParams(echo=False))}
    crowded = _sampled(small_runner(max_batch=8), companions, 5, params)
    assert alone == crowded
    assert alone == _sampled(small_runner(), {}, 2, params)
    other_seed = _sampled(small_runner(), {}, 0, SlotParams(echo=False, temperature=1.0, seed=1235))
    assert other_seed != alone
    assert len(set(alone)) > 5  # random weights at temperature 1 really sample


def _draws(logits: torch.Tensor, kind: int, n: int = 4000, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, echo: bool = False, target: int = 0) -> torch.Tensor:
    # n draws of one row: the same seed at n positions (independent noise per position).
    def full(value, dtype):
        return torch.full((n,), value, dtype=dtype)

    return choose_tokens(logits.expand(n, -1), torch.arange(n), full(echo, torch.bool),
                         full(target, torch.int64), full(temperature, torch.float32), full(top_k, torch.int64),
                         full(top_p, torch.float32), full(42, torch.int64), kind)


def test_sampling_distribution_and_top_k_top_p_support() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04] + [0.0] * 45) + 1e-9
    logits = probs.log()
    freq = torch.bincount(_draws(logits, SAMPLE), minlength=50).float() / 4000
    assert torch.allclose(freq[:5], probs[:5], atol=0.03)
    assert set(_draws(logits, FILTER, top_k=2).tolist()) == {0, 1}
    assert set(_draws(logits, FILTER, top_p=0.65).tolist()) == {0, 1}  # 0.4 < 0.65 <= 0.7
    assert set(_draws(logits, FILTER, top_p=0.75).tolist()) == {0, 1, 2}
    assert set(_draws(logits, FILTER, top_k=2, top_p=0.3).tolist()) == {0}
    # top-p applies to the renormalised top-k distribution: 0.4 / 0.7 = 0.57 >= 0.5 already
    assert set(_draws(logits, FILTER, top_k=2, top_p=0.5).tolist()) == {0}
    assert set(_draws(logits, FILTER, temperature=5.0, top_k=4).tolist()) == {0, 1, 2, 3}
    assert set(_draws(logits, FILTER, top_p=1.0).tolist()) >= {0, 1, 2, 3, 4}
    assert set(_draws(logits, FILTER, temperature=0.0, top_k=3).tolist()) == {0}  # temperature 0: argmax
    assert set(_draws(logits, GREEDY).tolist()) == {0}
    for kind in KINDS:  # echo steers every kind to its target, even one outside the top-k
        assert set(_draws(logits, kind, top_k=1, echo=True, target=17).tolist()) == {17}


def test_top_k_top_p_keeps_what_hf_warpers_keep() -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from minercore.runtime.sampling import _top_k_top_p

    torch.manual_seed(0)
    scaled = torch.randn(6, 300) * 3
    for k, p in [(0, 0.9), (5, 1.0), (20, 0.5), (1, 0.3), (50, 0.95), (0, 0.05)]:
        ours = _top_k_top_p(scaled, torch.full((6,), k), torch.full((6,), p)) > float("-inf")
        hf = scaled
        if k:
            hf = TopKLogitsWarper(k)(None, hf)
        if p < 1.0:
            hf = TopPLogitsWarper(p)(None, hf)
        assert torch.equal(ours, hf > float("-inf")), (k, p)


def test_prefill_and_decode_errors() -> None:
    runner = small_runner(max_context=16)
    with pytest.raises(ContextOverflow, match="16"):
        runner.prefill(0, prompt(16, 0), SlotParams())
    with pytest.raises(ValueError, match="empty prompt"):
        runner.prefill(0, [], SlotParams())
    for slot in (-1, 4, "0", 1.0):
        with pytest.raises(ValueError, match="slot"):
            runner.prefill(slot, [1], SlotParams())
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        runner.prefill(0, [5, 97], SlotParams())
    for bad in (SlotParams(temperature=-1.0), SlotParams(top_p=0.0), SlotParams(top_k=-2)):
        with pytest.raises(ValueError):
            runner.prefill(0, [1], bad)
    # 15 prompt tokens fit: the prefill token, then a decode step feeding position 15.
    assert runner.prefill(0, prompt(15, 0), SlotParams(echo=False)) >= 0
    runner.decode(np.array([0]))
    with pytest.raises(ContextOverflow):
        runner.decode(np.array([0]))
    with pytest.raises(ValueError, match="prefilled"):
        runner.decode(np.array([1]))
    runner.prefill(1, [3, 4], SlotParams())
    with pytest.raises(ValueError, match="duplicate"):
        runner.decode(np.array([1, 1]))
    runner.release(1)
    with pytest.raises(ValueError, match="prefilled"):
        runner.decode(np.array([1]))
    assert runner.decode(np.array([], dtype=np.int64)).size == 0


def test_live_slots_left_out_of_a_step_keep_their_state() -> None:
    runner = small_runner()
    a, b = prompt(6, 1), prompt(8, 2)
    out_a = [runner.prefill(0, a, SlotParams())]
    out_b = [runner.prefill(1, b, SlotParams())]
    for step in range(12):
        slots = [0, 1] if step % 3 == 0 else [1] if step % 3 == 1 else [0]
        for slot, token in zip(slots, runner.decode(np.array(slots)).tolist(), strict=True):
            (out_a if slot == 0 else out_b).append(token)
    assert out_a == a + [0] * (len(out_a) - len(a))
    assert out_b == b + [0] * (len(out_b) - len(b))  # past EOS an echo row keeps returning EOS


def _filter_run(runner: ModelRunner) -> list[int]:
    """A sampled top-k/top-p row, a greedy one and an echo one at batch 4 for 8 steps, then the sampled row alone
    (batch 1) for 12; contexts 64 and 128."""
    out = [runner.prefill(0, prompt(50, 1), SlotParams(echo=False, temperature=0.9, top_k=10, top_p=0.9, seed=5)),
           runner.prefill(1, prompt(70, 2), SlotParams(echo=False)),
           runner.prefill(2, prompt(5, 3), SlotParams())]
    for step in range(20):
        out.extend(runner.decode(np.array([0, 1, 2] if step < 8 else [0])).tolist())
        if step == 7:
            runner.release(1)
            runner.release(2)
    return out


def test_compiled_matches_eager_without_recompiles_after_warmup() -> None:
    """One compile-heavy test: the FILTER kind (sampling, top-k/p, greedy and echo rows all in its graph),
    its four specialisations compiled by warmup and nothing compiled while serving."""
    from torch._dynamo.utils import counters

    eager, compiled = small_runner(max_context=128), small_runner(max_context=128, compile=True, kinds=(FILTER,))
    assert compiled.compiled and "compiled" in compiled.description
    assert compiled.warmup() > 0
    graphs = counters["stats"]["unique_graphs"]
    assert _filter_run(eager) == _filter_run(compiled)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_blocks_option_builds_a_block_compiled_runner_without_graphs() -> None:
    runner = build_runner(ModelOptions(device="cpu", compile="blocks", max_context=128), max_batch=2, eos_id=50256)
    assert runner.compiled and "compiled blocks" in runner.description and "graphs off" in runner.description
    assert all(type(block).regional for block in runner.model.blocks)  # each block's step a nested region


def test_compiled_blocks_match_eager_with_one_graph_for_every_layer() -> None:
    """compile_blocks: the forward compiles with the block as one nested region the layers share, the FILTER
    sampler apart, warmup compiles every specialisation, and the ids are the eager runner's."""
    from torch._dynamo.utils import counters

    eager = small_runner(max_context=128)
    compiled = ModelRunner(GPT2LM.random(SMALL, 0), max_batch=4, max_context=128, eos_id=0, device=CPU,
                           dtype=torch.float32, compile=True, kinds=(FILTER,), compile_blocks=True)
    assert "compiled blocks" in compiled.description
    before = counters["stats"]["unique_graphs"]
    compiled.warmup()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before <= 3  # the forward at batch 1 and above, the sampler (batch 1 runs as two rows)
    assert _filter_run(eager) == _filter_run(compiled)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_blocks_of_two_models_in_one_process_each_compute_their_own_model() -> None:
    """The compiled forwards skip dynamo's guards on the model's modules: runners of two models that differ
    only in depth, warmed and then stepped in turn in one process, each give their own eager twin's ids (a graph
    shared between them would run the other model's layer count)."""
    deeper = GPTConfig(vocab_size=97, n_positions=128, n_layer=3, n_head=4, n_embd=32)
    runners = {}
    for name, config in (("two layers", SMALL), ("three layers", deeper)):
        def make(compile: bool, config: GPTConfig = config) -> ModelRunner:
            return ModelRunner(GPT2LM.random(config, 7), max_batch=4, max_context=128, eos_id=0, device=CPU,
                               dtype=torch.float32, compile=compile, kinds=(FILTER,), compile_blocks=compile)
        runners[name] = (make(False), make(True))
    for _, compiled in runners.values():
        compiled.warmup()
    expected = {name: _filter_run(eager) for name, (eager, _) in runners.items()}
    assert expected["two layers"] != expected["three layers"]
    for name, (_, compiled) in runners.items():
        assert _filter_run(compiled) == expected[name], name


def test_build_runner_device_dtype_and_kv_bytes(caplog) -> None:
    runner = tiny_runner(max_batch=2, max_context=128, dtype="float32")
    assert isinstance(runner, ModelRunner)
    assert runner.device == CPU and runner.dtype == torch.float32 and not runner.compiled
    assert all(p.device == CPU for p in runner.model.parameters())
    assert runner.model.blocks[0].attn.cache.k.device == CPU
    assert (runner.vocab_size, runner.eos_id, runner.max_batch, runner.max_context) == (50257, 50256, 2, 128)
    assert "tiny" in runner.description and "cpu" in runner.description and "eager" in runner.description
    formula = 2 * 2 * 128 * 128 * 4  # 2 (K and V) x layers x context x width x bytes
    assert abs(runner.kv_cache_bytes_per_slot - formula) <= 0.1 * formula
    with caplog.at_level(logging.INFO, logger="minercore.runtime.native"):
        assert runner.warmup() >= 0
    assert "warmup" in caplog.text
    bf16 = tiny_runner(max_batch=1, max_context=64, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.model.wte.weight.dtype == torch.bfloat16
    assert bf16.prefill(0, [15496, 11], SlotParams()) == 15496
    auto = build_runner(ModelOptions(device="cpu", max_context=64), max_batch=1, eos_id=50256)
    assert auto.compiled is CPU_AUTO_COMPILE
    assert auto.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert dtype_name(auto.dtype) in auto.description


@pytest.mark.parametrize("options, match", [
    (dict(backend="nope"), "backend"),
    (dict(preset="gpt5"), "preset"),
    (dict(mode="chat"), "mode"),
    (dict(compile="maybe"), "compile"),
    (dict(graphs="sometimes"), "graphs"),
    (dict(attention="flexible"), "attention"),
    (dict(max_context=8192), "exceeds"),
])
def test_build_runner_rejects_bad_options(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_runner(ModelOptions(device="cpu", **{"max_context": 64, **options}), max_batch=1, eos_id=50256)


def test_build_runner_unavailable_device() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(DeviceError):
        build_runner(ModelOptions(device="cuda", max_context=64), max_batch=1, eos_id=50256)


def test_build_runner_with_gpt2_weights(tmp_path) -> None:
    tiny_gpt2(tmp_path, n_layer=1, n_embd=32, n_head=2, vocab_size=120, n_positions=40)
    runner = build_runner(ModelOptions(device="cpu", compile="off", weights=str(tmp_path), max_context=40),
                          max_batch=2, eos_id=119)
    assert runner.vocab_size == 120 and str(tmp_path) in runner.description
    out = [runner.prefill(0, [5, 6, 7], SlotParams())]
    out += [int(runner.decode(np.array([0]))[0]) for _ in range(3)]
    assert out == [5, 6, 7, 119]


def _mixed_run(runner: ModelRunner, steps: int = 16) -> list[int]:
    """Greedy, sampled, filtered and echo rows sharing steps, a row dropping out and a slot reused."""
    out = [runner.prefill(0, prompt(20, 1), SlotParams(echo=False, temperature=0.9, top_k=10, top_p=0.9, seed=5)),
           runner.prefill(1, prompt(40, 2), SlotParams(echo=False)),
           runner.prefill(2, prompt(5, 3), SlotParams())]
    for step in range(steps):
        slots = np.array([0, 1, 2] if step < 6 else [2, 0])
        out.extend(runner.decode(slots).tolist())
        if step == 5:
            runner.release(1)
        if step == 9:
            out.append(runner.prefill(1, prompt(9, 4), SlotParams(echo=False, temperature=1.0, seed=3)))
            out.extend(runner.decode(np.array([1, 0, 2])).tolist())
    return out


@pytest.mark.parametrize("attention", ["bucketed", "masked", "flex"])
def test_static_buffer_step_matches_the_default_step(attention) -> None:
    """graphs=manual runs the static-buffer step (the one CUDA graphs capture): same ids as the default step,
    with any attention, since masked keys (and key blocks flex skips) add exactly nothing."""
    reference = _mixed_run(small_runner(max_context=128))
    manual = ModelRunner(GPT2LM.random(SMALL, 0), max_batch=4, max_context=128, eos_id=0, device=CPU,
                         dtype=torch.float32, compile=False, graphs="manual", attention=attention)
    assert manual.context_buckets == ([64, 128] if attention == "bucketed" else [128])
    assert _mixed_run(manual) == reference


def test_compiled_static_step_compiles_each_shape_once_in_warmup() -> None:
    """graphs=manual compiles with dynamic=False: one graph per (batch bucket, context) shape, all in warmup."""
    from torch._dynamo.utils import counters

    reference = _mixed_run(small_runner(max_context=96))
    manual = ModelRunner(GPT2LM.random(SMALL, 0), max_batch=4, max_context=96, eos_id=0, device=CPU,
                         dtype=torch.float32, compile=True, kinds=(FILTER,), graphs="manual", attention="masked",
                         batch_buckets=(2, 4))
    before = counters["stats"]["unique_graphs"]
    manual.warmup()
    assert counters["stats"]["unique_graphs"] - before == 2
    assert _mixed_run(manual) == reference
    assert counters["stats"]["unique_graphs"] - before == 2
    assert manual.captured_graphs == 0  # capture is for CUDA only


def test_launched_steps_collect_in_order_with_one_step_of_lookahead() -> None:
    """Step N+1 is launched before step N is collected (the engine's overlap): both keep their own ids."""
    sequential, overlapped = small_runner(), small_runner()
    expected, got = [], []
    for runner in (sequential, overlapped):
        runner.prefill(0, prompt(6, 1), SlotParams(echo=False))
        runner.prefill(3, prompt(11, 2), SlotParams(echo=False, temperature=1.0, seed=7))
    slots = np.array([3, 0])
    for _ in range(8):
        expected.append(sequential.decode(slots).tolist())
    pending = overlapped.launch(slots)
    for _ in range(7):
        following = overlapped.launch(slots)
        got.append(overlapped.collect(pending).tolist())
        pending = following
    got.append(overlapped.collect(pending).tolist())
    assert got == expected
    assert len({tuple(ids) for ids in got}) > 1


@pytest.mark.parametrize("options, match", [
    (dict(graphs="maybe"), "graphs"),
    (dict(attention="flexible"), "attention"),
    (dict(graphs="torch", compile=False), "compile on"),
    (dict(batch_buckets=(1, 2)), "max_batch"),
    (dict(graphs="manual", compile=True, compile_blocks=True), "graphs=off"),
])
def test_model_runner_rejects_bad_graph_options(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        ModelRunner(GPT2LM.random(SMALL, 0), **{"max_batch": 4, "max_context": 64, "eos_id": 0, "device": CPU,
                                                     "dtype": torch.float32, "compile": False, **options})


def test_a_process_keeps_compiling_past_dynamos_default_recompile_limit() -> None:
    # Every compiled runner adds graphs to the same step functions' dynamo caches; with fullgraph=True a step
    # past the limit raises instead of falling back to eager, so each runner must make room for its own. As in
    # the engine, each runner is built on one thread and compiles on another (dynamo's config is per thread).
    configs = [(2, 64), (2, 96), (2, 128), (3, 64), (3, 96)]  # two graphs each: ten, past the default eight
    for batch, context in configs:
        runner = small_runner(max_batch=batch, max_context=context, compile=True, kinds=(GREEDY,))
        eager = small_runner(max_batch=batch, max_context=context, kinds=(GREEDY,))
        ids = prompt(9, seed=batch * context)
        params = SlotParams(echo=False)
        slots = np.array([0])
        with concurrent.futures.ThreadPoolExecutor(1) as model_thread:
            model_thread.submit(runner.warmup).result()
            first = model_thread.submit(runner.prefill, 0, ids, params).result()
            assert first == eager.prefill(0, ids, params)
            assert model_thread.submit(runner.decode, slots).result().tolist() == eager.decode(slots).tolist()
