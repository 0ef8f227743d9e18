"""The hardening checks below the axon in the miner and the engine: the request shape, the freshness rules, the
engine's verdicts on odd input, and the log levels. (guard.py's checks: test_guard.py.)"""

import logging
import math

import pytest
from helpers import tiny_engine

from minercore.generation import GenerationRequest, InvalidRequest, SamplingParams
from minercore.miner import neuron
from minercore.miner.config import build_config
from minercore.miner.protocol import StreamPrompting

TYPES = {"StreamPrompting": StreamPrompting}


# ---- the request's shape (Miner.forward) ----------------------------------------------------------------------
@pytest.mark.parametrize("roles, messages, problem", [
    ([], [], "messages is empty"),
    (["user"], ["a", "b"], "roles has 1 entries and messages has 2: give exactly one role per message"),
    (["user", "user"], ["a"], "roles has 2 entries and messages has 1: give exactly one role per message"),
    (["user", "user"], ["x" * 60, "y" * 41], "messages hold 101 characters; the limit is 100"),
    (["user"], [""], None),  # the engine judges content: "prompt is empty"
    (["system", "user"], ["x" * 50, "y" * 50], None),
])
def test_request_problem(roles, messages, problem):
    assert neuron.request_problem(StreamPrompting(roles=roles, messages=messages), max_chars=100) == problem


# ---- what bittensor's nonce check cannot hold (Miner.verify) ------------------------------------------------
def signed_headers(**changes: str) -> StreamPrompting:
    synapse = StreamPrompting(roles=["user"], messages=["hi"])
    synapse.dendrite.version, synapse.dendrite.nonce = 10005000, 1
    headers = {**synapse.to_headers(), "timeout": "12.0", **changes}
    return StreamPrompting.from_headers(headers)


@pytest.mark.parametrize("changes, problem", [
    ({}, None),
    ({"timeout": "600"}, None),
    ({"bt_header_dendrite_version": "7002000"}, None),
    ({"timeout": "600.5"}, "timeout 600.5 is out of range: give a number of seconds in (0, 600]"),
    ({"timeout": "0"}, "timeout 0.0 is out of range"),
    ({"timeout": "-3"}, "timeout -3.0 is out of range"),
    ({"timeout": "nan"}, "timeout nan is out of range"),
    ({"timeout": "-inf"}, "timeout -inf is out of range"),
    ({"bt_header_dendrite_version": "7001999"}, "dendrite version 7001999 is older than 7.2.0"),
    ({"bt_header_dendrite_version": "0"}, "dendrite version 0 is older than 7.2.0"),
])
def test_freshness_problem(changes, problem):
    found = neuron.freshness_problem(signed_headers(**changes), max_timeout=600.0)
    assert found == problem if problem is None else found.startswith(problem), found


def test_a_missing_dendrite_version_is_refused():
    synapse = signed_headers()
    synapse.dendrite.version = None
    assert "dendrite version None is older than 7.2.0" in neuron.freshness_problem(synapse, 600.0)


# ---- the engine's verdicts (below the miner) ------------------------------------------------------------------
async def collect(engine, request: GenerationRequest) -> tuple[str, str | None]:
    parts, reason = [], None
    async for piece in engine.generate(request):
        parts.append(piece.text)
        reason = piece.finish_reason
    return "".join(parts), reason


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
    monkeypatch.setattr(neuron.bt.logging, "set_config", lambda config: None)
    monkeypatch.setattr(neuron.bt.logging, "enable_info", lambda: None)
    inductor = logging.getLogger("torch._inductor.hardening_probe")
    inductor.setLevel(logging.INFO)  # what bittensor's enable_info does to every logger
    engine_log = logging.getLogger("minercore.engine")
    before = engine_log.level
    neuron.setup_logging(build_config(["--offline"]))
    assert inductor.getEffectiveLevel() == logging.WARNING
    assert engine_log.level == before  # minercore's own loggers are left alone
    inductor.setLevel(logging.INFO)
    neuron.setup_logging(build_config(["--offline", "--logging.debug"]))
    assert inductor.getEffectiveLevel() == logging.INFO
