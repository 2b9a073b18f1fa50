"""`etsq`: submit searches, run workers, watch runs, aggregate and export results.

Each command parses its options, calls one function of the `etsq` package and prints the result.
The group turns every user-caused failure into one `etsq: error:` line and exit status 2 (see
`cli.app.EtsqGroup`), which is also what click's test runner sees.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cli import results
from cli.app import EtsqGroup, open_store, pass_settings, print_json, table
from cli.broker import broker
from cli.servers import servers
from cli.testbed import testbed
from etsq.errors import UserError
from etsq.models.backends import BACKEND_NAMES, PRM_APIS, REMOTE_BACKENDS, backends_help
from etsq.models.config import ModelConfig
from etsq.models.prm_families import PRM_FAMILIES
from etsq.search.config import COSTS, SearchConfig
from etsq.search.methods import METHODS
from etsq.settings import Settings
from etsq.validation import LIMITS

if TYPE_CHECKING:
    from etsq.submit import ResumedRun

F = TypeVar("F", bound=Callable[..., Any])

# Every SearchConfig field is one option: its default from the dataclass, its type and lower bound from
# etsq.validation.LIMITS (the full range is checked when the config is built), its help from either.
_NOT_OPTIONS = ("method", "step_delimiter", "extra")
_SEARCH_KEYS = ("method", *(f.name for f in fields(SearchConfig) if f.name not in _NOT_OPTIONS))
_DEFAULT_RULES = {
    "lambda_s": "by width",
    "beam_k": "ceil(sqrt(remaining))",
    "dvts_subtrees": "ceil(sqrt(W))",
}
_HELP = {
    "width": "Budget W: leaves per problem.",
    "softmax_temp": "REBASE/ETS/particle weight temperature T.",
    "cost": "ETS: node KV cost, uniform 1/(M+N) (paper) or the tokens a node holds.",
}


def _search_option(name: str) -> Callable[[F], F]:
    """The click option of one SearchConfig field, restating none of its default or range."""
    default = SearchConfig.__dataclass_fields__[name].default
    limit = LIMITS.get(name)
    kind: Any = click.Choice(COSTS) if name == "cost" else float
    if limit is not None and limit.integer:
        kind = click.IntRange(min=int(limit.low))
    help_text = _HELP.get(name) or (limit.meaning[:1].upper() + limit.meaning[1:] + "." if limit else "")
    if name in _DEFAULT_RULES:
        help_text += f" [default: {_DEFAULT_RULES[name]}]"
    flag = "--" + name.replace("_", "-")
    return click.option(flag, type=kind, default=default, show_default=default is not None, help=help_text)


def search_options(command: F) -> F:
    """Every search option, in SearchConfig's field order."""
    for name in reversed(_SEARCH_KEYS[1:]):
        command = _search_option(name)(command)
    return command


_MODEL_DEFAULTS = {f.name: f.default for f in fields(ModelConfig)}
_MODEL_KEYS = {
    "policy_model": "policy", "prm_model": "prm", "prm_family": "prm_family", "embedding_model": "embedding",
    "policy_url": "policy_url", "prm_url": "prm_url", "prm_api": "prm_api", "sim_latency": "sim_latency_s",
    "sim_answer_every": "sim_answer_every",
}  # fmt: skip


