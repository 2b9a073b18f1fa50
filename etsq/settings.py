"""Settings: where etsq keeps its data, which database and broker it uses (env vars, defaults)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_data_dir


@dataclass(frozen=True)
class Settings:
    """Resolved from ETSQ_* environment variables; see the README for each default."""

    home: Path
    database_url: str
    broker_url: str | None  # None: the embedded Redis that etsq starts under `home`
    data_dir: Path | None
    queue: str = "etsq"
    # Model servers for runs that leave them unset (`etsq worker --backend/--policy-url/--prm-url`).
    backend: str | None = None
    policy_url: str | None = None
    prm_url: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(os.environ.get("ETSQ_HOME") or user_data_dir("etsq")).expanduser()
        db_url = os.environ.get("ETSQ_DATABASE_URL") or f"sqlite:///{home / 'etsq.db'}"
        data_dir = os.environ.get("ETSQ_DATA_DIR")
        return cls(
            home=home,
            database_url=db_url,
            broker_url=os.environ.get("ETSQ_BROKER_URL") or None,
            data_dir=Path(data_dir).expanduser() if data_dir else None,
            queue=os.environ.get("ETSQ_QUEUE", "etsq"),
            backend=os.environ.get("ETSQ_BACKEND") or None,
            policy_url=os.environ.get("ETSQ_POLICY_URL") or None,
            prm_url=os.environ.get("ETSQ_PRM_URL") or None,
        )

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def server_defaults(self) -> dict[str, str | None]:
        return {"backend": self.backend, "policy_url": self.policy_url, "prm_url": self.prm_url}

    def resolve_broker_url(self) -> str:
        """The broker URL, starting (or reusing) the embedded Redis when none is configured."""
        if self.broker_url:
            return self.broker_url
        from etsq.broker import ensure_local_redis

        return ensure_local_redis(self.home)
