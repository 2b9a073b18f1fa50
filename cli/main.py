"""`etsq`: submit searches, run workers, watch runs, aggregate and export results."""

from __future__ import annotations

import json
import sys
import time
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
    keys = ("method", "width", "seed", "temperature", "softmax_temp", "max_step_tokens", "max_tokens",
            "max_depth", "lambda_b", "lambda_s", "cost")
    return SearchConfig(**{k: opts[k] for k in keys})


def _models(opts: dict[str, Any]) -> dict[str, Any]:
    backend = opts["backend"]
    if backend == "local":
        if opts["policy_url"] or opts["prm_url"]:
            raise CliError("--policy-url/--prm-url need --backend sglang or --backend openai")
        policy = opts["policy_model"] or "smollm2"
        return {
            "backend": "local", "policy": policy, "prm": opts["prm_model"] or policy,
            "prm_family": opts["prm_family"], "embedding": opts["embedding_model"],
        }
    if backend == "openai" and opts["prm_api"] != "logprob":
        raise CliError("--prm-api fork is the SGLang reference fork's; use --backend sglang")
    # Over HTTP the model specs only say where the chat template comes from (None: the server's).
    return {
        "backend": backend, "policy_url": opts["policy_url"],
        "prm_url": opts["prm_url"] or opts["policy_url"],
        "policy": opts["policy_model"], "prm": opts["prm_model"] or opts["policy_model"],
        "prm_family": opts["prm_family"], "prm_api": opts["prm_api"], "embedding": opts["embedding_model"],
    }


