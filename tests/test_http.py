"""HTTP discipline against real local servers: retries and backoff, permanent errors, pooling, metrics.

A scripted stdlib HTTP server answers each request with the next (status, body) of its script, so
the client's behaviour on 503/429/5xx, 4xx, refused connections and slow answers is observed over
real sockets.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from etsq.errors import PermanentError, TransientError
from etsq.models.base import child_seed
from etsq.models.http import RetryConfig, ServerClient, client_for, normalize_url
from etsq.models.metrics import (
    NAMES,
    SNAPSHOTS,
    metric_sum,
    parse_prometheus,
    sglang_snapshot,
    vllm_snapshot,
)
from etsq.models.remote import delimited_step, two_way
from etsq.queue.broker import free_local_port

FAST = RetryConfig(attempts=4, backoff_s=0.05, max_backoff_s=0.2, connect_timeout_s=1.0, read_timeout_s=1.0)


class _Handler(BaseHTTPRequestHandler):
    server: Scripted

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()

    def _answer(self) -> None:
        server = self.server
        server.arrivals.append(time.monotonic())
        status, body = server.script[min(len(server.arrivals), len(server.script)) - 1]
        time.sleep(server.delay_s)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Scripted(ThreadingHTTPServer):
    """Answers request i with script[i] (the last entry repeats); remembers when each came."""

    daemon_threads = True
    handler: type[BaseHTTPRequestHandler] = _Handler

    def __init__(self, script: list[tuple[int, Any]], delay_s: float = 0.0) -> None:
        super().__init__(("127.0.0.1", free_local_port()), self.handler)
        self.script, self.delay_s, self.arrivals = script, delay_s, []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _serve(
    script: list[tuple[int, Any]], delay_s: float = 0.0, kind: type[Scripted] = Scripted
) -> Iterator[Scripted]:
    server = kind(script, delay_s)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _client(url: str, retry: RetryConfig = FAST) -> ServerClient:
    return ServerClient(url, retry)


@pytest.mark.parametrize("status", [503, 429, 500, 502])
def test_retryable_statuses_are_retried_with_backoff(status: int) -> None:
    for server in _serve([(status, {"error": {"message": "busy"}}), (status, {}), (200, {"ok": True})]):
        client = _client(server.url)
        assert client.call(client.post_json("/generate", {"text": "x"})) == {"ok": True}
        assert len(server.arrivals) == 3
        gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:], strict=False)]
        assert gaps[0] >= FAST.pause(0) * 0.9 and gaps[1] >= FAST.pause(1) * 0.9  # exponential backoff


def test_a_server_that_stays_unavailable_is_a_transient_error() -> None:
    for server in _serve([(503, {"error": {"message": "overloaded"}})]):
        client = _client(server.url)
        with pytest.raises(TransientError, match=r"HTTP 503 overloaded \(after 4 attempts\)"):
            client.call(client.get_json("/health"))
        assert len(server.arrivals) == FAST.attempts


def test_a_client_error_is_permanent_and_not_retried() -> None:
    for server in _serve([(400, {"error": {"message": "max_new_tokens must be at least 0"}})]):
        client = _client(server.url)
        with pytest.raises(PermanentError, match="HTTP 400 max_new_tokens must be at least 0") as info:
            client.call(client.post_json("/generate", {}))
        assert not isinstance(info.value, TransientError)
        assert len(server.arrivals) == 1


def test_refused_connections_are_retried_then_transient() -> None:
    client = _client(f"http://127.0.0.1:{free_local_port()}")
    started = time.monotonic()
    with pytest.raises(TransientError, match=r"ConnectError.*after 4 attempts"):
        client.call(client.get_json("/v1/models"))
    assert time.monotonic() - started >= sum(FAST.pause(i) for i in range(FAST.attempts - 1)) * 0.9


def test_a_slow_server_times_out_as_transient() -> None:
    slow = RetryConfig(attempts=2, backoff_s=0.01, connect_timeout_s=1.0, read_timeout_s=0.2)
    for server in _serve([(200, {"late": True})], delay_s=0.6):
        client = _client(server.url, slow)
        with pytest.raises(TransientError, match="ReadTimeout"):
            client.call(client.get_json("/generate"))
        assert len(server.arrivals) == 2


def test_concurrent_requests_share_one_pooled_client() -> None:
    import asyncio

    for server in _serve([(200, {"ok": 1})], delay_s=0.2):
        client = client_for(server.url + "/")
        assert client is client_for(server.url) and client.base_url == normalize_url(server.url)

        async def many(client: ServerClient = client) -> list[Any]:
            return list(await asyncio.gather(*(client.get_json("/x") for _ in range(8))))

        started = time.monotonic()
        assert client.call(many()) == [{"ok": 1}] * 8
        assert time.monotonic() - started < 8 * 0.2  # they overlapped instead of queueing


class _KeepAlive(_Handler):
    protocol_version = "HTTP/1.1"  # connections stay open between requests, as vLLM's and SGLang's do


class _Connections(Scripted):
    """A keep-alive server that counts the connections it accepts."""

    handler = _KeepAlive
    request_queue_size = 64  # listen's backlog: a burst's connections are all accepted at once
    accepted = 0

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.accepted += 1
        return True


def test_a_depths_burst_of_requests_leaves_its_connections_open_for_the_next() -> None:
    """Later depths of 48 requests at once reuse the connections the first opened: with 16 kept,
    each depth connected again (112 connections over 3 depths), which cost a search's HTTP loop 5%
    of its time (py-spy, REBASE K=16 on vLLM)."""
    # 0.5 s: long enough that a depth's requests all overlap
    for server in _serve([(200, {"ok": 1})], delay_s=0.5, kind=_Connections):
        client = _client(server.url)

        async def depth(client: ServerClient = client) -> list[Any]:
            return list(await asyncio.gather(*(client.get_json("/x") for _ in range(48))))

        try:
            assert client.call(depth()) == [{"ok": 1}] * 48
            first = server.accepted
            for _ in range(2):
                assert client.call(depth()) == [{"ok": 1}] * 48
            assert first > 16 and server.accepted == first
        finally:
            client.call(client.aclose())


class _ClosesIdle(_KeepAlive):
    timeout = 0.2  # the server closes a connection idle this long, as uvicorn does after 5 s


class _Impatient(_Connections):
    handler = _ClosesIdle


def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    """Between two depths the server may close the idle connections: the next request connects
    again at once instead of failing on a closed one and waiting out a retry's pause."""
    for server in _serve([(200, {"ok": 1})], kind=_Impatient):
        client = _client(server.url)
        try:
            assert client.call(client.get_json("/x")) == {"ok": 1}
            time.sleep(0.6)
            started = time.monotonic()
            assert client.call(client.get_json("/x")) == {"ok": 1}
            assert time.monotonic() - started < FAST.pause(0)
            assert (len(server.arrivals), server.accepted) == (2, 2)
        finally:
            client.call(client.aclose())


