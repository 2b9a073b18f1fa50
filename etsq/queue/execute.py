"""The worker side of a job: claim it by id, load (and cache) the run's models, search, record."""

from __future__ import annotations

import logging
from functools import lru_cache

from sqlalchemy.exc import OperationalError

from etsq.errors import TransientError
from etsq.models.backends import load_models
from etsq.models.base import PRM, Policy
from etsq.models.config import ModelConfig
from etsq.search.loop import Searcher
from etsq.search.methods import get_method
from etsq.search.methods.base import Embedder
from etsq.settings import Settings
from etsq.store import schema as m
from etsq.store.jobs import (
    Claim,
    LeaseLost,
    ShutdownRequested,
    claim_job,
    fail_job,
    release_job,
    search_config,
    search_job,
)
from etsq.store.session import session_scope
from etsq.validation import check_width

log = logging.getLogger(__name__)


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
    """The searcher of a claimed job; server-backed models are checked to answer first.

    A server that went down makes the job retry (TransientError) instead of failing it.
    """
    cfg = search_config(claim)  # validated as at submit (etsq.validation): a bad stored value fails the job
    check_width(cfg.width, settings.max_width)
    models = ModelConfig.from_dict(claim.config["models"])
    models.check_prm_revision()
    policy, prm = load_models(models, settings)
    _record_model_info(settings.database_url, claim.run_id, policy, prm)
    method = get_method(cfg.method)
    embedder = load_embedder(models.embedding) if method.needs_embedder else None
    return Searcher(claim.question, claim.key, policy, prm, cfg, method.select, embedder)


def run_job(job_id: int, settings: Settings, worker: str | None = None) -> str:
    """Search one job to completion and return its status.

    Raises TransientError (job released: retry it) and ShutdownRequested (job released:
    enqueue it again); returns "skipped" when the job is finished or a live worker holds it.
    """
    url = settings.database_url
    claim = claim_job(url, job_id, settings.stale_after_s, worker, settings.gpu)
    if claim is None:
        return "skipped"
    try:
        search_job(url, claim, build_searcher(claim, settings), settings.heartbeat_s)
        return "done"
    except LeaseLost:
        return "lost"
    except (TransientError, ShutdownRequested):
        release_job(url, job_id, claim.lease)
        raise
    except OperationalError as exc:
        release_job(url, job_id, claim.lease)
        raise TransientError(f"database: {exc.orig}") from exc
    except Exception as exc:  # any other fault is permanent for this job
        return _fail(url, claim, exc)


def _fail(url: str, claim: Claim, exc: BaseException) -> str:
    log.exception("job %s failed", claim.job_id)
    fail_job(url, claim.job_id, f"{type(exc).__name__}: {exc}", claim.lease)
    return "failed"
