"""Many concurrent streaming completions, a third of whose clients leave mid-stream, and KV-cache
exhaustion under load: every surviving stream gets exactly the tokens it gets alone, and the
server ends idle with every KV block free (read from /metrics)."""
from __future__ import annotations

import httpx

from octavo.bench.stress import metrics, stream_workload, wait_idle


def _assert_idle(url: str) -> dict:
    m = wait_idle(url)
    assert m["octavo:num_requests_running"] == 0
    assert m["octavo:num_requests_waiting"] == 0
    assert m["octavo:kv_cache_free_blocks"] == m["octavo:kv_cache_total_blocks"] > 0
    assert m["octavo:kv_cache_usage_perc"] == 0
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    return m


def test_64_streams_a_third_leaving(server):
    before = metrics(server.url)
    report = stream_workload(server.url, num_streams=64, max_tokens=24, leave_every=3,
                             num_prompts=16)
    print(f"streams: {report}")
    assert report["problems"] == []
    assert report["leaving"] == 22 and report["aborted"] + report["completed"] == 64
    assert report["aborted"] >= 18           # a stream can end before its client's cut
    after = _assert_idle(server.url)
    aborted = (after["octavo:request_success_total:abort"]
               - before["octavo:request_success_total:abort"])
    # a client may leave just as its last token goes out; nearly all must be aborts
    assert report["aborted"] - 3 <= aborted <= report["aborted"]


def test_kv_exhaustion_preempts_and_resumes(server):
    """32 blocks of 16 tokens; 24 streams of ~10 + 40 tokens want about 96 at once."""
    before = metrics(server.url)["octavo:num_preemptions_total"]
    report = stream_workload(server.url, num_streams=24, max_tokens=40, leave_every=None,
                             num_prompts=8, seed=1)
    print(f"kv exhaustion: {report}")
    assert report["problems"] == [] and report["completed"] == 24
    after = _assert_idle(server.url)
    assert after["octavo:num_preemptions_total"] > before, "nothing was preempted"
