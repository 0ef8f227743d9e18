"""The client (``neurons/client.py``'s logic) against an in-process miner with a fake engine on loopback, in
each protocol the installed SDK speaks: openai (btauth/1) always, streamprompting (a real 10.x Dendrite) with
bittensor 10. (Against the real engine: test_miner_loopback.py.)"""

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MIXED, FakeEngine, free_port, new_keypair, running_miner

from minercore.miner import client, sdk
from minercore.miner.sdk import ensure_wallet
from minercore.text.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ["openai", *(["streamprompting"] if sdk.MAJOR == 10 else [])]


async def run_client(*args: str) -> int:
    """``client.main`` in a worker thread (it runs its own event loop) while this loop serves the miner."""
    return await asyncio.to_thread(client.main, list(args))


def with_protocol(protocol: str, *args: str) -> tuple[str, ...]:
    return ("--protocol", protocol, *args)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_prints_the_text_live_then_its_stats(tmp_path, capsys, protocol):
    async with running_miner(tmp_path, engine=FakeEngine(chunk=3)):
        capsys.readouterr()  # the miner's own "listening" note
        code = await run_client(*with_protocol(protocol, "--axon.info_file", str(tmp_path / "axon.json"), "--prompt",
                                               MIXED))
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out == MIXED  # stdout is exactly the text; everything else goes to stderr
    assert "stream 1: status 200, TTFT" in out.err and "tokens/s" in out.err and " chunks" in out.err


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_json_with_concurrency(tmp_path, capsys, protocol):
    async with running_miner(tmp_path, engine=FakeEngine()) as miner:
        info = miner.info
        capsys.readouterr()
        code = await run_client(*with_protocol(protocol, "--axon.ip", info["ip"], "--axon.port", str(info["port"]),
                                               "--axon.hotkey", info["hotkey"], "--prompt", MIXED, "--concurrency",
                                               "3", "--json"))
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is True and len(document["streams"]) == 3
    tokens = len(load_tokenizer("gpt2").encode(MIXED))
    for stream in document["streams"]:
        assert stream["text"] == MIXED and stream["status_code"] == 200 and stream["ok"]
        assert stream["tokens"] == tokens and stream["chars"] == len(MIXED)
        assert stream["ttft_s"] <= stream["duration_s"] and stream["chunks"] >= 1
    aggregate = document["aggregate"]
    assert aggregate["streams"] == 3 and aggregate["failed"] == 0 and aggregate["tokens"] == 3 * tokens
    assert aggregate["tokens_per_s"] > 0 and aggregate["median_ttft_s"] > 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_prompt_from_stdin_and_from_a_file(tmp_path, capsys, monkeypatch, protocol):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("from a file ✓\n", encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin 世界"))
    async with running_miner(tmp_path):
        info_file = str(tmp_path / "axon.json")
        capsys.readouterr()
        assert await run_client(*with_protocol(protocol, "--axon.info_file", info_file)) == 0
        assert capsys.readouterr().out == "from stdin 世界"
        assert await run_client(*with_protocol(protocol, "--axon.info_file", info_file, "--prompt_file",
                                               str(prompt_file))) == 0
        assert capsys.readouterr().out == "from a file ✓\n"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_any_failed_stream_exits_1(tmp_path, capsys, protocol):
    async with running_miner(tmp_path) as miner:
        capsys.readouterr()
        wrong_hotkey = new_keypair().ss58_address
        code = await run_client(*with_protocol(protocol, "--axon.ip", "127.0.0.1", "--axon.port",
                                               str(miner.info["port"]), "--axon.hotkey", wrong_hotkey, "--prompt",
                                               "hi"))
        assert code == 1
        assert "stream 1: FAILED (status 401" in capsys.readouterr().err
        code = await run_client(*with_protocol(protocol, "--axon.info_file", str(tmp_path / "axon.json"), "--prompt",
                                               "hi", "--timeout", "0.000001", "--json"))
        assert code == 1
        stream = json.loads(capsys.readouterr().out)["streams"][0]
        # The dendrite reports its own 408; the openai client the exception of its whole-request deadline.
        assert stream["status_code"] == 408 if protocol == "streamprompting" else "TimeoutError" in stream["error"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_signing_with_a_wallet(tmp_path, capsys, protocol):
    wallet = ensure_wallet("caller", "default", str(tmp_path / "caller-wallets"))
    async with running_miner(tmp_path, "--blacklist.allow", wallet.hotkey.ss58_address):
        info_file = str(tmp_path / "axon.json")
        capsys.readouterr()
        signed = with_protocol(protocol, "--axon.info_file", info_file, "--prompt", "allowed", "--wallet.name",
                               "caller", "--wallet.path", str(tmp_path / "caller-wallets"))
        assert await run_client(*signed) == 0
        assert capsys.readouterr().out == "allowed"
        anonymous = with_protocol(protocol, "--axon.info_file", info_file, "--prompt", "anonymous")
        assert await run_client(*anonymous) == 1  # not on the list
        assert "status 403" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x"], "--axon.info_file"),
    (["--axon.info_file", "/nonexistent/axon.json", "--prompt", "x"], "cannot read --axon.info_file"),
    (["--axon.ip", "127.0.0.1", "--axon.port", "9", "--axon.hotkey", "5x", "--prompt", "x", "--prompt_file", "f"],
     "not both"),
    (["--axon.ip", "127.0.0.1", "--axon.port", "9", "--axon.hotkey", "5x", "--prompt", "x", "--concurrency", "0"],
     "--concurrency"),
    (["--axon.ip", "127.0.0.1", "--axon.port", "9", "--axon.hotkey", "5x", "--prompt", "x", "--wallet.name",
      "no-such-wallet", "--wallet.path", "/nonexistent"], "cannot load hotkey"),
])
def test_usage_errors_exit_2(args, message, capsys):
    assert client.main(args) == 2
    assert message in capsys.readouterr().err


