"""`etsq`: submit searches, run workers, watch runs, aggregate and export results."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from etsq.aggregate import AGGS, VOTES
from etsq.errors import EtsqError
from etsq.models.prm_families import PRM_FAMILIES
from etsq.models.servers import BACKENDS, HTTP_BACKENDS, PRM_APIS
from etsq.search.config import SearchConfig
from etsq.search.methods import METHODS
from etsq.settings import Settings


class CliError(click.ClickException):
    """A user error: printed as one line, exit status 2."""

    exit_code = 2


def _settings() -> Settings:
    return Settings.from_env()


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 200  # piped output: never squeeze columns into 80 characters
    table = Table(*columns)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="etsq")
def cli() -> None:
    """etsq: ETS tree search and its baselines over math benchmarks, as a job queue.

    \b
    Examples:
      etsq submit gsm8k --method rebase --width 4 --limit 3 --wait
      etsq worker                      # serve jobs from the queue
      etsq status --json
      etsq aggregate --agg prod --vote weighted

    Settings come from ETSQ_HOME, ETSQ_DATABASE_URL, ETSQ_BROKER_URL and ETSQ_DATA_DIR.
    """


def _search_config(opts: dict[str, Any]) -> SearchConfig:
    keys = (
        "method",
        "width",
        "seed",
        "temperature",
        "softmax_temp",
        "max_step_tokens",
        "max_tokens",
        "max_depth",
        "lambda_b",
        "lambda_s",
        "cost",
        "cluster_threshold",
        "beam_k",
        "dvts_subtrees",
    )
    return SearchConfig(**{k: opts[k] for k in keys})


def _models(opts: dict[str, Any]) -> dict[str, Any]:
    from etsq.runs import model_config

    return model_config(
        opts["backend"],
        opts["policy_model"],
        opts["prm_model"],
        opts["prm_family"],
        opts["embedding_model"],
        opts["sim_latency"],
        opts["sim_answer_every"],
        opts["policy_url"],
        opts["prm_url"],
        opts["prm_api"],
    )


@cli.command()
@click.argument("dataset")
@click.option("--method", type=click.Choice(sorted(METHODS)), default="rebase", show_default=True)
@click.option(
    "--width", type=click.IntRange(min=1), default=16, show_default=True, help="Budget W: leaves per problem."
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N problems.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--temperature", type=float, default=1.0, show_default=True, help="Policy sampling temperature."
)
@click.option(
    "--softmax-temp", type=float, default=0.2, show_default=True, help="REBASE/ETS weight temperature T."
)
@click.option("--max-step-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--max-depth", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("--lambda-b", type=float, default=1.0, show_default=True, help="ETS: KV-cost weight.")
@click.option("--lambda-s", type=float, default=None, help="ETS: coverage weight [default: by width].")
@click.option(
    "--cost",
    type=click.Choice(["uniform", "tokens"]),
    default="uniform",
    show_default=True,
    help="ETS: node KV cost, uniform 1/(M+N) (paper) or the tokens a node holds.",
)
@click.option(
    "--cluster-threshold",
    type=float,
    default=0.05,
    show_default=True,
    help="ETS: cosine-distance cut of the step clusters.",
)
@click.option(
    "--beam-k",
    type=click.IntRange(min=1),
    default=None,
    help="Beam: kept nodes [default: ceil(sqrt(remaining))].",
)
@click.option(
    "--dvts-subtrees",
    type=click.IntRange(min=1),
    default=None,
    help="DVTS: subtrees [default: ceil(sqrt(W))].",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="local",
    show_default=True,
    help="Where the models run: in-process, an SGLang server, an OpenAI-compatible server, "
    "or 'sim' (synthetic; load tests only).",
)
@click.option("--policy-url", default=None, help="Policy server URL (sglang/openai) [default: the worker's].")
@click.option("--prm-url", default=None, help="PRM server URL [default: the policy server].")
@click.option(
    "--prm-api",
    type=click.Choice(PRM_APIS),
    default="logprob",
    show_default=True,
    help="SGLang PRM requests: stock logprobs, or the reference fork's forward_only.",
)
@click.option(
    "--sim-latency",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="sim backend: seconds each request takes.",
)
@click.option(
    "--sim-answer-every",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="sim backend: about one step in N ends its trajectory.",
)
@click.option(
    "--policy-model",
    default=None,
    help="local: 'smollm2' [default], a dir or a hub id. Servers: the chat template's tokenizer.",
)
@click.option("--prm-model", default=None, help="PRM model [default: the policy model].")
@click.option("--prm-family", type=click.Choice(sorted(PRM_FAMILIES)), default="judge", show_default=True)
@click.option("--embedding-model", default=None, help="ETS clusters' sentence-embedding model.")
@click.option(
    "--queue", default=None, help="Send every job here [default: spread over live workers' queues]."
)
@click.option("--wait", is_flag=True, help="Wait for the run, starting a local worker if none listens.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
def submit(
    dataset: str, wait: bool, as_json: bool, limit: int | None, queue: str | None, **opts: Any
) -> None:
    """Enqueue one search job per problem of DATASET (math500, gsm8k or a .jsonl file).

    A run is its configuration: submitting the same configuration again resumes that run.

    \b
    Examples:
      etsq submit math500 --method ets --width 256
      etsq submit gsm8k --method rebase --width 4 --limit 3 --wait
      etsq submit my_problems.jsonl --method bon --width 16 --queue gpu1
      etsq submit gsm8k --method ets --width 8 --backend openai --policy-url http://gpu0:8000
    """
    from etsq.runs import RunSpec, load_problems

    settings = _settings()
    spec = RunSpec(dataset=dataset, search=_search_config(opts), models=_models(opts), limit=limit)
    problems = load_problems(settings, spec)
    from etsq.queue import target_queues

    app, broker = _connect(settings)
    run_id, created, n_jobs = _store_and_enqueue(
        settings, app, spec, problems, target_queues(app, queue, settings.queue)
    )
    if not created:
        click.echo(
            f"run {run_id} has this configuration already; {n_jobs} unfinished jobs enqueued", err=True
        )
    if as_json:
        _print_json({"run_id": run_id, "created": created, "jobs": n_jobs})
    else:
        click.echo(run_id)
    if wait:
        _wait(settings, app, broker, run_id)


def _connect(settings: Settings, queue: str | None = None) -> tuple[Any, str]:
    from etsq.queue import broker_url, celery_app

    broker = broker_url(settings)
    return celery_app(replace(settings, broker_url=broker, queue=queue or settings.queue)), broker


def _store_and_enqueue(
    settings: Settings, app: Any, spec: Any, problems: list[Any], queues: list[str]
) -> tuple[int, bool, int]:
    """Store the run (or find it) and enqueue its jobs: all of a new run, the unfinished of an old one."""
    from etsq.queue import enqueue, resume
    from etsq.runs import create_run, delete_run, queued_jobs

    url = settings.database_url
    run_id, created = create_run(url, spec, problems, queues)
    if not created:
        return run_id, False, resume(app, url, run_id, settings.queue)
    jobs = queued_jobs(url, run_id, settings.queue)
    try:
        enqueue(app, jobs)
    except EtsqError:
        delete_run(url, run_id)
        raise
    return run_id, True, len(jobs)


def _wait(settings: Settings, app: Any, broker: str, run_id: int) -> None:
    from etsq.queue import live_workers, start_local_worker, stop_local_worker

    proc = None
    if settings.uses_embedded_broker and not live_workers(app):
        log_path = settings.home / "logs" / f"worker-run{run_id}.log"
        click.echo(f"no worker is listening; starting one (log: {log_path})", err=True)
        proc = start_local_worker(settings, broker, log_path)
    try:
        _progress(settings.database_url, run_id, proc)
    finally:
        if proc is not None:
            stop_local_worker(proc)


def _progress(url: str, run_id: int, proc: Any) -> None:
    from etsq.runs import progress

    finished, failed, total = progress(url, run_id)
    with click.progressbar(length=total, label=f"run {run_id}", file=sys.stderr, show_pos=True) as bar:
        bar.update(finished)
        while finished < total:
            time.sleep(1.0)
            if proc is not None and proc.poll() is not None:
                raise CliError(f"the local worker exited with status {proc.returncode}; see its log")
            now, failed, total = progress(url, run_id)
            bar.update(now - finished)
            finished = now
    if failed:
        click.echo(
            f"run {run_id}: {failed} of {total} problems failed (see `etsq status {run_id}`)", err=True
        )


@cli.command()
@click.argument("runs", nargs=-1, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of runs.")
@click.option("--watch", is_flag=True, help="Live progress bars until the runs finish.")
def status(runs: tuple[int, ...], as_json: bool, watch: bool) -> None:
    """Show runs: status and problems done/failed/running.

    \b
    Examples:
      etsq status
      etsq status 3 --json
      etsq status --watch
    """
    from etsq.runs import statuses

    url = _settings().database_url
    rows = statuses(url, list(runs) or None)
    if watch:
        from etsq.watch import Watch

        Watch(url, list(runs) or None).run()
        return
    if as_json:
        _print_json(rows)
        return
    cols = [
        "run_id",
        "dataset",
        "method",
        "width",
        "status",
        "problems",
        "problems_done",
        "problems_failed",
        "problems_running",
        "nodes",
    ]
    _table(rows, cols)


@cli.command()
@click.argument("runs", nargs=-1, type=int)
@click.option(
    "--agg",
    "aggs",
    type=click.Choice(AGGS),
    multiple=True,
    help="Step aggregation [default: last]; repeatable.",
)
@click.option(
    "--vote",
    "votes",
    type=click.Choice(VOTES),
    multiple=True,
    help="Answer selection [default: weighted]; repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of results.")
def aggregate(runs: tuple[int, ...], aggs: tuple[str, ...], votes: tuple[str, ...], as_json: bool) -> None:
    """Grade runs offline from stored nodes: step aggregation x answer selection.

    \b
    Examples:
      etsq aggregate                            # every run, last + weighted majority
      etsq aggregate 3 4 --agg prod --agg min --vote majority --json
    """
    from etsq.evaluate import evaluate

    rows = evaluate(
        _settings().database_url, list(runs) or None, list(aggs) or ["last"], list(votes) or ["weighted"]
    )
    if as_json:
        _print_json(rows)
        return
    _table(
        rows, ["run_id", "dataset", "method", "width", "agg", "vote", "n_problems", "n_correct", "accuracy"]
    )


@cli.command()
@click.argument("run", type=int)
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File [default: stdout].",
)
def export(run: int, fmt: str, output: Path | None) -> None:
    """Export a run's trees, one JSON object per problem.

    \b
    Example:
      etsq export 3 -o run3.jsonl
    """
    from etsq.runs import export_jobs

    lines = (json.dumps(obj, ensure_ascii=False) + "\n" for obj in export_jobs(_settings().database_url, run))
    if output is None:
        for line in lines:
            click.echo(line, nl=False)
        return
    tmp = output.with_name(output.name + ".part")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(lines)
    tmp.replace(output)  # never leave a half-written export behind


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
    type=click.Choice(HTTP_BACKENDS),
    default=None,
    help="Server kind for runs that name none; checked at start with --policy-url.",
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
def worker(
    gpu: str | None, queue: str | None, concurrency: int | None, loglevel: str, **servers: Any
) -> None:
    """Run a Celery worker that searches queued jobs.

    \b
    Examples:
      etsq worker                                   # embedded default
      etsq worker --gpu 0 --concurrency 8           # queue gpu0, CUDA_VISIBLE_DEVICES=0
      etsq worker --gpu 0 --backend sglang --policy-url http://127.0.0.1:30000 --prm-url http://127.0.0.1:30001
    """
    import os

    from etsq.db.session import ensure_schema

    _serve_from(servers)
    settings = _settings()
    ensure_schema(settings.database_url)
    queue = queue or (f"gpu{gpu}" if gpu is not None else settings.queue)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["ETSQ_GPU"] = gpu
    app, _ = _connect(settings, queue)
    concurrency = concurrency or (8 if servers["policy_url"] else 1)
    pool = "threads" if concurrency > 1 else "solo"
    # A unique node name per worker: control replies (ping, active queues) are keyed by it.
    name = f"etsq-{queue}-{os.getpid()}@%h"
    app.worker_main(
        [
            "worker",
            f"--queues={queue}",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--hostname={name}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--queue", default=None, help="Send every job here [default: spread over live workers' queues]."
)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
def sweep(file: Path, queue: str | None, as_json: bool) -> None:
    """Submit every run of a sweep FILE (YAML grid); existing runs resume instead of repeating.

    \b
    Example sweep.yaml:
      datasets: [gsm8k]
      methods: [ets, rebase]
      widths: [16, 64]
      limit: 50
      params: {lambda_b: [1.0, 2.0]}
    Then: etsq sweep sweep.yaml && etsq status --watch
    """
    from etsq.queue import target_queues
    from etsq.runs import load_problems
    from etsq.sweep import sweep_specs

    settings = _settings()
    specs = sweep_specs(file)
    problems = [load_problems(settings, spec) for spec in specs]  # all validated before any write
    app, _ = _connect(settings)
    queues = target_queues(app, queue, settings.queue)
    rows = []
    for spec, probs in zip(specs, problems, strict=True):
        run_id, created, n = _store_and_enqueue(settings, app, spec, probs, queues)
        rows.append(
            {
                "run_id": run_id,
                "dataset": spec.dataset,
                "method": spec.search.method,
                "width": spec.search.width,
                "created": created,
                "jobs_enqueued": n,
            }
        )
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["run_id", "dataset", "method", "width", "created", "jobs_enqueued"])


@cli.command("resume")
@click.argument("run", type=int)
@click.option("--json", "as_json", is_flag=True)
def resume_cmd(run: int, as_json: bool) -> None:
    """Enqueue a run's unfinished jobs again (after a crash, a reboot, or a flushed Redis).

    Jobs resume from their last committed depth; jobs a live worker holds are left alone.

    \b
    Example:
      etsq resume 3
    """
    from etsq.db.session import ensure_schema
    from etsq.queue import resume
    from etsq.runs import statuses

    settings = _settings()
    ensure_schema(settings.database_url)
    statuses(settings.database_url, [run])  # a clear error for an unknown run
    app, _ = _connect(settings)
    n = resume(app, settings.database_url, run, settings.queue)
    _print_json({"run_id": run, "enqueued": n}) if as_json else click.echo(f"run {run}: {n} jobs enqueued")


@cli.command()
@click.argument("run", type=int)
def cancel(run: int) -> None:
    """Cancel a run: queued jobs are dropped, running ones stop after their current depth.

    \b
    Example:
      etsq cancel 3
    """
    from etsq.runs import cancel_run

    n = cancel_run(_settings().database_url, run)
    click.echo(f"run {run}: {n} jobs cancelled")


def _serve_from(servers: dict[str, Any]) -> None:
    """Check the worker's servers (a one-line error if one is down or the wrong kind), then export
    them as ETSQ_BACKEND/ETSQ_POLICY_URL/ETSQ_PRM_URL for the tasks (prefork children included)."""
    import os

    from etsq.models.servers import check_servers, server_spec

    if not servers["policy_url"]:
        if servers["backend"] or servers["prm_url"]:
            raise CliError("--backend and --prm-url need --policy-url")
        return
    if not servers["backend"]:
        raise CliError("--policy-url needs --backend sglang or --backend openai")
    models = {"backend": servers["backend"], "prm_family": servers["prm_family"]}
    spec = server_spec(models, servers)
    for line in check_servers(spec):
        click.echo(f"etsq worker: {line}", err=True)
    os.environ.update(ETSQ_BACKEND=spec.backend, ETSQ_POLICY_URL=spec.policy_url, ETSQ_PRM_URL=spec.prm_url)


@cli.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply schema migrations (other commands do this themselves)."""
    from etsq.db.session import current_revision, upgrade

    url = _settings().database_url
    upgrade(url, revision)
    click.echo(f"database at revision {current_revision(url)}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"etsq: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except EtsqError as exc:
        click.echo(f"etsq: error: {exc}", err=True)
        sys.exit(2)
    except SQLAlchemyError as exc:
        click.echo(f"etsq: database error: {str(exc).splitlines()[0]}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
