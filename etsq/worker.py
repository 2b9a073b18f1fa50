"""The worker side of a job: load (and cache) the run's models, then search the job by id."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any

from sqlalchemy.exc import OperationalError

from etsq.db import models as m
from etsq.db.session import session_scope
from etsq.errors import TransientError
from etsq.jobs import (
    Claim,
    LeaseLost,
    ShutdownRequested,
    claim_job,
    fail_job,
    release_job,
    search_config,
    search_job,
)
from etsq.models.base import PRM, Policy
from etsq.search.loop import Searcher
from etsq.search.methods import get_method
from etsq.search.methods.base import Embedder
from etsq.settings import Settings

log = logging.getLogger(__name__)


def load_models(models: dict[str, Any], settings: Settings) -> tuple[Policy, PRM]:
    """The run's policy and PRM: simulated, in-process or on its servers; each process loads a model once.

    Server-backed models are checked to answer at every job start: a server that went down makes the
    job retry (TransientError) instead of failing it.
    """
    backend = models.get("backend") or "local"
    if backend == "sim":
        from etsq.models.sim import SimPolicy, SimPRM

        latency = float(models.get("sim_latency_s", 0.0))
        return SimPolicy(latency, int(models.get("sim_answer_every", 4))), SimPRM(latency)
    if backend == "local":
        from etsq.models.registry import load_local_models

        family = models.get("prm_family", "judge")
        return load_local_models(models["policy"], models["prm"], settings.home, family)
    from etsq.models.servers import ensure_reachable, load_server_models, server_spec

    policy, prm = load_server_models(server_spec(models, settings.server_defaults))
    ensure_reachable(policy, prm)
    return policy, prm


@lru_cache(maxsize=4)
def load_embedder(model: str | None) -> Embedder:
    from etsq.search.embed import SentenceEmbedder, default_embedding_model

    return SentenceEmbedder(model or default_embedding_model())


def _record_model_info(url: str, run_id: int, policy: Policy, prm: PRM) -> None:
    with session_scope(url) as s:
        run = s.get_one(m.Run, run_id)
        if run.model_info is None:
            run.model_info = {"policy": vars(policy.info), "prm": vars(prm.info)}


def build_searcher(claim: Claim, settings: Settings) -> Searcher:
    cfg = search_config(claim)
    models = claim.config["models"]
    policy, prm = load_models(models, settings)
    _record_model_info(settings.database_url, claim.run_id, policy, prm)
    embedder = load_embedder(models.get("embedding")) if cfg.method == "ets" else None
    return Searcher(claim.question, claim.key, policy, prm, cfg, get_method(cfg.method), embedder)


def run_job(job_id: int, settings: Settings | None = None, worker: str | None = None) -> str:
    """Search one job to completion and return its status.

    Raises TransientError (job released: retry it) and ShutdownRequested (job released:
    enqueue it again); returns "skipped" when the job is finished or a live worker holds it.
    """
    settings = settings or Settings.from_env()
    claim = claim_job(settings.database_url, job_id, worker, os.environ.get("ETSQ_GPU"))
    if claim is None:
        return "skipped"
    try:
        search_job(settings.database_url, claim, lambda c: build_searcher(c, settings))
        return "done"
    except LeaseLost:
        return "lost"
    except (TransientError, ShutdownRequested):
        release_job(settings.database_url, job_id, claim.lease)
        raise
    except OperationalError as exc:
        release_job(settings.database_url, job_id, claim.lease)
        raise TransientError(f"database: {exc.orig}") from exc
    except Exception as exc:
        return _fail(settings.database_url, claim, exc)


def _fail(url: str, claim: Claim, exc: BaseException) -> str:
    log.exception("job %s failed", claim.job_id)
    fail_job(url, claim.job_id, f"{type(exc).__name__}: {exc}", claim.lease)
    return "failed"
