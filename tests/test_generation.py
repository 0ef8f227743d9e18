"""The contract (minercore.contract.generation): the one set of request checks every backend applies, and the
exceptions' outcome labels and HTTP statuses as each front end answers them."""

import math
import subprocess
import sys

import pytest

from minercore.contract.generation import (
    EngineClosed,
    EngineOverloaded,
    GenerationError,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
    check_messages,
    check_one_source,
    check_prompt_ids,
    check_prompt_text,
    validated_sampling,
)


# ---- sampling ---------------------------------------------------------------------------------------------------
def test_valid_sampling_is_capped_at_the_ceiling_and_normalised():
    checked = validated_sampling(SamplingParams(max_new_tokens=10**9, stop=["END"], temperature=1), ceiling=64)
    assert checked.max_new_tokens == 64 and checked.stop == ("END",) and checked.temperature == 1
    assert validated_sampling(SamplingParams(max_new_tokens=5), ceiling=64).max_new_tokens == 5


@pytest.mark.parametrize("sampling, message", [
    ("greedy", "sampling must be SamplingParams"),
    (SamplingParams(max_new_tokens=0), "positive integer"),
    (SamplingParams(max_new_tokens=True), "positive integer"),
    (SamplingParams(max_new_tokens=2.5), "positive integer"),
    (SamplingParams(temperature=-0.1), "finite number >= 0"),
    (SamplingParams(temperature=math.inf), "finite number >= 0"),
    (SamplingParams(temperature="hot"), "finite number >= 0"),
    (SamplingParams(top_k=-1), "top_k"),
    (SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (SamplingParams(top_p=math.nan), "top_p"),
    (SamplingParams(top_p=1.5), "top_p"),
    (SamplingParams(seed=-1), "seed"),
    (SamplingParams(stop=tuple(str(i) for i in range(17))), "at most 16 stop strings"),
    (SamplingParams(stop=("",)), "non-empty strings"),
    (SamplingParams(stop=("x" * 257,)), "at most 256 characters"),
    (SamplingParams(stop=(3,)), "non-empty strings"),
    (SamplingParams(stop=("half \ud800",)), "valid Unicode"),
])
def test_absurd_sampling_is_an_invalid_request(sampling, message):
    with pytest.raises(InvalidRequest, match=message):
        validated_sampling(sampling, ceiling=64)


# ---- prompt text ------------------------------------------------------------------------------------------------
def test_prompt_text_passes_unchanged_up_to_the_limit():
    for text in ("a", "x" * 10, "\x00\u2028<|eot|>", "😀🎉"):
        assert check_prompt_text(text, max_chars=10) is text


@pytest.mark.parametrize("text, message", [
    (None, "prompt must be a string"),
    ([1, 2], "prompt must be a string"),
    ("", "prompt is empty"),
    ("y" * 11, "prompt is 11 characters; the limit is 10"),
    ("lone \ud800", r"not valid Unicode text \(it contains a lone surrogate\)"),
])
def test_bad_prompt_text_is_an_invalid_request(text, message):
    with pytest.raises(InvalidRequest, match=message):
        check_prompt_text(text, max_chars=10)


# ---- messages ---------------------------------------------------------------------------------------------------
def test_messages_are_normalised_to_role_and_content():
    given = [{"role": "system", "content": "be brief", "name": "x"}, {"content": "hi"}, {"role": "", "content": ""}]
    assert check_messages(given, max_chars=100) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "user", "content": ""}]


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (None, "non-empty list"),
    (["hello"], r"\{'role': str, 'content': str\}"),
    ([{"role": "user"}], "'content': str"),
    ([{"role": "user", "content": 3}], "'content': str"),
    ([{"role": 1, "content": "x"}], "'role': str"),
    ([{"role": "user", "content": "x" * 6}, {"role": "user", "content": "y" * 5}],
     "messages hold 11 characters; the limit is 10"),
])
def test_bad_messages_are_an_invalid_request(messages, message):
    with pytest.raises(InvalidRequest, match=message):
        check_messages(messages, max_chars=10)


@pytest.mark.parametrize("fields", [{}, {"prompt": "a", "prompt_ids": [1]}, {"prompt": "a", "messages": []},
                                    {"prompt": "a", "prompt_ids": [1], "messages": []}])
def test_exactly_one_source(fields):
    with pytest.raises(InvalidRequest, match="exactly one of prompt, prompt_ids or messages"):
        check_one_source(GenerationRequest(**fields))
    for one in ({"prompt": ""}, {"prompt_ids": []}, {"messages": []}):
        check_one_source(GenerationRequest(**one))  # emptiness is each source's own check


# ---- failures -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error, outcome, status", [
    (InvalidRequest("x"), "invalid", 400),
    (EngineOverloaded("x"), "overloaded", 503),
    (EngineClosed("x"), "closed", 503),
    (GenerationFailed("x"), "failed", 500),
])
def test_each_failure_knows_its_outcome_and_status(error, outcome, status):
    assert isinstance(error, GenerationError)
    assert (error.outcome, error.http_status) == (outcome, status)


def test_failures_keep_their_builtin_bases():
    assert isinstance(InvalidRequest("x"), ValueError)
    assert all(isinstance(cls("x"), RuntimeError) for cls in (EngineOverloaded, EngineClosed, GenerationFailed))


def test_the_server_answers_an_overload_with_429_and_the_rest_with_the_contract_status():
    from minercore.serve.openai_api import _backend_error

    overloaded = _backend_error(EngineOverloaded("all slots busy"))
    assert (overloaded.status, overloaded.type, overloaded.code) == (429, "overloaded_error", "engine_overloaded")
    assert overloaded.response().headers["retry-after"] == "1"
    for error, type_, code in ((InvalidRequest("bad"), "invalid_request_error", "invalid_request"),
                               (EngineClosed("closing"), "service_unavailable_error", "engine_closed"),
                               (GenerationFailed("oom"), "server_error", "generation_failed")):
        api = _backend_error(error)
        assert (api.status, api.type, api.code, api.message) == (error.http_status, type_, code, str(error))


def test_the_contract_imports_no_torch():
    code = ("import sys, minercore.contract.generation, minercore.contract.options, minercore.contract.observe, "
            "minercore.backends; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("ids, vocab, message", [
    ([], None, "prompt is empty"),
    ((), 10, "prompt is empty"),
    ([1, -1], None, r"token ids in >= 0"),
    ([1, True], None, r"token ids in >= 0"),
    ([1, 2.0], 10, r"token ids in \[0, 10\)"),
    ([1, 10], 10, r"token ids in \[0, 10\)"),
])
def test_prompt_ids_must_be_token_ids(ids, vocab, message) -> None:
    with pytest.raises(InvalidRequest, match=message):
        check_prompt_ids(ids, vocab)


def test_prompt_ids_pass_as_a_list() -> None:
    assert check_prompt_ids((0, 9), 10) == [0, 9]
    assert check_prompt_ids(iter([123_456])) == [123_456]  # no vocabulary known: any id >= 0
