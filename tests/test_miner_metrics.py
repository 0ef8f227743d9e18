"""The miner's Prometheus endpoint after real traffic through a real axon: served, refused and rate-limited."""

import asyncio
import re

import aiohttp
import pytest
from test_hardening_input import tiny_engine
from test_miner_online import free_port, new_keypair, running_miner, target

from minercore.miner import client

pytestmark = pytest.mark.asyncio(loop_scope="module")


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:{{(.*)}})? (\S+)", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


async def test_metrics_after_traffic(tmp_path):
    port = free_port()
    caller = new_keypair()
    async with running_miner(tmp_path, "--metrics.port", str(port), "--blacklist.deny", new_keypair().ss58_address,
                             "--blacklist.rate_limit", "3", engine=tiny_engine()) as miner:
        answers = await asyncio.gather(*(client.stream_prompt(target(miner), [f"metrics ✓ {i}"], wallet=caller)
                                         for i in range(2)))
        assert [a.text for a in answers] == ["metrics ✓ 0", "metrics ✓ 1"]
        bad = await client.stream_prompt(target(miner), ["a", "b"], ["user"], wallet=new_keypair())
        assert bad.status_code == 400
        limited = [await client.stream_prompt(target(miner), ["again"], wallet=caller) for _ in range(3)]
        assert [r.status_code for r in limited] == [200, 401, 401]
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()

    assert sample(text, "minercore_requests_total", outcome="eos", caller_class="unregistered") == 3
    assert sample(text, "minercore_requests_total", outcome="invalid", caller_class="unregistered") == 1
    assert sample(text, "minercore_blacklist_rejections_total", reason="rate_limit") == 2
    assert sample(text, "minercore_tokens_total", caller_class="unregistered") > 0
    assert sample(text, "minercore_ttft_seconds_count", caller_class="unregistered") == 3
    assert "minercore_chunk_gap_seconds_bucket" in text
    assert sample(text, "minercore_active_streams") == 0
    assert "minercore_queued_streams" in text and "minercore_upstream_errors" in text
