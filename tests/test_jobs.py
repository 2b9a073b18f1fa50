"""Jobs against a real database (SQLite and PostgreSQL): storage, evaluation, export, resume."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from etsq.models.config import ModelConfig
from etsq.queue.execute import run_job
from etsq.results.evaluate import evaluate
from etsq.search.loop import DepthCommit
from etsq.search.methods import Selection
from etsq.search.tree import Tree
from etsq.settings import Settings
from etsq.store import schema as m
from etsq.store.bulk import Mark, NodeRow, insert_nodes, mark_nodes
from etsq.store.jobs import LeaseFenced, LeaseLost, claim_job
from etsq.store.runs import export_jobs, statuses
from etsq.store.session import Store, get_engine, session_scope
from etsq.store.statuses import JobStatus
from etsq.store.trees import DepthWriter, HandedDepth, load_tree
from tests.helpers import store_run, tiny_config
from tests.wiretrips import WireTrips


def _settings(url: str) -> Settings:
    return Settings.from_env().with_(database_url=url)


def _nodes(url: str, job_id: int) -> list[m.Node]:
    with session_scope(url) as s:
        return list(s.scalars(select(m.Node).where(m.Node.job_id == job_id).order_by(m.Node.id)))


def test_jobs_store_complete_trees(db_url: str, tiny_model: Path) -> None:
    run_id, job_ids = store_run(db_url, tiny_model, tiny_config("rebase", width=4), limit=2)
    for job_id in job_ids:
        assert run_job(job_id, _settings(db_url)) == "done"
    with session_scope(db_url) as s:
        for job_id in job_ids:
            nodes = s.scalars(select(m.Node).where(m.Node.job_id == job_id)).all()
            ids = {n.id for n in nodes}
            assert sum(n.parent_id is None for n in nodes) == 1
            assert all(n.parent_id in ids for n in nodes if n.parent_id is not None)
            assert 1 <= sum(n.terminal for n in nodes) <= 4
            depths = s.scalars(select(m.SelectionStep.depth).where(m.SelectionStep.job_id == job_id)).all()
            assert sorted(depths) == list(range(max(n.depth for n in nodes) + 1))
            job = s.get_one(m.Job, job_id)
            assert (job.status, job.attempts) == ("done", 1)
        assert s.get_one(m.Run, run_id).model_info is not None
    with Store.open(db_url).session() as s:
        [summary] = statuses(s, [run_id])
    assert (summary["status"], summary["problems_done"]) == ("done", 2)


def test_finished_job_is_not_searched_again(db_url: str, tiny_model: Path) -> None:
    _, [job_id] = store_run(db_url, tiny_model, tiny_config(), limit=1)
    assert run_job(job_id, _settings(db_url)) == "done"
    before = [(n.id, n.text) for n in _nodes(db_url, job_id)]
    assert run_job(job_id, _settings(db_url)) == "skipped"
    assert [(n.id, n.text) for n in _nodes(db_url, job_id)] == before


def test_evaluate_and_export_read_only_stored_nodes(db_url: str, tiny_model: Path) -> None:
    run_id, job_ids = store_run(db_url, tiny_model, tiny_config("bon", width=3), limit=2)
    for job_id in job_ids:
        run_job(job_id, _settings(db_url))
    rows = evaluate(Store.open(db_url), [run_id], ["last", "prod"], ["bon", "majority", "weighted"])
    assert len(rows) == 6
    assert all(r["n_problems"] == 2 and 0 <= r["n_correct"] <= 2 for r in rows)
    with Store.open(db_url).session() as s:
        exported = list(export_jobs(s, run_id))
    assert [e["problem_id"] for e in exported] == ["gsm8k-0", "gsm8k-1"]
    assert all(sum(n["parent_id"] is None for n in e["nodes"]) == 1 for e in exported)


class Crash(BaseException):
    """Stands in for a worker killed between two depth commits."""


def test_interrupted_job_resumes_to_the_same_tree(
    db_url: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config("rebase", width=4, max_depth=8, max_tokens=48)
    labelled = tiny_config("rebase", width=4, max_depth=8, max_tokens=48, extra={"run": "reference"})
    _, [reference] = store_run(db_url, tiny_model, labelled, limit=1)
    run_job(reference, _settings(db_url))
    _, [job_id] = store_run(db_url, tiny_model, cfg, limit=1)

    original = DepthWriter.__call__

    def crash_after_depth_2(self: DepthWriter, tree: Tree, rec: DepthCommit) -> None:
        original(self, tree, rec)
        if rec.depth == 2:
            raise Crash

    monkeypatch.setattr(DepthWriter, "__call__", crash_after_depth_2)
    with pytest.raises(Crash):
        run_job(job_id, _settings(db_url))
    monkeypatch.setattr(DepthWriter, "__call__", original)
    early = {n.path: n.id for n in _nodes(db_url, job_id)}
    assert max(p.count(".") for p in early) == 3  # depths 0..3 committed

    # Its heartbeat is fresh: for all another worker knows, the job is still being searched.
    assert run_job(job_id, _settings(db_url)) == "skipped"
    stale_now = _settings(db_url).with_(stale_after_s=1e-6)  # the dead worker's heartbeat is now stale
    assert run_job(job_id, stale_now) == "done"
    resumed = _nodes(db_url, job_id)
    assert {n.path: n.id for n in resumed if n.path in early} == early
    shape = lambda nodes: [(n.path, n.text, n.score, n.terminal, n.kept) for n in nodes]  # noqa: E731
    assert sorted(shape(resumed)) == sorted(shape(_nodes(db_url, reference)))
    with session_scope(db_url) as s:
        assert s.get_one(m.Job, job_id).attempts == 2
        assert s.scalar(
            select(func.count()).select_from(m.SelectionStep).where(m.SelectionStep.job_id == job_id)
        ) == (max(n.depth for n in resumed) + 1)


def _bare_run(method: str, width: int, config_hash: str) -> m.Run:
    """A run row with no config, for tests that write its jobs or nodes by hand."""
    return m.Run(
        dataset="t", method=method, width=width, seed=0, config={}, config_hash=config_hash,
        policy_model="a", prm_model="a", versions={},
    )  # fmt: skip


def test_load_tree_rebuilds_paths_and_links(pg_session, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    problem = m.Problem(dataset="t", problem_id="p", question="q", answer="1", meta={})
    run = _bare_run("rebase", 2, "x")
    job = m.Job(run=run, problem=problem)
    pg_session.add(job)
    pg_session.flush()
    root = m.Node(job_id=job.id, depth=0, path="0", text="P", step_tokens=5, cum_tokens=5)
    pg_session.add(root)
    pg_session.flush()
    kids = [
        m.Node(
            job_id=job.id,
            parent_id=root.id,
            depth=1,
            path=f"0.{i}",
            text=f"s{i}",
            step_tokens=2,
            cum_tokens=7,
            score=0.5,
            terminal=i == 1,
        )
        for i in (1, 0)
    ]
    pg_session.add_all(kids)
    pg_session.flush()
    tree, depth = load_tree(pg_session, job.id)  # type: ignore[misc]
    assert depth == 1
    assert [n.path for n in tree.nodes] == ["0", "0.0", "0.1"]
    assert [n.text for n in tree.nodes] == ["P", "s0", "s1"]
    assert tree.leaves() == [2] and tree.kv_tokens([1]) == 7


@pytest.mark.parametrize("method", ["ets", "beam", "dvts"])
def test_tree_methods_store_selection_figures(tmp_path: Path, tiny_model: Path, method: str) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    from etsq.store.session import upgrade

    upgrade(url)
    _, [job_id] = store_run(url, tiny_model, tiny_config(method, width=6), limit=1)
    assert run_job(job_id, _settings(url)) == "done"
    with session_scope(url) as s:
        steps = s.scalars(select(m.SelectionStep).where(m.SelectionStep.job_id == job_id)).all()
        nodes = s.scalars(select(m.Node).where(m.Node.job_id == job_id)).all()
        assert {st.depth for st in steps} == {n.depth for n in nodes}
        for st in steps:
            assert 0 < st.kv_after <= st.kv_before or st.kept_size == 0
        frontier = [n for n in nodes if not n.terminal and n.depth < max(n.depth for n in nodes)]
        assert all(n.kept is not None and n.n_children is not None for n in frontier)
        assert all((n.n_children > 0) == n.kept for n in frontier)
        if method == "ets":
            multi = [st for st in steps if st.depth > 0 and st.frontier_size > 1 and st.remaining > 0]
            assert multi and all(st.solver and st.n_clusters and st.solve_ms is not None for st in multi)
            assert all(n.cluster is not None for n in frontier if n.depth > 0)


# --------------------------------------------------------------------------- the per-depth commit

AWKWARD_TEXTS = ['say "hi"\n\n', "back\\slash {braces} , commas", "", "ünïcode ∑ 𝛑", "NULL", "a\tb"]


def _depth_zero(tree: Tree, texts: list[str]) -> DepthCommit:
    """The root's expansion into `texts`, as the search loop hands it to the commit callback."""
    new = [tree.add_child(0, text, 3, finish_reason="stop").idx for text in texts]
    for i in new:
        tree.nodes[i].score = i / 10
    selection = Selection(counts={0: len(texts)})
    return DepthCommit(0, [0], len(texts), selection, 5, 5, 0.1, new_nodes=new, expand_ms=1.0, score_ms=1.0)


