"""Result commands: `aggregate` (the results table), `compare`, `report`, `tree`, `export`, `import`.

Each one parses its options, calls one function of `etsq` and prints what it returns.
"""

from __future__ import annotations

from pathlib import Path

import click

from cli.app import open_store, pass_settings, print_json, table
from etsq.results.aggregate import AGGS, VOTES
from etsq.results.export import FORMATS
from etsq.results.table import ProblemFilter, RunFilter
from etsq.search.methods import METHODS
from etsq.settings import Settings

_AGG_CHOICES = click.Choice([*AGGS, "all"])
_VOTE_CHOICES = click.Choice([*VOTES, "all"])


@click.command()
@click.argument("runs", nargs=-1, type=int)
@click.option(
    "--agg",
    "aggs",
    type=_AGG_CHOICES,
    multiple=True,
    help="Step aggregation [default: last]; repeatable, 'all'.",
)
@click.option(
    "--vote",
    "votes",
    type=_VOTE_CHOICES,
    multiple=True,
    help="Answer selection [default: weighted]; repeatable, 'all'.",
)
@click.option("--dataset", "datasets", multiple=True, help="Only runs on this dataset; repeatable.")
@click.option("--method", "methods", multiple=True, help="Only runs of this method; repeatable.")
@click.option("--width", "widths", type=int, multiple=True, help="Only runs of this width; repeatable.")
@click.option("--level", "levels", multiple=True, help="Only problems of this level (MATH500); repeatable.")
@click.option(
    "--subject", "subjects", multiple=True, help="Only problems of this subject (MATH500); repeatable."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of rows.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV with every figure.")
@pass_settings
def aggregate(
    settings: Settings,
    runs: tuple[int, ...],
    aggs: tuple[str, ...],
    votes: tuple[str, ...],
    datasets: tuple[str, ...],
    methods: tuple[str, ...],
    widths: tuple[int, ...],
    levels: tuple[str, ...],
    subjects: tuple[str, ...],
    as_json: bool,
    as_csv: bool,
) -> None:
    """The results table, graded offline from stored nodes: per run and step aggregation x vote,
    accuracy, coverage, KV per problem, tokens, calls, time (README "Results" defines each figure).

    Runs still in progress count their finished problems only, and say so.

    \b
    Examples:
      etsq aggregate                                 # every run, last + weighted majority
      etsq aggregate 3 4 --agg prod --agg min --vote majority --json
      etsq aggregate --agg all --vote all --dataset math500 --level 5 --csv > math500_l5.csv
      etsq aggregate --method ets --method rebase --width 16
    """
    from etsq.results.evaluate import evaluate
    from etsq.results.table import partial_notes, short_rows, to_csv
    from etsq.store.labels import sim_note

    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    rows = evaluate(
        open_store(settings),
        list(runs) or None,
        aggs,
        votes,
        RunFilter(datasets=datasets, methods=methods, widths=widths),
        ProblemFilter(levels=levels, subjects=subjects),
    )
    for note in partial_notes(rows):
        click.echo(note, err=True)
    if as_json:
        print_json(rows)
    elif as_csv:
        click.echo(to_csv(rows), nl=False)
    else:
        headers, cells = short_rows(rows)
        table(cells, headers, title=sim_note(rows))


@click.command()
@click.argument("base", type=int)
@click.argument("other", type=int)
@click.option("--agg", type=click.Choice(AGGS), default="last", show_default=True)
@click.option("--vote", type=click.Choice(VOTES), default="weighted", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@pass_settings
def compare(settings: Settings, base: int, other: int, agg: str, vote: str, as_json: bool) -> None:
    """Compare run OTHER against run BASE on the problems both finished: KV, token, call and time
    ratios (OTHER/BASE) and the accuracy difference with a paired bootstrap 95% interval.

    \b
    Examples:
      etsq compare 3 4                       # 3 = REBASE W=16, 4 = ETS W=16
      etsq compare 3 4 --agg prod --vote majority --json
    """
    from etsq.results.compare import compare as compare_runs
    from etsq.results.compare import comparison_lines

    result = compare_runs(open_store(settings), base, other, agg, vote)
    for warning in result["warnings"]:
        click.echo(f"etsq: warning: {warning}", err=True)
    if as_json:
        print_json(result)
    else:
        click.echo("\n".join(comparison_lines(result)))


@click.command()
@click.argument("runs", nargs=-1, type=int)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for index.html and its PNG plots (created if missing).",
)
@click.option("--agg", type=click.Choice(AGGS), default="last", show_default=True, help="For the plots.")
@click.option(
    "--vote", type=click.Choice(VOTES), default="weighted", show_default=True, help="For the plots."
)
@click.option("--dataset", "datasets", multiple=True, help="Only runs on this dataset; repeatable.")
@click.option("--method", "methods", multiple=True, help="Only runs of this method; repeatable.")
@click.option("--width", "widths", type=int, multiple=True, help="Only runs of this width; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the written files as JSON.")
@pass_settings
def report(
    settings: Settings,
    runs: tuple[int, ...],
    out: Path,
    agg: str,
    vote: str,
    datasets: tuple[str, ...],
    methods: tuple[str, ...],
    widths: tuple[int, ...],
    as_json: bool,
) -> None:
    """Write an HTML report of RUNS (default: every run) with PNG plots: accuracy vs width and vs KV,
    ETS's KV / kept fraction / clusters per depth, time per depth; and the results table.

    \b
    Examples:
      etsq report --out report/          # then open report/index.html
      etsq report 3 4 5 6 --out w16 --agg prod
    """
    from etsq.results.report import write_report

    filt = RunFilter(datasets=datasets, methods=methods, widths=widths)
    files = write_report(open_store(settings), list(runs) or None, out, agg, vote, filt)
    if as_json:
        print_json({"index": str(files[0]), "files": [str(f) for f in files]})
    else:
        click.echo(files[0])


@click.command()
@click.argument("run", type=int)
@click.option(
    "--problem",
    required=True,
    help="The problem's id (e.g. gsm8k-0) or its index; `etsq problems RUN` lists both.",
)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The HTML file to write."
)
@pass_settings
def tree(settings: Settings, run: int, problem: str, out: Path) -> None:
    """Write one problem's search tree as an interactive, offline HTML page: collapsible nodes with
    score, kept/pruned, cluster colour and child count, answers marked correct or not, step text on
    click; pan by dragging, zoom with the wheel.

    \b
    Example:
      etsq tree 3 --problem gsm8k-0 --out tree.html
      etsq tree 3 --problem 0 --out tree.html     # the run's first problem
    """
    from etsq.results.tree import write_tree

    write_tree(open_store(settings), run, problem, out)
    click.echo(out)