_EXITING = """
import os, sys
from etsq.models.http import client_for
client = client_for(sys.argv[1])
print(client.call(client.get_json("/x")), flush=True)
if sys.argv[2] == "fork":  # a child forked with the parent's connections open gets a client of its own
    pid = os.fork()
    if pid == 0:
        child = client_for(sys.argv[1])
        print(child is not client, child.call(child.get_json("/x")), flush=True)
        os._exit(0)  # as multiprocessing's and billiard's children leave
    os.waitpid(pid, 0)
    print(client.call(client.get_json("/x")), flush=True)  # the parent's client opens new connections
"""


@pytest.mark.parametrize("how", ["exit", "fork"])
def test_a_process_leaves_with_its_clients_open_and_says_nothing(how: str) -> None:
    """A command that checked a server exits with the client's session open: it is closed at exit, so
    nothing like aiohttp's "Unclosed client session" reaches the command's stderr.  Before a fork
    the sessions are closed too: a child that collected its parent's open connections would close
    their sockets and unregister them from the epoll instance that the two share."""
    import subprocess
    import sys

    for server in _serve([(200, {"ok": 1})], kind=_Connections):
        run = subprocess.run(
            [sys.executable, "-c", _EXITING, server.url, how], capture_output=True, text=True, timeout=60
        )
    expected = ["{'ok': 1}"] + (["True {'ok': 1}", "{'ok': 1}"] if how == "fork" else [])
    assert (run.returncode, run.stdout.splitlines(), run.stderr) == (0, expected, "")


# --------------------------------------------------------------------------- parsing


