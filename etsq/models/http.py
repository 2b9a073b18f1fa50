"""HTTP discipline for model servers: one pooled async client per server, timeouts, retries.

Every server URL gets one `ServerClient`, which owns one `aiohttp.ClientSession` (a connection
pool) living on a private asyncio loop in a background thread.  The search loop is synchronous; it
hands coroutines to that loop (`ServerClient.call`), so one depth's requests fan out concurrently
while the Policy/PRM interfaces stay plain function calls.

aiohttp, not httpx: in a depth's burst of 48 requests httpx spent 5.0 ms of CPU per request and
aiohttp 0.4 ms (`bench/http_client_bench.py`), CPU that model servers sharing the machine lose.

Retries: connection errors, timeouts, 429 and 5xx are retried with exponential backoff; after the
last attempt they surface as `TransientError`, which makes the Celery task retry the job (it resumes
from its last committed depth).  Any other 4xx is a `PermanentError` carrying the server's message:
sending the same request again cannot help.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import threading
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from etsq.errors import PermanentError, TransientError
from etsq.settings import Settings

log = logging.getLogger(__name__)

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

    def timeout(self) -> aiohttp.ClientTimeout:
        # No total limit: a long generation is fine as long as the socket keeps delivering.
        return aiohttp.ClientTimeout(
            total=None, sock_connect=self.connect_timeout_s, sock_read=self.read_timeout_s
        )


@dataclass(frozen=True)
class Response:
    """A server's answer, read whole before its connection goes back to the pool."""

    status_code: int
    content: bytes
    url: str

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


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


def _close_clients() -> None:
    """Close every client's connections, on the loop's thread, and wait (5 s at most)."""
    thread, clients = _state["loop"], list(_state["clients"].values())
    if _state["pid"] != os.getpid() or thread is None or threading.current_thread() is thread.thread:
        return
    closing = asyncio.run_coroutine_threadsafe(gather_all(*(c.aclose() for c in clients)), thread.loop)
    with contextlib.suppress(Exception):
        closing.result(timeout=5)


# At exit the loop's daemon thread still runs: sessions closed there are not collected open later,
# which would log "Unclosed client session" into a command's output.  Before a fork: a child that
# inherited open connections would, collecting them, close sockets and unregister them from the
# epoll instance it shares with this process (which then never hears its answers).  Clients open
# new connections on their next request.
atexit.register(_close_clients)
os.register_at_fork(before=_close_clients)


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
        self._session: aiohttp.ClientSession | None = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of this client on the background loop and return its result."""
        return background_loop().run(coro)

    def _http(self) -> aiohttp.ClientSession:
        # Created lazily, on the background loop: a session is bound to the loop that uses it.
        if self._session is None:
            # 64 connections, every one kept alive: a depth's burst of requests reuses the last
            # depth's instead of connecting again.  Idle ones are dropped after 4 s, before uvicorn
            # (vLLM's and SGLang's server) closes them at 5 s: a request never races that close.
            # trust_env stays off: model servers are never behind the user's web proxy.
            connector = aiohttp.TCPConnector(limit=64, limit_per_host=64, keepalive_timeout=4.0)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.retry.timeout())
        return self._session

    async def post_json(self, path: str, body: dict[str, Any], attempts: int | None = None) -> Any:
        return _json(await self.request("POST", path, attempts, json=body))

    async def get_json(self, path: str, attempts: int | None = None) -> Any:
        return _json(await self.request("GET", path, attempts))

    async def get_text(self, path: str, attempts: int | None = None) -> str:
        return (await self.request("GET", path, attempts)).text

    async def request(self, method: str, path: str, attempts: int | None = None, **kw: Any) -> Response:
        """One request with retries; raises TransientError or PermanentError on failure."""
        tries = attempts or self.retry.attempts
        for attempt in range(tries):
            problem = await self._try_once(method, path, **kw)
            if isinstance(problem, Response):
                return problem
            if attempt + 1 < tries:
                log.warning("%s %s%s: %s; retrying", method, self.base_url, path, problem)
                await asyncio.sleep(self.retry.pause(attempt))
        raise TransientError(f"{method} {self.base_url}{path}: {problem} (after {tries} attempts)")

    async def _try_once(self, method: str, path: str, **kw: Any) -> Response | str:
        """The response when it is usable, else why the attempt may be retried."""
        url = self.base_url + path
        try:
            async with self._http().request(method, url, **kw) as answer:
                response = Response(answer.status, await answer.read(), url)
        except aiohttp.InvalidURL as exc:
            raise PermanentError(f"{method} {url}: not a usable URL: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:  # connect/read/write errors and timeouts
            return transport_problem(exc, self.retry)
        if response.status_code in RETRY_STATUSES:
            return f"HTTP {response.status_code} {server_message(response)}"
        if response.status_code >= 400:
            raise PermanentError(f"{method} {url}: HTTP {response.status_code} {server_message(response)}")
        return response

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def transport_problem(exc: BaseException, retry: RetryConfig) -> str:
    """Why a request got no answer, named as users read it (ConnectError, ReadTimeout, ...)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"ConnectTimeout: no connection within {retry.connect_timeout_s:g} s"
    if isinstance(exc, TimeoutError):
        return f"ReadTimeout: no answer within {retry.read_timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"ConnectError: {exc}"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _json(response: Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise PermanentError(f"{response.url}: not JSON: {response.text[:200]!r}") from exc


def server_message(response: Response) -> str:
    """The error message a server put in its body (SGLang, vLLM and OpenAI shapes), else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:_MAX_MESSAGE].strip()
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)[:_MAX_MESSAGE]
        return str(body.get("message") or body.get("detail") or error)[:_MAX_MESSAGE]
    return str(body)[:_MAX_MESSAGE]