@cli.command()
@click.argument("dataset")
@click.option("--method", type=click.Choice(sorted(METHODS)), default="rebase", show_default=True)
@click.option("--width", type=click.IntRange(min=1), default=16, show_default=True, help="Budget W: leaves per problem.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N problems.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Policy sampling temperature.")
@click.option("--softmax-temp", type=float, default=0.2, show_default=True, help="REBASE/ETS weight temperature T.")
@click.option("--max-step-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--max-depth", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("--lambda-b", type=float, default=1.0, show_default=True, help="ETS: KV-cost weight.")
@click.option("--lambda-s", type=float, default=None, help="ETS: coverage weight [default: by width].")
@click.option("--cost", type=click.Choice(["uniform", "tokens"]), default="uniform", show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="local", show_default=True,
              help="Where the models run: in-process, an SGLang server or an OpenAI-compatible server.")
@click.option("--policy-url", default=None, help="Policy server URL (sglang/openai) [default: the worker's].")
@click.option("--prm-url", default=None, help="PRM server URL [default: the policy server].")
@click.option("--prm-api", type=click.Choice(PRM_APIS), default="logprob", show_default=True,
              help="SGLang PRM requests: stock logprobs, or the reference fork's forward_only.")
@click.option("--policy-model", default=None,
              help="local: 'smollm2' [default], a dir or a hub id. Servers: the chat template's tokenizer.")
@click.option("--prm-model", default=None, help="PRM model [default: the policy model].")
@click.option("--prm-family", type=click.Choice(sorted(PRM_FAMILIES)), default="judge", show_default=True)
@click.option("--embedding-model", default=None, help="ETS clusters' sentence-embedding model.")
@click.option("--wait", is_flag=True, help="Wait for the run, starting a local worker if none listens.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
def submit(dataset: str, wait: bool, as_json: bool, limit: int | None, **opts: Any) -> None:
    """Enqueue one search job per problem of DATASET (math500, gsm8k or a .jsonl file).

    \b
    Examples:
      etsq submit math500 --method ets --width 256
      etsq submit gsm8k --method rebase --width 4 --limit 3 --wait
      etsq submit my_problems.jsonl --method bon --width 16
      etsq submit gsm8k --method ets --width 8 --backend openai --policy-url http://gpu0:8000
    """
    from etsq.queue import broker_url, celery_app, enqueue
    from etsq.runs import RunSpec, create_run, delete_run, load_problems

    settings = _settings()
    spec = RunSpec(dataset=dataset, search=_search_config(opts), models=_models(opts), limit=limit)
    problems = load_problems(settings, spec)
    broker = broker_url(settings)
    run_id, job_ids = create_run(settings.database_url, spec, problems)
    app = celery_app(Settings(**{**vars(settings), "broker_url": broker}))
    try:
        enqueue(app, job_ids, settings.queue)
    except EtsqError:
        delete_run(settings.database_url, run_id)
        raise
    if as_json:
        _print_json({"run_id": run_id, "jobs": len(job_ids)})
    else:
        click.echo(run_id)
    if wait:
        _wait(settings, app, broker, run_id)


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
        click.echo(f"run {run_id}: {failed} of {total} problems failed (see `etsq status {run_id}`)", err=True)


@cli.command()
@click.argument("runs", nargs=-1, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of runs.")
def status(runs: tuple[int, ...], as_json: bool) -> None:
    """Show runs: status and problems done/failed/running.

    \b
    Examples:
      etsq status
      etsq status 3 --json
    """
    from etsq.runs import statuses

    rows = statuses(_settings().database_url, list(runs) or None)
    if as_json:
        _print_json(rows)
        return
    cols = ["run_id", "dataset", "method", "width", "status", "problems", "problems_done",
            "problems_failed", "problems_running", "nodes"]
    _table(rows, cols)


@cli.command()
@click.argument("runs", nargs=-1, type=int)
@click.option("--agg", "aggs", type=click.Choice(AGGS), multiple=True, help="Step aggregation [default: last]; repeatable.")
@click.option("--vote", "votes", type=click.Choice(VOTES), multiple=True, help="Answer selection [default: weighted]; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of results.")
def aggregate(runs: tuple[int, ...], aggs: tuple[str, ...], votes: tuple[str, ...], as_json: bool) -> None:
    """Grade runs offline from stored nodes: step aggregation x answer selection.

    \b
    Examples:
      etsq aggregate                            # every run, last + weighted majority
      etsq aggregate 3 4 --agg prod --agg min --vote majority --json
    """
    from etsq.evaluate import evaluate

    rows = evaluate(_settings().database_url, list(runs) or None, list(aggs) or ["last"], list(votes) or ["weighted"])
    if as_json:
        _print_json(rows)
        return
    _table(rows, ["run_id", "dataset", "method", "width", "agg", "vote", "n_problems", "n_correct", "accuracy"])


@cli.command()
@click.argument("run", type=int)
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="File [default: stdout].")
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
@click.option("--queue", default=None, help="Queue to consume [default: ETSQ_QUEUE or 'etsq'].")
@click.option("--pool", type=click.Choice(["solo", "threads", "prefork"]), default="solo", show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--backend", type=click.Choice(HTTP_BACKENDS), default=None,
              help="Server kind for runs that name none; checked at start with --policy-url.")
@click.option("--policy-url", default=None, help="Policy server for runs that name none (checked at start).")
@click.option("--prm-url", default=None, help="PRM server for runs that name none [default: --policy-url].")
@click.option("--prm-family", type=click.Choice(sorted(PRM_FAMILIES)), default="judge", show_default=True,
              help="PRM family whose label tokens the start-up check looks for.")
def worker(queue: str | None, pool: str, concurrency: int, loglevel: str, **servers: Any) -> None:
    """Run a Celery worker that searches queued jobs.

    \b
    Examples:
      ETSQ_BROKER_URL=redis://gpu-box:6379/0 etsq worker --queue gpu0
      etsq worker --backend sglang --policy-url http://127.0.0.1:30000
    """
    from etsq.db.session import ensure_schema
    from etsq.queue import broker_url, celery_app

    _serve_from(servers)
    settings = _settings()
    ensure_schema(settings.database_url)
    broker = broker_url(settings)
    queue = queue or settings.queue
    app = celery_app(Settings(**{**vars(settings), "broker_url": broker, "queue": queue}))
    app.worker_main(["worker", f"--queues={queue}", f"--pool={pool}", f"--concurrency={concurrency}",
                     f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"])


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