@click.command()
@click.argument("run", type=int)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl", show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File [default: stdout].",
)
@pass_settings
def export(settings: Settings, run: int, fmt: str, output: Path | None) -> None:
    """Export a run: its trees, one JSON object per problem (jsonl), or the reference
    implementation's JSON list of answers (reference), which its evaluation script reads.

    \b
    Examples:
      etsq export 3 -o run3.jsonl
      etsq export 3 --format reference -o run3_answers.json   # and stats.log beside it
    """
    from etsq.results.export import export_lines, write_atomically

    lines = export_lines(open_store(settings), run, fmt)
    if output is None:
        for line in lines:
            click.echo(line, nl=False)
        if fmt == "reference":
            click.echo()
    else:
        write_atomically(output, lines)
        if fmt == "reference":
            from etsq.results.reference import stats_text
            from etsq.results.reference_runs import reference_stats

            with open_store(settings).session() as s:
                stats = reference_stats(s, run)
            if stats is None:
                click.echo(f"run {run} has no KV, calls or time to write a stats.log from", err=True)
            else:
                target = output.parent / "stats.log"
                write_atomically(target, [stats_text(stats)])
                click.echo(f"wrote {target}", err=True)


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--dataset", required=True, help="Dataset label; gsm8k / math500 share problems with etsq runs."
)
@click.option(
    "--method", type=click.Choice(sorted(METHODS)), required=True, help="The method the file came from."
)
@click.option("--width", type=click.IntRange(min=1), required=True, help="The width W it ran at.")
@click.option(
    "--stats",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The reference's stats.log beside the file.",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"run_id": N}.')
@pass_settings
def import_run(
    settings: Settings, file: Path, dataset: str, method: str, width: int, stats: Path | None, as_json: bool
) -> None:
    """Import the reference implementation's output FILE (its JSON list of answers) as a run; prints
    its id.  Then aggregate, compare and report work on it like on any run.

    \b
    Example:
      etsq import outputs/ets_16_math500.json --dataset math500 --method ets --width 16 \\
          --stats outputs/stats.log
    """
    from etsq.results.reference import ImportSpec
    from etsq.results.reference_runs import import_reference

    spec = ImportSpec(file, dataset, method, width, stats)
    run_id, created = import_reference(open_store(settings), spec, settings.data_dir)
    if not created:
        click.echo(
            f"run {run_id} holds this file already (imported with --dataset {dataset} --method {method} "
            f"--width {width})",
            err=True,
        )
    if as_json:
        print_json({"run_id": run_id})
    else:
        click.echo(run_id)