def test_a_depth_commits_its_nodes_marks_and_job_row_at_once(db_url: str, tiny_model: Path) -> None:
    _, [job_id] = store_run(db_url, tiny_model, tiny_config(), limit=1)
    claim = claim_job(Store.open(db_url), job_id, stale_after_s=60)
    assert claim is not None
    tree = Tree("prompt", 5)
    DepthWriter(Store.open(db_url), job_id, claim.lease)(tree, _depth_zero(tree, AWKWARD_TEXTS))
    stored = {n.path: n for n in _nodes(db_url, job_id)}
    assert [stored[n.path].id for n in tree.nodes] == [n.db_id for n in tree.nodes]
    assert [stored[n.path].text for n in tree.nodes[1:]] == AWKWARD_TEXTS
    assert [stored[n.path].score for n in tree.nodes[1:]] == [n.score for n in tree.nodes[1:]]
    assert {stored[n.path].parent_id for n in tree.nodes[1:]} == {tree.root.db_id}
    assert (stored["0"].kept, stored["0"].n_children) == (True, len(AWKWARD_TEXTS))
    with session_scope(db_url) as s:
        job = s.get_one(m.Job, job_id)
        assert (job.depth, job.status, job.lease) == (1, "running", claim.lease)
        assert s.scalar(select(func.count()).select_from(m.SelectionStep)) == 1


