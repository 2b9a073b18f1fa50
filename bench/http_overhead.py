"""Per-request client overhead of etsq's HTTP layer against a running model server.

Three numbers, each the median over `--repeats` sequential requests:

- `raw_ms`: a GET of `--path` with a plain keep-alive `httpx.Client` (the floor: socket + server)
- `etsq_ms`: the same GET through `ServerClient.call` (the sync -> background-loop hop, the retry
  wrapper, the pooled async client); `etsq_ms - raw_ms` is what etsq's discipline adds per request
- with `--generate` (SGLang, or the stand-in): a 1-token `/generate` through etsq, minus the
  server's own `meta_info.e2e_latency`: everything outside the server's request handling

    python bench/http_overhead.py --url http://127.0.0.1:30000 --path /health [--generate]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

from etsq.models.http import RetryConfig, ServerClient


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm the connection
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _generate_overhead_ms(client: ServerClient, repeats: int) -> float:
    body = {"text": "1 + 1 =", "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
    gaps = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        out = client.call(client.post_json("/generate", body))
        gaps.append((time.perf_counter() - started) * 1000 - out["meta_info"]["e2e_latency"] * 1000)
    return statistics.median(gaps[1:])


def measure(url: str, path: str, repeats: int, generate: bool) -> dict[str, Any]:
    client = ServerClient(url, RetryConfig())
    with httpx.Client(base_url=url) as raw:
        raw_ms = _median_ms(lambda: raw.get(path).raise_for_status(), repeats)
    etsq_ms = _median_ms(lambda: client.call(client.request("GET", path)), repeats)
    result: dict[str, Any] = {
        "url": url, "path": path, "repeats": repeats, "raw_ms": round(raw_ms, 3),
        "etsq_ms": round(etsq_ms, 3), "added_ms": round(etsq_ms - raw_ms, 3),
    }  # fmt: skip
    if generate:
        result["generate_outside_server_ms"] = round(_generate_overhead_ms(client, repeats), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", default="/health")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--generate", action="store_true", help="also time /generate against e2e_latency")
    args = parser.parse_args()
    print(json.dumps(measure(args.url, args.path, args.repeats, args.generate), indent=2))


if __name__ == "__main__":
    main()
