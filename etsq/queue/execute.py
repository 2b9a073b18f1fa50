"""Executing a job: claim it by id, load (and cache) the run's models, search, commit each depth.

`STOP` is set when the worker is asked to shut down (Celery's warm shutdown): the job in hand commits
its current depth and goes back to the queue.
"""

from __future__ import annotations

import logging
import threading
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
    Heartbeat,
    LeaseFenced,
    LeaseLost,
    ShutdownRequested,
    claim_job,
    fail_job,
    fault_line,
    release_job,
    search_config,
)
from etsq.store.session import Store
from etsq.store.trees import DepthWriter, load_tree
from etsq.validation import check_width

log = logging.getLogger(__name__)

# Set when the worker is asked to shut down: the job in hand stops after its current depth.
STOP = threading.Event()


# Held while an embedder loads: the first jobs a threaded worker starts together load it once.
_EMBEDDER_LOCK = threading.Lock()


def load_embedder(model: str | None) -> Embedder:
    """The worker's one embedder of `model`, shared by the problems it searches at once (which
    lets it batch their texts); loaded before any job's clock starts, so no job's time includes it."""
    with _EMBEDDER_LOCK:
        return _loaded_embedder(model)


@lru_cache(maxsize=4)
def _loaded_embedder(model: str | None) -> Embedder:
    from etsq.search.embed import SentenceEmbedder, default_embedding_model

    embedder = SentenceEmbedder(model or default_embedding_model())
    embedder.model  # noqa: B018  # load now: the first job's search time must not include it
    return embedder


def _record_model_info(store: Store, run_id: int, policy: Policy, prm: PRM) -> None:
    with store.session() as s:
        run = s.get_one(m.Run, run_id)
        if run.model_info is None:
            run.model_info = {"policy": vars(policy.info), "prm": vars(prm.info)}


def build_searcher(claim: Claim, settings: Settings, store: Store) -> Searcher:
    """The searcher of a claimed job; server-backed models are checked to answer first.

    A server that went down makes the job retry (TransientError) instead of failing it.
    """
    cfg = search_config(claim)  # validated as at submit (etsq.validation): a bad stored value fails the job
    check_width(cfg.width, settings.max_width)
    models = ModelConfig.from_dict(claim.config["models"])
    models.check_prm_revision()
    policy, prm = load_models(models, settings)
    _record_model_info(store, claim.run_id, policy, prm)
    method = get_method(cfg.method)
    embedder = load_embedder(models.embedding) if method.needs_embedder else None
    return Searcher(claim.question, claim.key, policy, prm, cfg, method.select, embedder)


def run_job(job_id: int, settings: Settings, worker: str | None = None) -> str:
    """Search one job to completion and return its status.

    Raises TransientError (job released: retry it) and ShutdownRequested (job released:
    enqueue it again); returns "skipped" when the job is finished or a live worker holds it.
    """
    store = Store.open(settings.database_url)  # the worker's one Store: its schema is checked once
    try:
        claim = claim_job(store, job_id, settings.stale_after_s, worker, settings.gpu)
    except OperationalError as exc:  # the store is away (restarting, cut off): retry, one line
        raise TransientError(f"database: {fault_line(exc)}") from exc
    if claim is None:
        return "skipped"
    try:
        # The heartbeat starts at the claim: loading the run's models may outlast a short lease.
        with Heartbeat(store, claim.job_id, claim.lease, settings.heartbeat_s):
            search_claimed(store, claim, build_searcher(claim, settings, store))
        return "done"
    except LeaseLost as exc:
        # Fenced (reclaimed while this worker was cut off) or cancelled: drop the job, write nothing.
        log.warning("dropping job %s: %s", job_id, exc)
        return "fenced" if isinstance(exc, LeaseFenced) else "lost"
    except (TransientError, ShutdownRequested):
        _release(store, claim)
        raise
    except OperationalError as exc:
        _release(store, claim)
        raise TransientError(f"database: {exc.orig}") from exc
    except Exception as exc:  # any other fault is permanent for this job
        return _fail(store, claim, exc)


def _release(store: Store, claim: Claim) -> None:
    try:
        with store.session() as s:
            release_job(s, claim.job_id, claim.lease)
    except OperationalError as exc:  # the store is away: its heartbeat goes stale and a janitor requeues it
        log.warning(
            "job %s: cannot hand it back (%s); it is requeued once its lease expires",
            claim.job_id,
            fault_line(exc),
        )


def _fail(store: Store, claim: Claim, exc: BaseException) -> str:
    log.exception("job %s failed", claim.job_id)
    with store.session() as s:
        fail_job(s, claim.job_id, f"{type(exc).__name__}: {exc}", claim.lease)
    return "failed"


def search_claimed(store: Store, claim: Claim, searcher: Searcher) -> None:
    """Run (or resume) the claimed job's search to completion, one committed depth at a time
    (the caller keeps the job's heartbeat going)."""
    with store.session() as s:
        stored = load_tree(s, claim.job_id)
    tree, depth = stored if stored else (searcher.new_tree(), 0)
    # Each depth is written while the search selects and expands the next (one depth in flight).
    writer = DepthWriter(store, claim.job_id, claim.lease, STOP, claim.generation, background=True)
    with writer:
        searcher.run(tree, writer, start_depth=depth)