@click.group(
    cls=EtsqGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(package_name="etsq")
@click.option("--debug", is_flag=True, help="Show the full traceback of any error.")
def cli(debug: bool) -> None:
    """etsq: ETS tree search and its baselines over math benchmarks, as a job queue.

    \b
    Examples:
      etsq submit gsm8k --method rebase --width 4 --limit 3 --wait
      etsq worker                      # serve jobs from the queue
      etsq status --json
      etsq aggregate --agg prod --vote weighted

    Settings come from ETSQ_* environment variables (ETSQ_HOME, ETSQ_DATABASE_URL, ETSQ_BROKER_URL,
    ETSQ_DATA_DIR, ...; the README lists them all).
    """


def _ignored_options(method: str) -> list[str]:
    """A warning per method option given on the command line that `method` does not read."""
    from etsq.search.methods import ignored_params

    ctx = click.get_current_context()
    given = [
        name
        for name in [*_SEARCH_KEYS, "embedding_model"]
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
    ]
    fields = {"embedding_model": "embedding"}
    return [
        f"--{name.replace('_', '-')} has no effect on {method}"
        for name in given
        if ignored_params(method, [fields.get(name, name)])
    ]


def _run_spec(dataset: str, limit: int | None, opts: dict[str, Any]) -> Any:
    from etsq.store.runs import RunSpec

    search = SearchConfig(**{k: opts[k] for k in _SEARCH_KEYS})
    models = ModelConfig.create(opts["backend"], **{field: opts[opt] for opt, field in _MODEL_KEYS.items()})
    return RunSpec(dataset=dataset, search=search, models=models, limit=limit)


@cli.command()
@click.argument("dataset")
@click.option("--method", type=click.Choice(sorted(METHODS)), default="rebase", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N problems.")
@search_options
@click.option(
    "--backend",
    type=click.Choice(BACKEND_NAMES),
    default=_MODEL_DEFAULTS["backend"],
    show_default=True,
    help=backends_help(),
)
@click.option("--policy-url", default=None, help="Policy server URL (sglang/openai) [default: the worker's].")
@click.option("--prm-url", default=None, help="PRM server URL [default: the policy server].")
@click.option(
    "--prm-api",
    type=click.Choice(PRM_APIS),
    default=_MODEL_DEFAULTS["prm_api"],
    show_default=True,
    help="SGLang PRM requests: stock logprobs, or the reference fork's forward_only.",
)
@click.option(
    "--sim-latency",
    type=click.FloatRange(min=0),
    default=_MODEL_DEFAULTS["sim_latency_s"],
    show_default=True,
    help="sim backend: seconds each request takes.",
)
@click.option(
    "--sim-answer-every",
    type=click.IntRange(min=1),
    default=_MODEL_DEFAULTS["sim_answer_every"],
    show_default=True,
    help="sim backend: about one step in N ends its trajectory.",
)
@click.option(
    "--policy-model",
    default=None,
    help="local: 'testbed' [default: the tiny arith policy], 'smollm2', a dir or a hub id. "
    "Servers: the chat template's tokenizer.",
)
@click.option(
    "--prm-model",
    default=None,
    help="PRM model [default: 'testbed-prm' with the default policy, else the policy model].",
)
@click.option(
    "--prm-family",
    type=click.Choice(sorted(PRM_FAMILIES)),
    default=None,
    help="How the PRM is prompted and read [default: the PRM model's own (testbed-prm: likelihood), "
    "else judge].",
)
@click.option("--embedding-model", default=None, help="ETS clusters' sentence-embedding model.")
@click.option(
    "--queue", default=None, help="Send every job here [default: spread over live workers' queues]."
)
@click.option(
    "--no-check-servers",
    "no_check",
    is_flag=True,
    help="Store the run without checking its model servers answer (they are not up yet).",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Wait for the run, starting a local worker for it if none runs; exit 1 if problems failed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@pass_settings
def submit(
    settings: Settings,
    dataset: str,
    wait: bool,
    as_json: bool,
    limit: int | None,
    queue: str | None,
    no_check: bool,
    **opts: Any,
) -> int:
    """Enqueue one search job per problem of DATASET (math500, gsm8k or a .jsonl file).

    A run is its problems (by content) and the configuration its method reads: submitting the same
    again, under any spelling of the dataset, resumes that run; changed data makes a new run.  An
    option the method does not read (--lambda-b for rebase) is ignored with a warning.  Model servers
    are checked to answer first, as a worker checks them.

    \b
    Examples:
      etsq submit math500 --method ets --width 256
      etsq submit gsm8k --method rebase --width 4 --limit 3 --wait
      etsq submit my_problems.jsonl --method bon --width 16 --queue gpu1
      etsq submit gsm8k --method ets --width 8 --backend openai --policy-url http://gpu0:8000
      etsq submit gsm8k --backend sglang --no-check-servers   # URLs from the workers' --policy-url
    """
    from etsq.submit import submit as submit_runs

    ignored = _ignored_options(opts["method"])
    store = open_store(settings)
    spec = _run_spec(dataset, limit, opts)
    submission = submit_runs(settings, store, [spec], queue, check_servers=not no_check, wait=wait)
    for line in ignored:  # after the submission: a refused one says only why (one line)
        click.echo(line, err=True)
    run = submission.runs[0]
    if not run.created:
        paused = (
            f"; its {run.cancelled} cancelled jobs stay cancelled: "
            f"`etsq resume {run.run_id}` queues them again"
            if run.cancelled
            else ""
        )
        click.echo(
            f"run {run.run_id} has this configuration already; "
            f"{run.jobs_enqueued} unfinished jobs enqueued{paused}",
            err=True,
        )
    if as_json:
        print_json({"run_id": run.run_id, "created": run.created, "jobs": run.jobs_enqueued,
                    "cancelled": run.cancelled, "workers_listening": submission.listening})  # fmt: skip
    else:
        click.echo(run.run_id)
    if wait:
        return _wait(submission.connection, store, run.run_id, submission.own_queue)
    if not submission.listening and run.jobs_enqueued:
        _no_worker(submission.connection, run.run_id)
    return 0


def _no_worker(conn: Any, run_id: int) -> None:
    click.echo(
        f"no worker is running for {conn.describe()}: start one with `etsq worker`, "
        f"or follow this run with `etsq resume {run_id} --wait`",
        err=True,
    )


def _wait(conn: Any, store: Any, run_id: int, own_queue: bool) -> int:
    """Follow the run to its end; 1 when problems failed (counted on stderr), else 0; 130 on Ctrl-C
    (within a second: the local worker is asked to stop, not waited for)."""
    from etsq.submit import RunWaiter

    try:
        with RunWaiter(conn, store, run_id, own_queue) as waiter:
            if waiter.worker_log is not None:
                click.echo(
                    f"no worker is running; starting one for run {run_id} (log: {waiter.worker_log})",
                    err=True,
                )
            if waiter.others_waiting:
                click.echo(
                    f"it runs run {run_id}'s jobs only; {waiter.others_waiting} jobs of other runs "
                    "wait for `etsq worker`",
                    err=True,
                )
            updates = waiter.follow()
            first = next(updates)
            with click.progressbar(
                length=first.total, label=f"run {run_id}", file=sys.stderr, show_pos=True
            ) as bar:
                bar.update(first.finished)
                last = first
                for now in updates:
                    bar.update(now.finished - last.finished)
                    last = now
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted: run {run_id} stays queued; `etsq resume {run_id} --wait` continues it",
            err=True,
        )
        return 130
    if last.failed:
        click.echo(
            f"run {run_id}: {last.failed} of {last.total} problems failed (see `etsq status {run_id}`)",
            err=True,
        )
        return 1
    return 0


@cli.command()
@click.argument("runs", nargs=-1, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of runs.")
@click.option("--watch", is_flag=True, help="Live progress bars until the runs finish.")
@click.option("--dataset", "datasets", multiple=True, help="Only runs on this dataset; repeatable.")
@click.option("--method", "methods", multiple=True, help="Only runs of this method; repeatable.")
@pass_settings
def status(
    settings: Settings,
    runs: tuple[int, ...],
    as_json: bool,
    watch: bool,
    datasets: tuple[str, ...],
    methods: tuple[str, ...],
) -> None:
    """Show runs: status and problems done/failed/running.

    \b
    Examples:
      etsq status
      etsq status 3 --json
      etsq status --watch
    """
    from etsq.store.jobs import expired_leases
    from etsq.store.runs import statuses
    from etsq.watch import Watch

    store = open_store(settings)
    with store.session() as s:
        rows = statuses(s, list(runs) or None, datasets, methods)
        expired = expired_leases(s, settings.stale_after_s, [r["run_id"] for r in rows])
    for row in rows:
        row["expired_leases"] = [e for e in expired if e["run_id"] == row["run_id"]]
    if watch:
        wanted = [row["run_id"] for row in rows] if runs or datasets or methods else None
        Watch(store, wanted, echo=lambda line: click.echo(line)).run()
    elif as_json:
        print_json(rows)
    else:
        from etsq.store.labels import shown_label, sim_note

        shown = [{**row, "label": shown_label(row)} for row in rows]
        table(shown, ["run_id", "dataset", "label", "status", "problems", "problems_done",
                      "problems_failed", "problems_running", "problems_cancelled", "nodes"],
              title=sim_note(rows))  # fmt: skip
        for e in expired:  # a worker cut off (or dead) past its lease: a janitor requeues its job
            silent = f", silent {e['silent_s']} s" if e["silent_s"] is not None else ""
            click.echo(
                f"run {e['run_id']}: job {e['job_id']} held by {e['worker']} with an expired lease "
                f"(generation {e['generation']}{silent}; ETSQ_STALE_AFTER_S={settings.stale_after_s:g})"
            )


@cli.command()
@click.option("--gpu", default=None, help="Pin to this GPU: consume queue gpuN and see only that device.")
@click.option(
    "--queue", default=None, help="Queue to consume [default: gpuN with --gpu, else ETSQ_QUEUE or 'etsq']."
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Problems searched at once (threads) [default: 8 with --policy-url, else 1: "
    "in-process models use the CPU/GPU themselves, servers need full batches].",
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--backend",
    type=click.Choice(REMOTE_BACKENDS),
    default=None,
    help="What --policy-url serves; its servers are checked at start.",
)
@click.option("--policy-url", default=None, help="Policy server for runs that name none (checked at start).")
@click.option("--prm-url", default=None, help="PRM server for runs that name none [default: --policy-url].")
@click.option(
    "--prm-family",
    type=click.Choice(sorted(PRM_FAMILIES)),
    default="judge",
    show_default=True,
    help="PRM family whose label tokens the start-up check looks for.",
)
@pass_settings
def worker(settings: Settings, **options: Any) -> None:
    """Run a Celery worker that searches queued jobs.

    \b
    Examples:
      etsq worker                                   # embedded default
      etsq worker --gpu 0 --concurrency 8           # queue gpu0, CUDA_VISIBLE_DEVICES=0
      etsq worker --gpu 0 --backend sglang --policy-url http://127.0.0.1:30000 --prm-url http://127.0.0.1:30001
    """
    from etsq.queue.serve import WorkerOptions, serve

    serve(
        settings,
        open_store(settings),
        WorkerOptions(**options),
        lambda line: click.echo(f"etsq worker: {line}", err=True),
    )


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--queue", default=None, help="Send every job here [default: spread over live workers' queues]."
)
@click.option("--dry-run", is_flag=True, help="Check the file and print the runs; write nothing.")
@click.option(
    "--no-check-servers", "no_check", is_flag=True, help="Do not check the runs' model servers answer."
)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@click.option(
    "--wait",
    is_flag=True,
    help="Wait for every run, starting a local worker if none listens; exit 1 if problems failed.",
)
@pass_settings
def sweep(
    settings: Settings,
    file: Path,
    queue: str | None,
    dry_run: bool,
    no_check: bool,
    as_json: bool,
    wait: bool,
) -> int:
    """Submit every run of a sweep FILE (YAML grid); existing runs resume instead of repeating.

    \b
    Example sweep.yaml:
      datasets: [gsm8k]
      methods: [ets, rebase]
      widths: [16, 64]
      limit: 50
      params: {softmax_temp: [0.2, 0.5]}
    Then: etsq sweep sweep.yaml --dry-run && etsq sweep sweep.yaml && etsq status --watch

    A run holds only the parameters its method reads: grid points that differ only in one their
    method ignores (lambda_b for rebase) are one run, and the count says so.
    """
    from etsq.sweep import sweep_grid

    grid = sweep_grid(file)
    specs = grid.specs
    if dry_run:
        _print_plan(settings, grid.points, specs, queue, not no_check, as_json)
        return 0
    from etsq.submit import submit as submit_runs

    store = open_store(settings)
    submission = submit_runs(settings, store, specs, queue, check_servers=not no_check)
    runs = submission.runs
    rows = [
        {"run_id": r.run_id, "dataset": r.spec.dataset, "method": r.spec.search.method,
         "width": r.spec.search.width, "label": r.spec.label, "backend": r.spec.models.backend,
         "problems": r.problems, "created": r.created, "jobs_enqueued": r.jobs_enqueued}
        for r in runs
    ]  # fmt: skip
    if as_json:
        print_json(rows)
    else:
        from etsq.store.labels import sim_note

        columns = ["run_id", "dataset", "label", "problems", "created", "jobs_enqueued"]
        table(rows, columns, title=sim_note(rows))
    created = [r for r in runs if r.created]
    click.echo(
        f"sweep: {_points(grid.points, len(runs))}{len(runs)} runs ({len(created)} created, "
        f"{len(runs) - len(created)} existing), "
        f"{sum(r.problems for r in created)} new jobs, {sum(r.jobs_enqueued for r in runs)} enqueued",
        err=True,
    )
    if not wait:
        return 0
    codes = [_wait(submission.connection, store, r.run_id, submission.own_queue) for r in runs]
    return max(codes, default=0)


def _parameters(spec: Any) -> str:
    """Every search parameter the run stores (its method's and the shared ones), besides the method
    and width the label shows: what the dry run lets one check before submitting."""
    stored = spec.settings()["search"]
    return " ".join(f"{k}={v}" for k, v in stored.items() if k not in ("method", "width"))


def _points(points: int, runs: int) -> str:
    """`12 grid points -> ` where points collapsed into fewer runs, else nothing."""
    return f"{points} grid points -> " if points != runs else ""


def _print_plan(
    settings: Settings, points: int, specs: list[Any], queue: str | None, check: bool, as_json: bool
) -> None:
    from etsq.submit import plan

    planned = plan(settings, open_store(settings), specs, queue, check)
    rows = [
        {"run_id": p.run_id, "dataset": p.spec.dataset, "method": p.spec.search.method,
         "width": p.spec.search.width, "label": p.spec.label, "backend": p.spec.models.backend,
         "problems": p.problems, "new": p.run_id is None, "spec": p.spec}
        for p in planned
    ]  # fmt: skip
    if as_json:
        print_json([{k: v for k, v in row.items() if k != "spec"} for row in rows])
    else:
        from etsq.store.labels import sim_note

        for row in rows:
            row["parameters"] = _parameters(row.pop("spec"))
        table(
            rows,
            ["run_id", "dataset", "label", "backend", "parameters", "problems", "new"],
            title=sim_note(rows),
        )
    new = [p for p in planned if p.run_id is None]
    click.echo(
        f"dry run: {_points(points, len(planned))}{len(planned)} runs ({len(new)} new, "
        f"{len(planned) - len(new)} existing), "
        f"{sum(p.problems for p in new)} new jobs; nothing was written",
        err=True,
    )


_RESUME_BOTH = "name the runs to resume, or --all, not both"
_RESUME_NEITHER = "name a run to resume, or --all"
_WAIT_ONE = "--wait follows one run: resume several without it, and follow them with `etsq status`"


@cli.command("resume")
@click.argument("runs", metavar="RUN...", type=int, nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every run with a job queued, running or cancelled.")
@click.option(
    "--wait",
    is_flag=True,
    help="Wait for the run, starting a local worker for it if none runs; exit 1 if problems failed.",
)
@click.option("--json", "as_json", is_flag=True, help="One object for one RUN, else a list of them.")
@pass_settings
def resume_cmd(settings: Settings, runs: tuple[int, ...], every: bool, wait: bool, as_json: bool) -> int:
    """Enqueue runs' unfinished jobs again (after a crash, a reboot, a flushed Redis, or a cancel).

    A cancel is a pause: cancelled jobs are queued again.  Jobs resume from their last committed
    depth; jobs a live worker holds are left alone, and a job whose message still waits in the
    queue gets no second one.

    \b
    Examples:
      etsq resume 3
      etsq resume 3 --wait      # and follow it, with a local worker if none listens
      etsq resume 3 4 5
      etsq resume --all         # after a reboot or a flushed Redis: every unfinished run
    """
    if bool(runs) == every:
        raise UserError(_RESUME_BOTH if every else _RESUME_NEITHER)
    if wait and (every or len(runs) > 1):
        raise UserError(_WAIT_ONE)
    if every:
        return _resume_all(settings, as_json)
    if len(runs) > 1:
        return _resume_many(settings, list(runs), as_json)
    return _resume_single(settings, runs[0], wait, as_json)


def _resume_single(settings: Settings, run: int, wait: bool, as_json: bool) -> int:
    from etsq.submit import resume_run

    store = open_store(settings)
    done = resume_run(settings, store, run, wait=wait)
    if as_json:
        print_json(_resumed_row(run, done))
    else:
        click.echo(_resumed_line(run, done))
    if wait:
        return _wait(done.connection, store, run, done.own_queue)
    if not done.listening and done.resumed.enqueued + done.resumed.already_waiting:
        _no_worker(done.connection, run)
    return 0


def _resume_all(settings: Settings, as_json: bool) -> int:
    from etsq.submit import unfinished_runs

    runs = unfinished_runs(open_store(settings))
    if not runs:
        if as_json:
            print_json([])
        else:
            click.echo("no run has unfinished jobs")
        return 0
    return _resume_many(settings, runs, as_json)


def _resume_many(settings: Settings, runs: list[int], as_json: bool) -> int:
    from etsq.submit import resume_runs

    done = resume_runs(settings, open_store(settings), runs)
    if as_json:
        print_json([_resumed_row(run, d) for run, d in zip(runs, done, strict=True)])
    else:
        for run, d in zip(runs, done, strict=True):
            click.echo(_resumed_line(run, d))
    waiting = sum(d.resumed.enqueued + d.resumed.already_waiting for d in done)
    if done and not done[0].listening and waiting:
        where = done[0].connection.describe()
        click.echo(f"no worker is running for {where}: start one with `etsq worker`", err=True)
    return 0


def _resumed_row(run: int, done: ResumedRun) -> dict[str, Any]:
    return {
        "run_id": run,
        "enqueued": done.resumed.enqueued,
        "already_queued": done.resumed.already_waiting,
        "uncancelled": done.uncancelled,
        "workers_listening": done.listening,
    }


def _resumed_line(run: int, done: ResumedRun) -> str:
    again = f" ({done.uncancelled} cancelled jobs queued again)" if done.uncancelled else ""
    counts = f"{done.resumed.enqueued} jobs enqueued, {done.resumed.already_waiting} already queued"
    return f"run {run}: {counts}{again}"


@cli.command()
@click.argument("run", type=int)
@pass_settings
def cancel(settings: Settings, run: int) -> None:
    """Pause a run: queued jobs are cancelled, running ones stop after their current depth.
    `etsq resume RUN` queues them again; they go on from their last committed depth.

    \b
    Example:
      etsq cancel 3 && etsq resume 3
    """
    from etsq.store.runs import cancel_run

    with open_store(settings).session() as s:
        cancelled = cancel_run(s, run)
    click.echo(f"run {run}: {cancelled} jobs cancelled; `etsq resume {run}` queues them again")


@cli.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@pass_settings
def db_upgrade(settings: Settings, revision: str) -> None:
    """Apply schema migrations (other commands do this themselves)."""
    from etsq.store.session import current_revision, upgrade

    upgrade(settings.database_url, revision)
    click.echo(f"database at revision {current_revision(settings.database_url)}")


cli.add_command(broker)
cli.add_command(servers)
cli.add_command(testbed)
cli.add_command(results.aggregate)
cli.add_command(results.compare)
cli.add_command(results.study)
cli.add_command(results.report)
cli.add_command(results.tree)
cli.add_command(results.problems)
cli.add_command(results.export)
cli.add_command(results.import_run)


def main() -> None:
    cli.main(prog_name="etsq")


if __name__ == "__main__":
    main()
