"""HTTP discipline for model servers: one pooled async client per server, timeouts, retries.

Every server URL gets one `ServerClient`, which owns one `httpx.AsyncClient` (a connection pool)
living on a private asyncio loop in a background thread.  The search loop is synchronous; it hands
coroutines to that loop (`ServerClient.call`), so one depth's requests fan out concurrently while the
Policy/PRM interfaces stay plain function calls.

Retries: connection errors, timeouts, 429 and 5xx are retried with exponential backoff; after the
last attempt they surface as `TransientError`, which makes the Celery task retry the job (it resumes
from its last committed depth).  Any other 4xx is a `PermanentError` carrying the server's message:
sending the same request again cannot help.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from etsq.errors import PermanentError, TransientError
from etsq.settings import Settings

log = logging.getLogger(__name__)
# The KV monitor polls /metrics several times a second; httpx's one INFO line per request would
# drown the worker's log.
logging.getLogger("httpx").setLevel(logging.WARNING)

T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_MESSAGE = 500


@dataclass(frozen=True)
class RetryConfig:
    """How hard to try one request: attempts, backoff and timeouts (seconds)."""

    # 6 attempts: a request gives up after ~15 s without the server (0.5+1+2+4+8 s of pauses); the
    # Celery task then retries the job with its own, longer backoff.
    attempts: int = 6
    backoff_s: float = 0.5  # first pause; doubles each attempt
    max_backoff_s: float = 8.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0  # one depth's generation may legitimately take minutes on CPU

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryConfig:
        """Defaults, with the attempts and read timeout of ETSQ_HTTP_RETRIES and ETSQ_HTTP_TIMEOUT."""
        return cls(attempts=settings.http_retries, read_timeout_s=settings.http_timeout_s)

    def pause(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (0-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2.0**attempt)

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.read_timeout_s, connect=self.connect_timeout_s)


# --------------------------------------------------------------------------- the background loop


class _LoopThread:
    """An asyncio loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="etsq-http", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


_state_lock = threading.Lock()
_state: dict[str, Any] = {"pid": None, "loop": None, "clients": {}}


def _fresh_state() -> dict[str, Any]:
    # A forked child (Celery prefork) inherits the parent's objects but not its loop thread.
    if _state["pid"] != os.getpid():
        _state.update(pid=os.getpid(), loop=None, clients={})
    if _state["loop"] is None:
        _state["loop"] = _LoopThread()
    return _state


def background_loop() -> _LoopThread:
    with _state_lock:
        return _fresh_state()["loop"]  # type: ignore[no-any-return]


def client_for(url: str, retry: RetryConfig | None = None) -> ServerClient:
    """The process's one client for the server at `url` (created on first use)."""
    base = normalize_url(url)
    with _state_lock:
        clients: dict[str, ServerClient] = _fresh_state()["clients"]
        if base not in clients:
            clients[base] = ServerClient(base, retry or RetryConfig())
        return clients[base]


async def gather_all(*aws: Awaitable[T]) -> list[T]:
    """All results in order; on the first failure the other requests are cancelled, not left retrying."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def normalize_url(url: str) -> str:
    """`url` without a trailing slash; a bare host:port gets http://."""
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


# --------------------------------------------------------------------------- the client


class ServerClient:
    """Requests to one server: JSON in and out, retried per `RetryConfig`."""

    def __init__(self, base_url: str, retry: RetryConfig) -> None:
        self.base_url = normalize_url(base_url)
        self.retry = retry
        self._client: httpx.AsyncClient | None = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of this client on the background loop and return its result."""
        return background_loop().run(coro)

    def _http(self) -> httpx.AsyncClient:
        # Created lazily, on the background loop: an AsyncClient is bound to the loop that uses it.
        if self._client is None:
            # Every connection is kept: a depth's burst of requests reuses the last depth's instead
            # of connecting again (16 kept cost a K=16 search's HTTP loop 5% of its time).
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            self._client = httpx.AsyncClient(
                base_url=self.base_url, timeout=self.retry.timeout(), limits=limits
            )
        return self._client

    async def post_json(self, path: str, body: dict[str, Any], attempts: int | None = None) -> Any:
        response = await self.request("POST", path, attempts, json=body)
        return _json(response)

    async def get_json(self, path: str, attempts: int | None = None) -> Any:
        return _json(await self.request("GET", path, attempts))

    async def get_text(self, path: str, attempts: int | None = None) -> str:
        return (await self.request("GET", path, attempts)).text

    async def request(self, method: str, path: str, attempts: int | None = None, **kw: Any) -> httpx.Response:
        """One request with retries; raises TransientError or PermanentError on failure."""
        tries = attempts or self.retry.attempts
        for attempt in range(tries):
            problem = await self._try_once(method, path, **kw)
            if isinstance(problem, httpx.Response):
                return problem
            if attempt + 1 < tries:
                log.warning("%s %s%s: %s; retrying", method, self.base_url, path, problem)
                await asyncio.sleep(self.retry.pause(attempt))
        raise TransientError(f"{method} {self.base_url}{path}: {problem} (after {tries} attempts)")

    async def _try_once(self, method: str, path: str, **kw: Any) -> httpx.Response | str:
        """The response when it is usable, else why the attempt may be retried."""
        try:
            response = await self._http().request(method, path, **kw)
        except httpx.TransportError as exc:  # connect/read/write errors and timeouts
            return f"{type(exc).__name__}: {exc}".rstrip(": ")
        if response.status_code in RETRY_STATUSES:
            return f"HTTP {response.status_code} {server_message(response)}"
        if response.status_code >= 400:
            raise PermanentError(
                f"{method} {self.base_url}{path}: HTTP {response.status_code} {server_message(response)}"
            )
        return response

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except json.JSONDecodeError as exc:
        raise PermanentError(f"{response.request.url}: not JSON: {response.text[:200]!r}") from exc


def server_message(response: httpx.Response) -> str:
    """The error message a server put in its body (SGLang, vLLM and OpenAI shapes), else the text."""
    try:
        body = response.json()
    except json.JSONDecodeError:
        return response.text[:_MAX_MESSAGE].strip()
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)[:_MAX_MESSAGE]
        return str(body.get("message") or body.get("detail") or error)[:_MAX_MESSAGE]
    return str(body)[:_MAX_MESSAGE]
