"""The real miner (``neurons/miner.py --offline``, the real Engine with the tiny model) in a subprocess, queried
through real dendrites on loopback: byte-exact echoes, concurrency, errors, both stream loops, shutdown."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PROSE, miner_process, mixed_prompt, stream_prompt

from minercore.miner import client
from minercore.text.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300  # import, model build and warm-up on a busy 2-core machine
STREAM_TIMEOUT_S = 240.0

MIXED_2K = mixed_prompt(2000)


@pytest.fixture(scope="module")
def miner(tmp_path_factory):
    with miner_process(tmp_path_factory.mktemp("miner")) as running:
        yield running
        assert running.stop() == 0, running.log()
        assert not running.info_file.exists()


def caller():
    return client.ephemeral_keypair()


async def echo(target, prompt: str) -> client.StreamResult:
    return await stream_prompt(target, [prompt], wallet=caller(), timeout=STREAM_TIMEOUT_S)


def test_startup_reports_the_engine(miner):
    log = miner.log()
    assert "compile warm-up" in log and "preset tiny" in log and "cpu" in log
    assert "compiled stream loop active" in log
    assert miner.info["ip"] == "127.0.0.1" and miner.info["pid"] == miner.process.pid
    assert f"--axon.info_file {miner.info_file}" in log  # how to query it


async def test_2000_token_mixed_prompt_is_echoed_byte_for_byte(miner):
    assert 1900 <= len(load_tokenizer("gpt2").encode(MIXED_2K)) <= 2000
    result = await echo(miner.target, MIXED_2K)
    assert result.ok, result
    assert result.text.encode() == MIXED_2K.encode()
    assert result.chunks > 1 and result.ttft_s < result.duration_s


async def test_btauth_signed_chat_echoes_the_mixed_prompt_byte_for_byte(miner):
    info = miner.info
    target = client.Target(info["ip"], info["port"], info["hotkey"])
    result = await client.stream_openai(target, ["You are terse.", MIXED_2K], ["system", "user"], wallet=caller(),
                                        timeout=STREAM_TIMEOUT_S)
    assert result.ok, result
    assert result.text.encode() == MIXED_2K.encode()


async def test_single_token_prompt(miner):
    result = await echo(miner.target, "Hi")  # the seed answers this with an empty completion
    assert result.ok and result.text == "Hi"


async def test_system_and_user_messages_echo_the_last(miner):
    result = await stream_prompt(miner.target, ["You are terse.", "Ça va? 世界"], ["system", "user"],
                                        wallet=caller(), timeout=STREAM_TIMEOUT_S)
    assert result.ok and result.text == "Ça va? 世界"


async def test_16_concurrent_clients_each_get_their_own_text(miner):
    prompts = [f"client {i}: {PROSE[:60 + 7 * i]} #{i} {'🎉' * (i % 4)}\nend {i}" for i in range(16)]
    results = await asyncio.gather(*(echo(miner.target, prompt) for prompt in prompts))
    assert [r.status_code for r in results] == [200] * 16
    assert [r.text for r in results] == prompts


async def test_bad_input_gets_a_clear_error_then_the_next_request_succeeds(miner):
    bad = await stream_prompt(miner.target, ["one", "two"], ["user"], wallet=caller())
    assert bad.status_code == 400 and "give exactly one role per message" in bad.status_message
    empty = await echo(miner.target, "")
    assert empty.status_code == 400 and "empty" in empty.status_message
    good = await echo(miner.target, "after the error")
    assert good.ok and good.text == "after the error"


def test_client_command_line_prints_the_text_live(miner):
    prompt = "Héllo from the command line 世界 🎉\nsecond line"
    out = subprocess.run([sys.executable, "neurons/client.py", "--axon.info_file", str(miner.info_file),
                          "--prompt", prompt], cwd=ROOT, capture_output=True, timeout=STREAM_TIMEOUT_S)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode() == prompt
    assert "status 200, TTFT" in out.stderr.decode() and "tokens/s" in out.stderr.decode()


def test_pure_python_stream_loop_and_graceful_shutdown(tmp_path):
    prompt = mixed_prompt(400)
    with miner_process(tmp_path, "--neuron.shutdown_grace", "120", env={"MINERCORE_NO_EXTENSIONS": "1"}) as running:
        assert "compiled stream loop inactive (pure-Python twin)" in running.log()

        async def scenario() -> tuple[client.StreamResult, client.StreamResult]:
            target = running.target
            first = await echo(target, prompt)
            assert first.ok and first.text == prompt
            # SIGTERM while a stream runs: it still finishes whole, and new requests are refused.
            streaming = asyncio.create_task(echo(target, prompt))
            await asyncio.sleep(0.5)
            running.terminate()
            await asyncio.sleep(0.5)
            late = await echo(target, "too late")
            return await streaming, late

        finished, late = asyncio.run(scenario())
        assert finished.ok and finished.text == prompt
        assert not late.ok
        assert running.stop() == 0, running.log()
        assert not running.info_file.exists()
        assert "shutting down" in running.log()