SGLANG_METRICS = """# HELP sglang:token_usage The token usage
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.28
sglang:cache_hit_rate{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.007507552643049313
sglang:num_used_tokens{model_name="meta-llama/Llama-3.1-8B-Instruct"} 123859.0
sglang:func_latency_seconds_bucket{le="0.05",name="generate_request"} 14006.0
"""
VLLM_METRICS = """vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 4096.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 1024.0
vllm:prompt_tokens_cached_total{engine="0",model_name="m"} 1024.0
vllm:cache_config_info{block_size="128",engine="0",kv_cache_size_tokens="23296",num_gpu_blocks="182"} 1.0
"""


def test_prometheus_text_and_server_snapshots() -> None:
    samples = parse_prometheus(SGLANG_METRICS)
    assert metric_sum(samples, "sglang:num_used_tokens") == 123859.0
    assert metric_sum(samples, "sglang:missing") is None
    assert samples[-1].labels == {"le": "0.05", "name": "generate_request"}
    snap = sglang_snapshot(samples)
    assert (snap.used_tokens, snap.usage, snap.hit_rate) == (123859.0, 0.28, 0.007507552643049313)
    vllm = vllm_snapshot(parse_prometheus(VLLM_METRICS))
    assert (vllm.usage, vllm.used_tokens, vllm.hits, vllm.queries) == (0.25, 0.25 * 23296, 1024.0, 4096.0)
    # A scrape parses only the lines its snapshot reads, and reads the same snapshot.
    for flavour, page in (("vllm", VLLM_METRICS), ("sglang", SGLANG_METRICS)):
        text = page + 'vllm:num_requests_running{engine="0"} 3.0\nsglang:num_running_reqs 3.0\n'
        some = parse_prometheus(text, NAMES[flavour])
        assert {x.name for x in some} <= set(NAMES[flavour]) and len(some) < len(parse_prometheus(text))
        assert SNAPSHOTS[flavour](some) == SNAPSHOTS[flavour](parse_prometheus(text))


def test_step_parsing_and_label_scores() -> None:
    assert delimited_step("a b\n\nc", "length", "\n\n", 5).text == "a b\n\n"  # overshoot cut
    trimmed = delimited_step("a b", "stop", "\n\n", 3)  # a server that trimmed the stop string
    assert (trimmed.text, trimmed.finish_reason, trimmed.tokens) == ("a b\n\n", "stop", 3)
    assert delimited_step("a b", "eos", "\n\n", 3).finish_reason == "eos"
    assert two_way(-0.1, -2.3) == pytest.approx(1 / (1 + 2.718281828**-2.2), rel=1e-6)
    assert two_way(float("-inf"), float("-inf")) == 0.5
    seeds = {child_seed(7, i) for i in range(64)}
    assert len(seeds) == 64 and child_seed(7, 3) == child_seed(7, 3)


def test_depth_figures_from_vllm_counters() -> None:
    from etsq.models.metrics import Snapshot, _Depth, _figures

    depth = _Depth()
    depth.see(Snapshot(used_tokens=0.0, usage=0.0, hits=1000.0, queries=4000.0, cached_total=1000.0))
    depth.see(Snapshot(used_tokens=2048.0, usage=0.09, hits=1256.0, queries=4512.0, cached_total=1256.0))
    depth.see(Snapshot(used_tokens=0.0, usage=0.0, hits=1256.0, queries=4512.0, cached_total=1256.0))
    depth.prompt_tokens, depth.requests = 512, 4  # usage without prompt_tokens_details
    figures = _figures(depth)
    assert (figures["kv_tokens"], figures["kv_usage"]) == (2048, 0.09)  # peaks, not the last sample
    assert figures["cache_hit_rate"] == pytest.approx(256 / 512)  # this depth's increase
    assert (figures["cached_prompt_tokens"], figures["prompt_tokens"]) == (256, 512)  # counter fallback
    idle = _Depth()
    idle.see(Snapshot(used_tokens=0.0, usage=0.0, hits=1256.0, queries=4512.0))
    assert _figures(idle)["cache_hit_rate"] == pytest.approx(1256 / 4512)  # no requests: lifetime ratio
    assert (_figures(idle)["cached_prompt_tokens"], _figures(idle)["requests"]) == (0, 0)