@click.command()
@click.argument("runs", nargs=-1, type=int)
@click.option(
    "--sweep",
    "sweep_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The runs of this sweep file (those stored).",
)
@click.option(
    "--baseline", default="rebase", show_default=True, help="The method the others are paired with."
)
@click.option(
    "--agg", "aggs", type=_AGG_CHOICES, multiple=True, help="Step aggregation [default: last]; 'all'."
)
@click.option(
    "--vote", "votes", type=_VOTE_CHOICES, multiple=True, help="Answer selection [default: weighted]; 'all'."
)
@click.option("--dataset", "datasets", multiple=True, help="Only runs on this dataset; repeatable.")
@click.option(
    "--method", "methods", multiple=True, help="Only runs of this method (and the baseline); repeatable."
)
@click.option("--width", "widths", type=int, multiple=True, help="Only runs of this width; repeatable.")
@click.option(
    "--resamples",
    type=click.IntRange(min=100),
    default=10_000,
    show_default=True,
    help="Bootstrap resamples.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the study as JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print one CSV line per pair and agg x vote.")
@pass_settings
def study(
    settings: Settings,
    runs: tuple[int, ...],
    sweep_file: Path | None,
    baseline: str,
    aggs: tuple[str, ...],
    votes: tuple[str, ...],
    datasets: tuple[str, ...],
    methods: tuple[str, ...],
    widths: tuple[int, ...],
    resamples: int,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Pair the BASELINE method's runs (default rebase) with the other methods' runs at the same width
    and shared settings, and print one row per pair: each run's accuracy and the difference, and the
    OTHER/BASE ratios of KV (before, after, peak), tokens, calls and seconds per problem, each with a
    paired bootstrap 95% interval over the problems both finished.  Runs that cannot be paired are
    named with the reason.  RUNS (default: every run), a --sweep file's runs, or filters.

    \b
    Examples:
      etsq study                                  # every run: ets (and others) against rebase
      etsq study --sweep sweep.yaml --json
      etsq study 1 2 3 4 5 6 --agg all --vote all --csv > study.csv
    """
    from etsq.results.study import study as run_study
    from etsq.results.study import study_table, unpaired_lines
    from etsq.results.table import to_csv
    from etsq.store.labels import sim_note

    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    store = open_store(settings)
    wanted = list(runs)
    if sweep_file is not None:
        from etsq.submit import plan
        from etsq.sweep import sweep_grid

        planned = plan(settings, store, sweep_grid(sweep_file).specs, check_servers=False)
        missing = [p.spec.label for p in planned if p.run_id is None]
        if missing:
            click.echo(f"{len(missing)} runs of {sweep_file} are not stored: {', '.join(missing)}", err=True)
        wanted += [p.run_id for p in planned if p.run_id is not None]
        if not wanted:
            raise click.UsageError(
                f"no run of {sweep_file} is stored yet; run `etsq sweep {sweep_file}` first"
            )
    filt = RunFilter(runs=tuple(wanted), datasets=datasets, methods=methods, widths=widths)
    result = run_study(store, filt, aggs, votes, baseline, resamples)
    for line in unpaired_lines(result):
        click.echo(line, err=True)
    if as_json:
        print_json(result)
    elif as_csv:
        click.echo(to_csv(result["rows"]), nl=False)
    else:
        headers, cells = study_table(result)
        rows = [{"backend": r["base_backend"], "run_id": r["base_run"]} for r in result["rows"]]
        rows += [{"backend": r["other_backend"], "run_id": r["other_run"]} for r in result["rows"]]
        note = sim_note(rows)
        title = f"{', '.join(sorted({r['other_method'] for r in result['rows']}) or '-')} against {baseline}"
        table(cells, headers, title=f"{title} ({note})" if note else title)
        if result["rows"]:
            boot = result["bootstrap"]
            click.echo(
                f"ratios are OTHER/{baseline} means per problem over the problems both finished; "
                f"[95% CI]: paired bootstrap, {boot['resamples']} resamples, seed {boot['seed']}"
            )


@click.command()
@click.argument("run", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@pass_settings
def problems(settings: Settings, run: int, as_json: bool) -> None:
    """List RUN's problems: index and id (either is what `etsq tree --problem` takes), status, and
    whether a finished one's answer (last / weighted) is correct.

    \b
    Example:
      etsq problems 3 && etsq tree 3 --problem gsm8k-0 --out tree.html
    """
    from etsq.results.tree import problem_list

    rows = problem_list(open_store(settings), run)
    if as_json:
        print_json(rows)
    else:
        for row in rows:
            row["outcome"] = {True: "correct", False: "wrong", None: "-"}[row["correct"]]
        table(rows, ["index", "problem", "status", "outcome", "error"])
