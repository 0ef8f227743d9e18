"""The miner's Prometheus endpoint after real traffic: served, refused and rate-limited."""

import asyncio

import pytest
from helpers import free_port, new_keypair, running_miner, scrape, stream_prompt, target, tiny_engine

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_metrics_after_traffic(tmp_path):
    port = free_port()
    caller = new_keypair()
    async with running_miner(tmp_path, "--metrics.port", str(port), "--blacklist.deny", new_keypair().ss58_address,
                             "--blacklist.rate_limit", "3", engine=tiny_engine()) as miner:
        answers = await asyncio.gather(*(stream_prompt(target(miner), [f"metrics ✓ {i}"], wallet=caller)
                                         for i in range(2)))
        assert [a.text for a in answers] == ["metrics ✓ 0", "metrics ✓ 1"]
        bad = await stream_prompt(target(miner), ["a", "b"], ["user"], wallet=new_keypair())
        assert bad.status_code == 400
        limited = [await stream_prompt(target(miner), ["again"], wallet=caller) for _ in range(3)]
        assert [r.status_code for r in limited] == [200, 429, 429]
        samples = await asyncio.to_thread(scrape, port)
        families = {family.name for family in miner.metrics.registry.collect()}

    assert "minercore_upstream_errors" in families  # declared, with no samples: this miner has no upstream

    assert samples['minercore_requests_total{caller_class="unregistered",outcome="eos"}'] == 3
    # refused for its shape before its signature was checked: the caller is not known
    assert samples['minercore_requests_total{caller_class="unverified",outcome="invalid"}'] == 1
    assert samples['minercore_blacklist_rejections_total{reason="rate_limit"}'] == 2
    assert samples['minercore_tokens_total{caller_class="unregistered"}'] > 0
    assert samples['minercore_ttft_seconds_count{caller_class="unregistered"}'] == 3
    assert samples["minercore_chunk_gap_seconds_count"] > 0
    assert samples["minercore_active_streams"] == 0
    assert samples["minercore_queued_streams"] == 0