def test_a_commit_under_a_lost_lease_writes_nothing(db_url: str, tiny_model: Path) -> None:
    _, [job_id] = store_run(db_url, tiny_model, tiny_config(), limit=1)
    assert claim_job(Store.open(db_url), job_id, stale_after_s=60) is not None
    tree = Tree("prompt", 5)
    with pytest.raises(LeaseLost, match="no longer ours"):
        DepthWriter(Store.open(db_url), job_id, "someone-else")(tree, _depth_zero(tree, ["a\n\n", "b\n\n"]))
    assert _nodes(db_url, job_id) == []
    with session_scope(db_url) as s:
        assert s.get_one(m.Job, job_id).depth == 0
        assert s.scalar(select(func.count()).select_from(m.SelectionStep)) == 0


def _deeper(tree: Tree, frontier: list[int], depth: int, final: bool) -> DepthCommit:
    """Depth `depth` of a search: the first half of `frontier` kept, two children each (in cluster
    0), the rest pruned; at the final depth every node is pruned and nothing is new."""
    counts = {i: 0 if final or k >= len(frontier) // 2 else 2 for k, i in enumerate(frontier)}
    new = [tree.add_child(i, f"step {depth}.{k}\n\n", 2).idx for i, n in counts.items() for k in range(n)]
    for i in new:
        tree.nodes[i].score = 1 / i
    selection = Selection(counts, clusters={i: 0 for i in frontier}, info={"solver": "highs"})
    for i, n in counts.items():  # as the search loop records its decision
        tree.nodes[i].kept, tree.nodes[i].n_children, tree.nodes[i].cluster = n > 0, n, 0
    return DepthCommit(depth, frontier, 10 - depth, selection, 9, 4, 0.2, new_nodes=new, expand_ms=1.0)


def test_a_depth_commit_is_at_most_three_round_trips_on_postgres(pg_url: str, tiny_model: Path) -> None:
    """Issue 21: a depth's commit waits on the database at most three times (counted on the wire:
    the pool's ping, the one statement, and once per connection psycopg's prepare), whatever it
    writes: the root and its children, marks, the final depth that finishes the job and its run."""
    _, [job_id] = store_run(pg_url, tiny_model, tiny_config(), limit=1)
    url = make_url(pg_url)
    proxy = WireTrips(str(url.host), int(url.port or 5432))
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    try:
        store = Store.open(proxied)
        claim = claim_job(store, job_id, stale_after_s=60)
        assert claim is not None
        writer = DepthWriter(store, job_id, claim.lease, generation=claim.generation)
        tree = Tree("prompt", 5)
        rec, trips = _depth_zero(tree, ["a\n\n", "b\n\n", "c\n\n", "d\n\n"]), []
        tree.root.kept, tree.root.n_children = True, 4
        for depth in range(1, 10):
            since = proxy.mark()
            writer(tree, rec)
            trips.append(proxy.trips(since))
            rec = _deeper(tree, rec.new_nodes, depth, final=depth == 9)
        since = proxy.mark()
        writer(tree, rec)
        trips.append(proxy.trips(since))
    finally:
        get_engine(proxied).dispose()
        proxy.stop()
    assert max(trips) <= 3 and trips.count(2) >= len(trips) - 1, trips
    with session_scope(pg_url) as s:
        stored = load_tree(s, job_id)
        job, steps = s.get_one(m.Job, job_id), s.scalars(select(m.SelectionStep)).all()
        assert (job.status, job.depth, job.lease) == ("done", 9, None) and job.search_s
        assert s.get_one(m.Run, job.run_id).finished_at is not None
        assert len(steps) == 10 and all(st.wall_ms and st.info == {"solver": "highs"} for st in steps[1:])
    assert stored is not None and stored[1] == 9
    fields = ("db_id", "path", "text", "score", "kept", "n_children", "cluster")
    assert [[getattr(n, f) for f in fields] for n in stored[0].nodes] == [
        [getattr(n, f) for f in fields] for n in tree.nodes
    ]


def _slow_writes(monkeypatch: pytest.MonkeyPatch, delay_s: float) -> list[tuple[int, float, float]]:
    """Every depth's write takes `delay_s` longer; (depth, start, end) of each write, as they end."""
    spans: list[tuple[int, float, float]] = []
    original = DepthWriter._write

    def slow(self: DepthWriter, tree: Tree, handed: HandedDepth) -> None:
        start = time.perf_counter()
        time.sleep(delay_s)
        original(self, tree, handed)
        spans.append((handed.rec.depth, start, time.perf_counter()))

    monkeypatch.setattr(DepthWriter, "_write", slow)
    return spans


def test_a_background_writer_stores_each_depth_while_the_next_is_searched(
    db_url: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's writer: each call hands its depth over and returns while the write goes on; the
    depths are written one at a time, in order; the final one is stored when its call returns; and
    the stored tree is the searched one, parents stored by an earlier write in flight included."""
    _, [job_id] = store_run(db_url, tiny_model, tiny_config(), limit=1)
    store = Store.open(db_url)
    claim = claim_job(store, job_id, stale_after_s=60)
    assert claim is not None
    spans = _slow_writes(monkeypatch, 0.2)
    tree = Tree("prompt", 5)
    rec, returned = _depth_zero(tree, ["a\n\n", "b\n\n", "c\n\n", "d\n\n"]), []
    tree.root.kept, tree.root.n_children = True, 4
    with DepthWriter(store, job_id, claim.lease, generation=claim.generation, background=True) as writer:
        for depth in range(1, 5):
            writer(tree, rec)
            returned.append(time.perf_counter())
            rec = _deeper(tree, rec.new_nodes, depth, final=depth == 4)
        writer(tree, rec)
        returned.append(time.perf_counter())
    assert [d for d, _, _ in spans] == [0, 1, 2, 3, 4]
    assert all(prev_end <= start for (_, _, prev_end), (_, start, _) in itertools.pairwise(spans))
    assert all(back < end for back, (_, _, end) in zip(returned[:-1], spans[:-1], strict=True))
    assert returned[-1] >= spans[-1][2]  # the final depth: stored before its call returns
    with session_scope(db_url) as s:
        stored = load_tree(s, job_id)
        job = s.get_one(m.Job, job_id)
        assert (job.status, job.depth, job.lease) == ("done", 4, None)
        assert s.scalar(select(func.count()).select_from(m.SelectionStep)) == 5
    assert stored is not None
    fields = ("db_id", "path", "text", "score", "kept", "n_children", "cluster")
    assert [[getattr(n, f) for f in fields] for n in stored[0].nodes] == [
        [getattr(n, f) for f in fields] for n in tree.nodes
    ]


def test_a_background_writers_failure_reaches_the_search(
    db_url: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A depth fenced while in flight fails the search's next handing over, which writes nothing;
    a search that fails while a depth is in flight leaves the writer once that depth is stored."""
    store = Store.open(db_url)
    _, [job_id, other_id] = store_run(db_url, tiny_model, tiny_config(), limit=2)
    first = claim_job(store, job_id, stale_after_s=0.5, worker="box2")
    time.sleep(1.0)  # box2 is cut off: its lease expires and box1 takes the job
    second = claim_job(store, job_id, stale_after_s=0.5, worker="box1")
    assert first is not None and second is not None
    stale = DepthWriter(store, job_id, second.lease, generation=first.generation, background=True)
    tree = Tree("prompt", 5)
    rec = _depth_zero(tree, ["a\n\n", "b\n\n"])
    stale(tree, rec)  # handed over: the fence is met on the writer's thread
    with pytest.raises(LeaseFenced, match=r"generation 1 is stale"):
        stale(tree, _deeper(tree, rec.new_nodes, 1, final=False))
    stale.__exit__(None, None, None)
    assert _nodes(db_url, job_id) == []

    spans = _slow_writes(monkeypatch, 0.3)
    claim = claim_job(store, other_id, stale_after_s=60)
    assert claim is not None
    tree = Tree("prompt", 5)
    with pytest.raises(Crash), DepthWriter(store, other_id, claim.lease, background=True) as writer:
        writer(tree, _depth_zero(tree, ["a\n\n"]))
        raise Crash
    assert [d for d, _, _ in spans] == [0]
    assert [n.path for n in _nodes(db_url, other_id)] == ["0", "0.0"]


def test_a_runs_jobs_are_stored_in_bulk_as_the_orm_stores_a_job(db_url: str) -> None:
    """The bulk insert (one unnest statement on PostgreSQL) writes the defaults `m.Job` declares,
    one job per problem in order, round-robin over the queues."""
    from etsq.store.bulk import insert_jobs

    with session_scope(db_url) as s:
        problems = [m.Problem(dataset="t", problem_id=str(i), question=f"q{i}", answer="1") for i in range(5)]
        run = _bare_run("bon", 1, "h")
        s.add_all([*problems, run])
        s.flush()
        ids = [p.id for p in problems]
        s.add(m.Job(run_id=run.id, problem_id=ids[0], queue="a"))  # the ORM's defaults, for comparison
        s.flush()
        insert_jobs(s.connection(), run.id, ids[1:], ["a", "b", "a", "b"])
    with session_scope(db_url) as s:
        jobs = list(s.scalars(select(m.Job).order_by(m.Job.id)))
        assert [(j.problem_id, j.queue) for j in jobs] == list(zip(ids, "aabab", strict=True))
        columns = ("status", "attempts", "depth", "lease_gen", "lease", "error", "worker", "search_s")
        first = [getattr(jobs[0], c) for c in columns]
        assert first == [JobStatus.QUEUED, 0, 0, 0, None, None, None, None]
        assert all([getattr(j, c) for c in columns] == first for j in jobs)
        assert all(j.created_at is not None and j.started_at is None for j in jobs)


def test_bulk_node_writes_return_ids_in_row_order(db_url: str, tiny_model: Path) -> None:
    _, [job_id] = store_run(db_url, tiny_model, tiny_config(), limit=1)
    rows = [
        NodeRow(job_id, None, 1, f"0.{i}", f"step {i}", 2, 7, None, False, None, None, None)
        for i in range(300)
    ]
    with get_engine(db_url).begin() as conn:
        conn.execute(m.Job.__table__.update().where(m.Job.id == job_id).values(depth=0))  # take the lock
        ids = insert_nodes(conn, rows[::-1])
        mark_nodes(conn, [Mark(i, i % 2 == 0, i % 3, None if i % 5 else 7) for i in ids])
    by_id = {n.id: n for n in _nodes(db_url, job_id)}
    assert [by_id[i].path for i in ids] == [r.path for r in rows[::-1]]
    assert all((n.kept, n.n_children, n.cluster) == (n.id % 2 == 0, n.id % 3, None if n.id % 5 else 7)
               for n in by_id.values())  # fmt: skip


def test_a_run_scored_with_an_older_prm_prompt_is_not_continued_with_the_new_one(
    db_url: str, tiny_model: Path
) -> None:
    """A judge run stored before the prompt's revision 2 fails with the reason instead of mixing prompts."""
    run_id, [job_id, *_] = store_run(db_url, tiny_model, tiny_config("rebase", width=2))
    with session_scope(db_url) as s:
        run = s.get_one(m.Run, run_id)
        assert run.config["models"]["prm_revision"] == 2  # judge's current prompt is part of the identity
        run.config = {
            **run.config,
            "models": {k: v for k, v in run.config["models"].items() if k != "prm_revision"},
        }
    assert run_job(job_id, _settings(db_url)) == "failed"
    with session_scope(db_url) as s:
        job = s.get_one(m.Job, job_id)
        assert job.error is not None and "revision 1 of the 'judge' PRM prompt" in job.error
        assert s.scalar(select(func.count()).select_from(m.Node).where(m.Node.job_id == job_id)) == 0
    shepherd = ModelConfig.create("local", prm_family="math-shepherd").to_dict()
    assert "prm_revision" not in shepherd  # unchanged prompts keep the identity runs had before


def test_search_time_counts_the_depths_not_the_pause_between_attempts(
    db_url: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job stopped after depth 1 and resumed 1.5 s later: its seconds leave out the pause."""
    run_id, [job_id] = store_run(db_url, tiny_model, tiny_config("rebase", width=4, max_depth=6), limit=1)
    original = DepthWriter.__call__

    def crash_after_depth_1(self: DepthWriter, tree: Tree, rec: DepthCommit) -> None:
        original(self, tree, rec)
        if rec.depth == 1:
            raise Crash

    monkeypatch.setattr(DepthWriter, "__call__", crash_after_depth_1)
    with pytest.raises(Crash):
        run_job(job_id, _settings(db_url))
    monkeypatch.setattr(DepthWriter, "__call__", original)
    with session_scope(db_url) as s:
        first = s.get_one(m.Job, job_id).search_s
    assert first is not None and first > 0
    time.sleep(1.5)
    assert run_job(job_id, _settings(db_url).with_(stale_after_s=1e-6)) == "done"
    with session_scope(db_url) as s:
        job = s.get_one(m.Job, job_id)
        assert job.search_s is not None and job.started_at and job.finished_at
        span = (job.finished_at - job.started_at).total_seconds()
        searched = job.search_s
    assert first < searched <= span - 1.5
    [row] = evaluate(Store.open(db_url), [run_id], ["last"], ["weighted"])
    assert row["seconds"] == pytest.approx(searched)
