"""What one model-server request costs the worker's CPU: etsq's client against httpx and raw aiohttp.

A local aiohttp server in its own process answers POST /v1/completions with a completion-sized JSON
body after `--server-ms`; the client sends bursts of `--burst` requests at once (a depth's fan-out),
`--rounds` bursts, after two warm-up bursts.  Per client and burst size: CPU seconds of this process
per request (`time.process_time`, every thread) and wall milliseconds per request.

- `httpx`: one `httpx.AsyncClient`, 64 connections kept alive (etsq's client before aiohttp);
- `aiohttp`: one `aiohttp.ClientSession`, 64 connections;
- `etsq`: `ServerClient.post_json` from a synchronous caller, as the search calls it: the hop to
  the background loop, the retry wrapper and the session.

Where model servers share the worker's CPUs (this machine; a CPU vLLM), every millisecond here is
one the servers lose.  JSON in `--out`, a table on stdout.

    python bench/http_client_bench.py --burst 1 8 48 128 --out /tmp/http_client.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from etsq.models.http import RetryConfig, ServerClient, gather_all  # noqa: E402
from etsq.queue.broker import free_local_port  # noqa: E402

SERVER = """
import asyncio, json, sys
from aiohttp import web
delay = float(sys.argv[2]) / 1000
body = json.dumps({"id": "cmpl", "object": "text_completion", "model": "m", "choices": [{"index": 0,
    "text": " 12 + 7 = 19, so the answer is 19." * 3, "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 160, "completion_tokens": 32, "total_tokens": 192}}).encode()
async def complete(request):
    await request.read()
    await asyncio.sleep(delay)
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_post("/v1/completions", complete)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""

REQUEST = {"model": "m", "prompt": "Question: what is 12 + 7?\nAnswer:" * 8, "max_tokens": 32, "seed": 7}
Send = Callable[[], Awaitable[Any]]


def start_server(server_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_local_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(server_ms)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.post(url + "/v1/completions", json=REQUEST, timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the bench server did not start")


async def _bursts(send: Send, burst: int, rounds: int) -> tuple[float, float]:
    for _ in range(2):  # connections opened, caches warm
        await asyncio.gather(*(send() for _ in range(burst)))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        await asyncio.gather(*(send() for _ in range(burst)))
    return time.perf_counter() - wall, time.process_time() - cpu


async def with_httpx(url: str, burst: int, rounds: int) -> tuple[float, float]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def send() -> Any:
            return (await client.post("/v1/completions", json=REQUEST)).json()

        return await _bursts(send, burst, rounds)


async def with_aiohttp(url: str, burst: int, rounds: int) -> tuple[float, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        async def send() -> Any:
            async with session.post(url + "/v1/completions", json=REQUEST) as response:
                return await response.json()

        return await _bursts(send, burst, rounds)


def with_etsq(url: str, burst: int, rounds: int) -> tuple[float, float]:
    client = ServerClient(url, RetryConfig())

    def depth() -> list[Any]:
        return client.call(gather_all(*(client.post_json("/v1/completions", REQUEST) for _ in range(burst))))

    for _ in range(2):
        depth()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        depth()
    spent = time.perf_counter() - wall, time.process_time() - cpu
    client.call(client.aclose())
    return spent


def measure(url: str, client: str, burst: int, requests: int) -> dict[str, Any]:
    rounds = max(3, requests // burst)
    if client == "etsq":
        wall, cpu = with_etsq(url, burst, rounds)
    else:
        wall, cpu = asyncio.run({"httpx": with_httpx, "aiohttp": with_aiohttp}[client](url, burst, rounds))
    n = burst * rounds
    per_request = {"cpu_ms_per_request": cpu / n * 1000, "wall_ms_per_request": wall / n * 1000}
    return {"client": client, "burst": burst, "requests": n} | {
        k: round(v, 3) for k, v in per_request.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, nargs="+", default=[1, 8, 48, 128])
    parser.add_argument("--requests", type=int, default=1440, help="per client and burst size")
    parser.add_argument("--server-ms", type=float, default=2.0)
    parser.add_argument("--clients", nargs="+", default=["httpx", "aiohttp", "etsq"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    proc, url = start_server(args.server_ms)
    try:
        rows = [measure(url, c, b, args.requests) for b in args.burst for c in args.clients]
    finally:
        proc.kill()
    print(f"{'client':8} {'burst':>5} {'CPU ms/req':>10} {'wall ms/req':>11}")
    for r in rows:
        cpu, wall = r["cpu_ms_per_request"], r["wall_ms_per_request"]
        print(f"{r['client']:8} {r['burst']:5d} {cpu:10.3f} {wall:11.3f}")
    if args.out:
        load = os.getloadavg()
        args.out.write_text(
            json.dumps({"config": vars(args) | {"out": str(args.out)}, "load": load, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
