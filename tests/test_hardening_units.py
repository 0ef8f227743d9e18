"""The hardening checks below the HTTP layer in the miner and the engine: the request shape, the engine's
verdicts on odd input, and the log levels. (Signatures, freshness and replays: test_miner_auth.py.)"""

import logging
import math

import pytest
from helpers import collect, tiny_engine

from minercore.contract.generation import GenerationRequest, InvalidRequest, SamplingParams
from minercore.miner import neuron
from minercore.miner.admission import Refusal
from minercore.miner.config import build_config
from minercore.miner.streamprompting import conversation_of


# ---- the request's shape (StreamPrompting's roles and messages) ---------------------------------------------
@pytest.mark.parametrize("roles, messages, problem", [
    ([], [], "messages must be a non-empty list"),
    (["user"], ["a", "b"], "roles has 1 entries and messages has 2: give exactly one role per message"),
    (["user", "user"], ["a"], "roles has 2 entries and messages has 1: give exactly one role per message"),
    (["user", "user"], ["x" * 60, "y" * 41], "messages hold 101 characters; the limit is 100"),
    (["user"], [""], None),  # the engine judges content: "prompt is empty"
    (["system", "user"], ["x" * 50, "y" * 50], None),
])
def test_the_request_shape(roles, messages, problem):
    if problem is None:
        assert conversation_of(roles, messages, max_chars=100) == [
            {"role": role, "content": text} for role, text in zip(roles, messages, strict=True)]
    else:
        with pytest.raises(Refusal) as refused:
            conversation_of(roles, messages, max_chars=100)
        assert (refused.value.status, refused.value.message) == (400, problem)


# ---- the engine's verdicts (below the miner) ------------------------------------------------------------------
async def test_the_engine_answers_odd_but_valid_prompts_exactly_and_clamps_huge_lengths():
    engine = tiny_engine(max_batch=2, max_context=256)
    await engine.start()
    try:
        for prompt in ("Hi", "\x00\x01\x07\x1b[31m\x7f\x9b\u2028\ufeff\r\n\t", "<|endoftext|>"):
            assert await collect(engine, GenerationRequest(prompt=prompt)) == (prompt, "eos")
        # A huge length is clamped to what the context leaves, not refused.
        text, reason = await collect(engine, GenerationRequest(prompt="a b c", sampling=SamplingParams(
            max_new_tokens=10**18)))
        assert (text, reason) == ("a b c", "eos")
        for sampling, message in ((SamplingParams(max_new_tokens=-1), "positive integer"),
                                  (SamplingParams(max_new_tokens=0), "positive integer"),
                                  (SamplingParams(temperature=math.nan), "finite number"),
                                  (SamplingParams(temperature=math.inf), "finite number"),
                                  (SamplingParams(top_p=math.nan), "top_p"), (SamplingParams(top_k=-1), "top_k")):
            with pytest.raises(InvalidRequest, match=message):
                await collect(engine, GenerationRequest(prompt="hi", sampling=sampling))
        with pytest.raises(InvalidRequest, match="the model's context is 256 tokens"):
            await collect(engine, GenerationRequest(prompt="word " * 300))
        assert engine.stats().active == 0
    finally:
        await engine.shutdown(grace=0)


# ---- logs -----------------------------------------------------------------------------------------------------
def test_default_logging_keeps_torch_compile_quiet(monkeypatch):
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))  # setup_logging replaces them
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    inductor = logging.getLogger("torch._inductor.hardening_probe")
    inductor.setLevel(logging.INFO)  # as torch.compile's debug settings leave it
    engine_log = logging.getLogger("minercore.engine.loop")
    before = engine_log.level
    neuron.setup_logging(build_config(["--offline"]))
    assert inductor.getEffectiveLevel() == logging.WARNING
    assert engine_log.level == before  # minercore's own loggers are left alone
    inductor.setLevel(logging.INFO)
    neuron.setup_logging(build_config(["--offline", "--logging.debug"]))
    assert inductor.getEffectiveLevel() == logging.INFO