class _SlowMetrics:
    """A server whose /metrics takes 1 s to answer, counting the scrapes."""

    base_url = "http://slow-metrics"

    def __init__(self) -> None:
        self.started: list[float] = []

    async def get_text(self, path: str, attempts: int | None = None) -> str:
        self.started.append(time.perf_counter())
        await asyncio.sleep(1.0)
        return 'vllm:kv_cache_usage_perc{engine="0"} 0.5\n'


class _NumberedMetrics(_SlowMetrics):
    """Each /metrics answer (1 s late) reports its scrape's number / 10 as the KV usage."""

    async def get_text(self, path: str, attempts: int | None = None) -> str:
        self.started.append(time.perf_counter())
        number = len(self.started)
        await asyncio.sleep(1.0)
        return f'vllm:kv_cache_usage_perc{{engine="0"}} {number / 10}\n'


def test_take_does_not_wait_for_the_closing_sample_and_the_next_depth_counts_it() -> None:
    """Between a depth's scoring and its commit, take() waits for no /metrics round trip once the
    server has been sampled: the depth reports what it has, and the late closing sample (taken as
    the server goes idle) the next depth."""
    from etsq.models.metrics import KVMonitor

    server = _NumberedMetrics()
    monitor = KVMonitor(server, "vllm", interval_s=10.0)  # type: ignore[arg-type]

    async def depths() -> tuple[float, list[dict[str, Any]]]:
        first = await monitor.take()  # nothing sampled yet: scrape 1, waited for
        start = time.perf_counter()
        await monitor.watch(asyncio.sleep(0.05))  # the poller's scrape (2) is cut off; 3 closes
        second = await monitor.take()
        took = time.perf_counter() - start
        await asyncio.sleep(1.5)  # scrape 3 lands
        return took, [first, second, await monitor.take()]

    took, (first, second, third) = asyncio.run(depths())
    assert took < 0.6  # not the 1 s of the sample after the call
    assert (first["kv_usage"], second["kv_usage"], third["kv_usage"]) == (0.1, 0.1, 0.3)


