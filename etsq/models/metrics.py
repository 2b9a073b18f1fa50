"""KV cache as the server measures it: Prometheus /metrics parsing and per-depth figures.

A depth's figures are gathered by a `KVMonitor`: while the depth's policy requests run it samples
the server's /metrics (in-use KV is only visible while requests hold it: finished requests' blocks
become evictable cache and stop counting), keeps the peak, and sums the prompt and prefix-cache-hit
tokens the server reports per request.  `take()` returns the figures since the last `take()`:

- `kv_tokens`: peak KV tokens in use (SGLang `sglang:num_used_tokens`; vLLM
  `vllm:kv_cache_usage_perc` x the pool size in `vllm:cache_config_info`, block-granular)
- `kv_usage`: peak fraction of the KV pool in use (`sglang:token_usage`, `vllm:kv_cache_usage_perc`)
- `cache_hit_rate`: SGLang's own `sglang:cache_hit_rate` gauge; for vLLM the depth's
  `vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total` increase (the server's lifetime
  ratio for a depth that sent no requests, e.g. the final one)
- `cached_prompt_tokens`, `prompt_tokens`: sums of the server's per-request usage (SGLang
  `meta_info.cached_tokens`; vLLM `usage.prompt_tokens_details.cached_tokens`, falling back to the
  `vllm:prompt_tokens_cached_total` increase when the server omits per-request details)

A worker searching several problems at once shares one monitor per server; each job's figures are
its own (`watch` and `take` name the job's thread as owner).  The prompt and cached tokens are its
own responses'.  The KV peak is the server's: it holds the other jobs' requests in flight at the
time too, which is what the server had to hold while this depth ran.  A sample counts for every
job with a call in flight when it lands.

Sampling stays off the search's path and light on the server.  One poller per server samples
while any call is in flight: 20 ms after the calls start (a sample sent with the requests showed
the KV before them), then every 200 ms, however many calls are in flight; when the server goes
idle, one closing sample ends the counters' increase.  `take()` (between a depth's scoring and its
commit) waits for none of them: a closing sample still in flight counts for the next depth.  Each
scrape costs the server: vLLM's API process spends ~8 ms rendering its ~600-line page, on the loop
that also serves the completions.  When a sample went out with every poller start and after every
call, REBASE on the CPU testbed took 1.5-2x as long at 1-4 problems at once as the same search
with no sampling (bench/saturation_bench.py --no-kv-monitor).  Only the lines a snapshot reads are
parsed (the whole page took 6 ms of the HTTP loop's time).  Only a server's very first figures
wait for a sample; after that a job's thread takes its figures itself (`take_sampled`), under a
lock, instead of queueing behind every job's HTTP work on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from collections.abc import Awaitable, Callable, Hashable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from etsq.errors import EtsqError
from etsq.models.http import ServerClient

log = logging.getLogger(__name__)

T = TypeVar("T")

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
POLL_INTERVAL_S = 0.2
FIRST_SAMPLE_S = 0.02  # from a call's start to the poller's first sample
# The job whose call is running, in the call's tasks: a response's usage counts for it.
_OWNER: ContextVar[Hashable] = ContextVar("etsq_kv_owner", default=None)


@dataclass(frozen=True)
class Sample:
    """One line of Prometheus text exposition."""

    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus(text: str, names: tuple[str, ...] | None = None) -> list[Sample]:
    """Samples of a Prometheus text exposition (comments and malformed lines skipped); with
    `names`, only lines that start with one of them are parsed (vLLM's page is ~600 lines of
    histograms: parsed whole, 6 ms of the HTTP loop's time per scrape)."""
    samples = []
    for line in text.splitlines():
        if names is not None and not line.startswith(names):
            continue
        match = _SAMPLE.match(line.strip())
        if match is None:
            continue
        try:
            value = float(match.group(4))
        except ValueError:
            continue
        labels = {
            k: bytes(v, "utf-8").decode("unicode_escape") for k, v in _LABEL.findall(match.group(3) or "")
        }
        samples.append(Sample(match.group(1), labels, value))
    return samples


def metric_sum(samples: list[Sample], name: str) -> float | None:
    """The sum over label sets of metric `name`; None when the server does not export it."""
    values = [s.value for s in samples if s.name == name and not math.isnan(s.value)]
    return sum(values) if values else None


def label_value(samples: list[Sample], name: str, label: str) -> str | None:
    return next((s.labels[label] for s in samples if s.name == name and label in s.labels), None)


# --------------------------------------------------------------------------- server flavours


@dataclass(frozen=True)
class Snapshot:
    """What one /metrics scrape says about the KV cache."""

    used_tokens: float | None = None
    usage: float | None = None
    hit_rate: float | None = None  # a gauge the server computes itself (SGLang)
    hits: float | None = None  # prefix-cache counters (vLLM), tokens
    queries: float | None = None
    cached_total: float | None = None


def sglang_snapshot(samples: list[Sample]) -> Snapshot:
    return Snapshot(
        used_tokens=metric_sum(samples, "sglang:num_used_tokens"),
        usage=metric_sum(samples, "sglang:token_usage"),
        hit_rate=metric_sum(samples, "sglang:cache_hit_rate"),
    )


def vllm_snapshot(samples: list[Sample]) -> Snapshot:
    usage = metric_sum(samples, "vllm:kv_cache_usage_perc")
    pool = _vllm_pool_tokens(samples)
    return Snapshot(
        used_tokens=usage * pool if usage is not None and pool is not None else None,
        usage=usage,
        hits=metric_sum(samples, "vllm:prefix_cache_hits_total"),
        queries=metric_sum(samples, "vllm:prefix_cache_queries_total"),
        cached_total=metric_sum(samples, "vllm:prompt_tokens_cached_total"),
    )


def _vllm_pool_tokens(samples: list[Sample]) -> float | None:
    size = label_value(samples, "vllm:cache_config_info", "kv_cache_size_tokens")
    if size is not None and size.replace(".", "", 1).isdigit():
        return float(size)
    blocks = label_value(samples, "vllm:cache_config_info", "num_gpu_blocks")
    block_size = label_value(samples, "vllm:cache_config_info", "block_size")
    if blocks and block_size and blocks.isdigit() and block_size.isdigit():
        return float(blocks) * float(block_size)
    return None


SNAPSHOTS: dict[str, Callable[[list[Sample]], Snapshot]] = {"sglang": sglang_snapshot, "vllm": vllm_snapshot}
# The metrics each flavour's snapshot reads: a scrape parses only their lines.
NAMES: dict[str, tuple[str, ...]] = {
    "sglang": ("sglang:num_used_tokens", "sglang:token_usage", "sglang:cache_hit_rate"),
    "vllm": ("vllm:kv_cache_usage_perc", "vllm:cache_config_info", "vllm:prefix_cache_hits_total",
             "vllm:prefix_cache_queries_total", "vllm:prompt_tokens_cached_total"),
}  # fmt: skip


# --------------------------------------------------------------------------- per-depth figures


@dataclass
class _Depth:
    """Running totals of one depth."""

    peak_tokens: float | None = None
    peak_usage: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    first: Snapshot | None = None
    last: Snapshot | None = None
    base: Snapshot | None = None  # the newest sample before the depth's first call: counters' start
    requests: int = 0

    def see(self, snap: Snapshot) -> None:
        self.first = self.first or snap
        self.last = snap
        self.peak_tokens = _max(self.peak_tokens, snap.used_tokens)
        self.peak_usage = _max(self.peak_usage, snap.usage)


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def _delta(first: float | None, last: float | None) -> float | None:
    return None if first is None or last is None else max(0.0, last - first)


@dataclass
class KVMonitor:
    """Samples one server's /metrics while requests run and reports per-depth KV figures, per job.

    Several jobs of one worker share a server's monitor; each job's figures are kept apart under
    its owner (the job's thread, named by the caller): a call's responses count for the job that
    made it, and a sample for every job with a call in flight when it lands."""

    client: ServerClient
    flavour: str  # a key of SNAPSHOTS
    interval_s: float = POLL_INTERVAL_S
    _depths: dict[Hashable, _Depth] = field(default_factory=dict)
    _calls: dict[Hashable, int] = field(default_factory=dict)  # calls in flight by owner
    _disabled: bool = False
    _poller: asyncio.Future[None] | None = None  # runs while any call is in flight
    _pending: set[asyncio.Future[Any]] = field(default_factory=set)  # closing samples in flight
    # The newest sample: a depth's counters start from it, and a depth without samples of its own
    # (the final one, or one whose closing sample is still in flight) reads it.
    _last: Snapshot | None = None
    # Guards the figures: the loop's samples and responses add to them, a job's thread takes them.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def scrape(self, owners: tuple[Hashable, ...] = ()) -> Snapshot | None:
        """One /metrics sample (one attempt: a missed sample is not worth a retry), counted for
        `owners` and for every owner with a call in flight when it lands."""
        if self._disabled:
            return None
        try:
            text = await self.client.get_text("/metrics", attempts=1)
        except EtsqError as exc:
            if "HTTP 404" in str(exc):  # SGLang without --enable-metrics: stop asking
                self._disabled = True
                log.warning("%s has no /metrics; server KV figures will be empty", self.client.base_url)
            return None
        snap = SNAPSHOTS[self.flavour](parse_prometheus(text, NAMES[self.flavour]))
        with self._lock:
            for owner in {*self._calls, *owners}:
                self._depth(owner).see(snap)
            self._last = snap
        return snap

    async def watch(self, work: Awaitable[T], owner: Hashable = None) -> T:
        """Await `owner`'s `work` while /metrics is sampled (see the module's docstring)."""
        token = _OWNER.set(owner)  # add_usage, called from the work's tasks, reads it
        with self._lock:
            depth = self._depth(owner)
            if depth.first is None and depth.base is None:
                depth.base = self._last
        self._calls[owner] = self._calls.get(owner, 0) + 1
        if self._poller is None:
            self._poller = asyncio.ensure_future(self._poll())
        try:
            return await work
        finally:
            self._call_ended(owner)
            _OWNER.reset(token)

    def _call_ended(self, owner: Hashable) -> None:
        left = self._calls.pop(owner) - 1
        if left:
            self._calls[owner] = left
        if self._calls or self._poller is None:
            return
        self._poller.cancel()
        self._poller = None
        # The server going idle: one closing sample, for the counters' increase up to here.
        task = asyncio.ensure_future(self.scrape((owner,)))
        self._pending.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._pending.discard)

    async def _poll(self) -> None:
        # The first sample waits for the server to schedule the requests (one sent with them
        # showed the KV before them), then one sample an interval.
        await asyncio.sleep(FIRST_SAMPLE_S)
        while True:
            await self.scrape()
            await asyncio.sleep(self.interval_s)

    def _depth(self, owner: Hashable) -> _Depth:
        return self._depths.setdefault(owner, _Depth())

    def add_usage(self, prompt_tokens: int, cached_tokens: int | None) -> None:
        """Count one response's server-reported prompt and prefix-cache-hit tokens for the job
        whose call it answers."""
        with self._lock:
            depth = self._depth(_OWNER.get())
            depth.requests += 1
            depth.prompt_tokens += prompt_tokens
            if cached_tokens is not None:
                depth.cached_tokens = (depth.cached_tokens or 0) + cached_tokens

    async def take(self, owner: Hashable = None) -> dict[str, Any]:
        """`owner`'s figures since its last take(), and a fresh start; a depth without samples of
        its own gets the newest one.  No sample is waited for once the server has been sampled at
        all: a closing sample still in flight counts for the next depth."""
        if self._unsampled(owner):
            if self._pending:
                await asyncio.gather(*self._pending, return_exceptions=True)  # the server's first samples
            else:
                await self.scrape((owner,))
        return self._take(owner)

    def take_sampled(self, owner: Hashable = None) -> dict[str, Any] | None:
        """`take`, from any thread, for a server sampled before (None if it never was, and then
        `take` waits for its first sample on the loop).  A job's thread reads its figures here
        without waiting its turn on the HTTP loop, which cost 10-36 ms a depth at 4-16 problems at once."""
        with self._lock:
            if self._unsampled(owner):
                return None
        return self._take(owner)

    def _unsampled(self, owner: Hashable) -> bool:
        """Neither the server nor `owner`'s depth has a sample yet."""
        return self._last is None and self._depth(owner).first is None

    def _take(self, owner: Hashable) -> dict[str, Any]:
        with self._lock:
            depth = self._depths.pop(owner, None) or _Depth()
            if depth.first is None and self._last is not None:
                depth.see(self._last)  # no sample since: the newest one stands for the depth
        return _figures(depth)


def _figures(depth: _Depth) -> dict[str, Any]:
    first, last = depth.base or depth.first or Snapshot(), depth.last or Snapshot()
    hit_rate = last.hit_rate
    hits, queries = _delta(first.hits, last.hits), _delta(first.queries, last.queries)
    if hit_rate is None and hits is not None and queries:
        hit_rate = hits / queries
    elif hit_rate is None and last.hits is not None and last.queries:
        hit_rate = last.hits / last.queries
    cached = depth.cached_tokens
    if cached is None and depth.requests:
        counted = _delta(first.cached_total, last.cached_total)
        cached = int(counted) if counted is not None else None
    return {
        "kv_tokens": round(depth.peak_tokens) if depth.peak_tokens is not None else None,
        "kv_usage": depth.peak_usage,
        "cache_hit_rate": hit_rate,
        "cached_prompt_tokens": cached if depth.requests else 0,
        "prompt_tokens": depth.prompt_tokens,
        "requests": depth.requests,
    }