async def test_unreachable_miner_is_a_failed_result():
    dead = client.Target("127.0.0.1", free_port(), new_keypair().ss58_address)
    result = await client.stream_openai(dead, ["hi"], wallet=new_keypair(), timeout=5)
    assert not result.ok and "ConnectError" in result.error and result.text == ""


@pytest.mark.bt10
async def test_unreachable_miner_is_a_failed_dendrite_result():
    dead = client.axon_info("127.0.0.1", free_port(), new_keypair().ss58_address)
    result = await client.stream_prompt(dead, ["hi"], wallet=new_keypair(), timeout=5)
    assert not result.ok and result.status_code == 503 and result.text == ""


def test_streamprompting_needs_bittensor_10(capsys):
    args = ["--protocol", "streamprompting", "--axon.ip", "127.0.0.1", "--axon.port", "9", "--axon.hotkey",
            new_keypair().ss58_address, "--prompt", "x"]
    if sdk.MAJOR == 10:
        assert "streamprompting" in client.build_parser().parse_args(args).protocol
    else:
        assert client.main(args) == 2
        assert "needs bittensor 10.x" in capsys.readouterr().err


def test_entry_point_help():
    out = subprocess.run([sys.executable, "neurons/client.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for option in ("--axon.info_file", "--axon.ip", "--axon.port", "--axon.hotkey", "--prompt", "--prompt_file",
                   "--concurrency", "--timeout", "--json", "--wallet.name", "--protocol"):
        assert option in out.stdout


@pytest.mark.bt10
async def test_a_reused_dendrite_serves_request_after_request(tmp_path):
    async with running_miner(tmp_path, engine=FakeEngine()) as miner:
        target = client.target_from_info_file(str(tmp_path / "axon.json"))
        async with client.make_dendrite(new_keypair()) as dendrite:
            for prompt in ("first", "second ✓", MIXED):
                result = await client.stream_prompt(target, [prompt], dendrite=dendrite)
                assert result.ok and result.text == prompt
        assert len(miner.server.dendrites.endpoints) == 1  # one caller endpoint: the dendrite's hotkey and uuid
    for identity in ({}, {"wallet": new_keypair(), "dendrite": dendrite}):
        with pytest.raises(ValueError, match="exactly one of wallet and dendrite"):
            await client.stream_prompt(target, ["hi"], **identity)