def test_the_kv_monitor_holds_no_call_up_and_polls_once_per_server() -> None:
    """Sixteen calls of 0.1 s in flight at once: none waits for a /metrics scrape, one poller
    samples for all of them (a worker searching 16 problems must not scrape 16 times as often, nor
    once per call: each scrape costs the server), and one closing sample follows the last call."""
    from etsq.models.metrics import KVMonitor

    server = _SlowMetrics()
    monitor = KVMonitor(server, "vllm", interval_s=0.05)  # type: ignore[arg-type]

    async def call(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return time.perf_counter()

    async def depth() -> tuple[float, float, dict[str, Any]]:
        start = time.perf_counter()
        ends = await asyncio.gather(*(monitor.watch(call(0.1 + i / 1000)) for i in range(16)))
        return start, max(ends), await monitor.take()

    start, calls_end, figures = asyncio.run(depth())
    assert calls_end - start < 0.8  # not 1 s for a sample before the requests (a busy host delays sleeps)
    during = [t for t in server.started if t < calls_end - 0.005]
    assert len(during) == 1 and during[0] - start >= 0.015  # one poller, its sample after the requests
    assert len(server.started) == 2  # the closing sample, and none per call
    assert figures["kv_usage"] == 0.5  # the server's first figures waited for it


class _CountingMetrics:
    """A server whose /metrics answers at once: KV usage 0.5 while `busy`, else the scrape's
    number / 1000 (so later samples read higher)."""

    base_url = "http://counting-metrics"

    def __init__(self) -> None:
        self.scrapes, self.busy = 0, False

    async def get_text(self, path: str, attempts: int | None = None) -> str:
        self.scrapes += 1
        await asyncio.sleep(0.001)
        usage = 0.5 if self.busy else self.scrapes / 1000
        return f'vllm:kv_cache_usage_perc{{engine="0"}} {usage}\n'


def test_jobs_sharing_a_monitor_each_get_their_own_usage_and_samples() -> None:
    """Two jobs' calls on one server at once: each take() reports the job's own responses, and
    one job's take() leaves the other's samples to it (it once reset every job's depth)."""
    from etsq.models.metrics import KVMonitor

    monitor = KVMonitor(_CountingMetrics(), "vllm", interval_s=0.03)  # type: ignore[arg-type]

    async def call(prompt: int, seconds: float) -> None:
        monitor.add_usage(prompt, prompt // 5)
        await asyncio.sleep(seconds)

    async def job(owner: str, prompt: int, seconds: float) -> dict[str, Any]:
        await monitor.watch(call(prompt, seconds), owner)
        return await monitor.take(owner)

    async def both() -> list[dict[str, Any]]:
        return list(await asyncio.gather(job("a", 10, 0.1), job("b", 25, 0.4)))

    a, b = asyncio.run(both())
    assert (a["prompt_tokens"], a["cached_prompt_tokens"], a["requests"]) == (10, 2, 1)
    assert (b["prompt_tokens"], b["cached_prompt_tokens"], b["requests"]) == (25, 5, 1)
    assert b["kv_usage"] > a["kv_usage"] > 0  # b's samples after a's take() stayed b's


def test_a_jobs_thread_takes_its_figures_without_the_loop_once_the_server_was_sampled() -> None:
    """take_sampled reads a job's figures from the job's own thread: None before the server's
    first sample (take then waits for it on the loop), the same figures take() gives after, and
    a fresh start for the next depth."""
    from etsq.models.metrics import KVMonitor

    monitor = KVMonitor(_CountingMetrics(), "vllm", interval_s=0.03)  # type: ignore[arg-type]
    assert monitor.take_sampled("job") is None  # never sampled: nothing to read yet

    async def depth(prompt: int) -> None:
        async def call() -> None:
            monitor.add_usage(prompt, prompt // 5)
            await asyncio.sleep(0.1)

        await monitor.watch(call(), "job")

    async def first_depth() -> dict[str, Any]:
        await depth(10)
        return await monitor.take("job")

    first = asyncio.run(first_depth())
    asyncio.run(depth(25))
    taken: list[dict[str, Any] | None] = []
    thread = threading.Thread(target=lambda: taken.append(monitor.take_sampled("job")))
    thread.start()
    thread.join()
    second = taken[0]
    assert second is not None
    assert (first["prompt_tokens"], first["requests"]) == (10, 1)
    assert (second["prompt_tokens"], second["cached_prompt_tokens"], second["requests"]) == (25, 5, 1)
    assert second["kv_usage"] is not None and second["kv_usage"] > first["kv_usage"]  # its own samples
    assert monitor.take_sampled("job")["requests"] == 0  # type: ignore[index]  # a fresh start


def test_a_call_shorter_than_the_poll_interval_is_sampled_while_it_runs() -> None:
    """A call of a few decode steps ends well inside one 200 ms interval: the poller's first
    sample goes out with the requests (before the server holds them), and an early second one
    sees the KV the call holds."""
    from etsq.models.metrics import KVMonitor

    server = _CountingMetrics()
    monitor = KVMonitor(server, "vllm")  # type: ignore[arg-type]

    async def short_call() -> None:
        await asyncio.sleep(0.005)  # the server schedules the requests
        server.busy = True
        await asyncio.sleep(0.06)
        server.busy = False

    async def depth() -> dict[str, Any]:
        await monitor.watch(short_call(), "job")
        return await monitor.take("job")

    assert asyncio.run(depth())["kv_usage"] == 0.5


def test_a_prompt_is_tokenized_once_for_the_texts_scored_with_it_and_a_failed_count_is_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Concurrent rows of one problem share one /tokenize of its prompt; a count that failed is
    asked again by the next caller, not served from the cache."""
    import etsq.models.remote as remote_module

    calls: list[str] = []

    async def tokenize(served: object, text: str, special: bool) -> list[int]:
        calls.append(text)
        await asyncio.sleep(0.01)
        if len(calls) == 1:
            raise TransientError("server busy")
        return [1, 2, 3]

    monkeypatch.setattr(remote_module, "tokenize", tokenize)
    prm = remote_module.RemoteLikelihoodPRM.__new__(remote_module.RemoteLikelihoodPRM)
    prm._prompt_lengths, prm.served = {}, None  # type: ignore[assignment]

    async def scenario() -> list[Any]:
        failed = await asyncio.gather(
            *(prm._prompt_length("q", False) for _ in range(4)), return_exceptions=True
        )
        return [*failed, *await asyncio.gather(*(prm._prompt_length("q", False) for _ in range(4)))]

    results = asyncio.run(scenario())
    assert all(isinstance(r, TransientError) for r in results[:4]) and results[4:] == [3, 3, 3, 3]
    assert calls == ["q", "q"]  # one count per prompt at a time; the failed one asked again once
