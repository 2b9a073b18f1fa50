"""Validation: the documented range of every run parameter, checked in one place.

`SearchConfig`, `ModelConfig` and `RunSpec` run these checks when they are built, so `etsq submit`,
sweep files and the worker (which rebuilds a run's configuration from the database) refuse the same
values with the same message, before anything is written.  `check_width` adds the width cap of the
settings in force (`ETSQ_MAX_WIDTH`), at submit and again in the worker, whose memory it protects.

Numbers are typed strictly: an integer field takes no float and no bool (a sweep's `widths: [4.7]`
or `[true]` is refused, never truncated), a float field takes an integer and stores it as a float
(so `1` and `1.0` make one configuration), and every number must be finite and inside its range.
`LIMITS` is the table the README's "Limits" section shows (`markdown_table`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from etsq.errors import ConfigError

INT32_MAX = 2**31 - 1  # runs.width and runs.seed are 32-bit integer columns
DEFAULT_MAX_WIDTH = 65_536


@dataclass(frozen=True)
class Limit:
    """The allowed values of one numeric parameter."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False  # `low` itself is excluded
    optional: bool = False  # None allowed (the parameter's default rule applies)
    meaning: str = ""

    def describe(self) -> str:
        low = f"> {_fmt(self.low)}" if self.low_open else f">= {_fmt(self.low)}"
        kind = "an integer" if self.integer else "a finite number"
        return f"{kind} {low} and <= {_fmt(self.high)}"


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:g}"


LIMITS: dict[str, Limit] = {
    "width": Limit(1, INT32_MAX, integer=True, meaning="leaves per problem; also at most ETSQ_MAX_WIDTH"),
    "seed": Limit(0, INT32_MAX, integer=True, meaning="the run's seed"),
    "limit": Limit(1, INT32_MAX, integer=True, optional=True, meaning="first N problems"),
    "temperature": Limit(0, 100, meaning="policy sampling temperature (0: greedy)"),
    "softmax_temp": Limit(0, 1000, low_open=True, meaning="REBASE/ETS weight temperature"),
    "max_step_tokens": Limit(1, 1_000_000, integer=True, meaning="tokens per step"),
    "max_tokens": Limit(1, 10_000_000, integer=True, meaning="tokens per trajectory"),
    "max_depth": Limit(1, 10_000, integer=True, meaning="steps per trajectory"),
    "lambda_b": Limit(0, 1e6, meaning="ETS KV-cost weight"),
    "lambda_s": Limit(0, 1e6, optional=True, meaning="ETS coverage weight"),
    "cluster_threshold": Limit(0, 2, meaning="ETS cosine-distance cut"),
    "beam_k": Limit(1, INT32_MAX, integer=True, optional=True, meaning="beam: nodes kept per depth"),
    "dvts_subtrees": Limit(
        1, INT32_MAX, integer=True, optional=True, meaning="DVTS subtrees (at most the depth-1 nodes)"
    ),
    "sim_latency_s": Limit(0, 3600, meaning="sim backend: seconds per request"),
    "sim_answer_every": Limit(1, 1_000_000, integer=True, meaning="sim backend: one step in N ends"),
    "prm_revision": Limit(
        1, 1_000, integer=True, optional=True, meaning="the PRM prompt revision a run is scored with"
    ),
    "concurrency": Limit(1, 1024, integer=True, optional=True, meaning="worker: problems searched at once"),
    "gpu": Limit(0, 1023, integer=True, optional=True, meaning="worker: the GPU index it is pinned to"),
}


def number(name: str, value: Any) -> Any:
    """`value` checked against `LIMITS[name]`: an int, a float (ints become floats) or None."""
    limit = LIMITS[name]
    if value is None and limit.optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be {limit.describe()}, got {value!r}")
    if limit.integer and not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be {limit.describe()}, got {value!r}")
    too_low = value <= limit.low if limit.low_open else value < limit.low
    if too_low or value > limit.high:
        raise ConfigError(f"{name} must be {limit.describe()}, got {value!r}")
    return value if limit.integer else float(value)


def text(name: str, value: Any, optional: bool = False, max_chars: int = 500) -> Any:
    """A non-empty string without NUL characters (or None when optional)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    if "\x00" in value or len(value) > max_chars:
        raise ConfigError(f"{name} must be at most {max_chars} characters without NUL, got {value[:40]!r}")
    return value


def choice(name: str, value: Any, allowed: tuple[str, ...] | list[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")
    return value


def check_width(width: int, max_width: int) -> None:
    """The settings' cap (ETSQ_MAX_WIDTH): a wider search needs more memory than a worker has."""
    if width > max_width:
        raise ConfigError(
            f"width {width} is above ETSQ_MAX_WIDTH={max_width}; raise ETSQ_MAX_WIDTH (for submit "
            "and the workers) to search wider"
        )


# A host name, an IPv4 address or a bracketed IPv6 address (urlsplit keeps the brackets out).
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$|^[0-9A-Fa-f:.]+$")


def server_url(name: str, value: Any, optional: bool = True) -> Any:
    """An http(s) URL with a host (a bare host:port means http://); returned as given."""
    if value is None and optional:
        return None
    raw = text(name, value)
    url = raw.strip() if "://" in raw else f"http://{raw.strip()}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{name} {raw!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{name} {raw!r}: the scheme must be http or https")
    if not parts.hostname or not _HOST.match(parts.hostname):
        raise ConfigError(f"{name} {raw!r} is not a URL: no valid host name")
    if port == 0 or parts.query or parts.fragment:
        raise ConfigError(f"{name} {raw!r}: give scheme://host:port[/path], without a query")
    return raw


_QUEUE = re.compile(r"^[A-Za-z0-9_.:@-]{1,200}$")


def queue_name(name: str, value: Any) -> Any:
    """A queue name: letters, digits and `_.:@-`, at most 200 (a comma would name two queues)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _QUEUE.match(value):
        raise ConfigError(f"{name} {value!r}: a queue name is 1 to 200 of A-Z a-z 0-9 _ . : @ -")
    return value


def markdown_table() -> str:
    """The README's "Limits" table."""
    rows = [f"| `{name}` | {limit.describe()} | {limit.meaning} |" for name, limit in LIMITS.items()]
    return "\n".join(["| parameter | allowed | meaning |", "| --- | --- | --- |", *rows])
