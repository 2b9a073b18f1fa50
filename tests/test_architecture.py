"""The seams between modules: the layers contract, settings read in one place, a side-effect-free app."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from etsq.settings import SETTINGS_FIELDS, VARIABLES, Settings, SettingsError, markdown_table

REPO = Path(__file__).resolve().parent.parent


def _layers() -> list[str]:
    """The import-linter contract's layers (pyproject.toml), each split into its modules."""
    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    return [name.strip() for layer in contract["layers"] for name in layer.split("|")]


def test_the_layers_contract_holds() -> None:
    """The gate runs `lint-imports`; here too, so a plain pytest run catches an upward import."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_every_module_at_the_top_of_etsq_sits_in_a_layer() -> None:
    # A new module outside every layer would be checked by no contract.
    top = {p.stem if p.suffix == ".py" else p.name for p in (REPO / "etsq").iterdir()}
    top = {name for name in top if not name.startswith(("_", ".")) and name not in {"data"}}
    assert top <= {name.removeprefix("etsq.") for name in _layers()}


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The contract bites: a copy of the tree where the search imports the store fails it."""
    for name in ("etsq", "cli", "workers"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    loop = tmp_path / "etsq" / "search" / "loop.py"
    loop.write_text(loop.read_text() + "\n\ndef _upward() -> None:\n    import etsq.store.jobs  # noqa\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 1
    assert "etsq.search.loop -> etsq.store.jobs" in result.stdout


_ENV_READ = re.compile(r"os\.(environ|getenv)\b[^\n]*ETSQ_")


def test_no_etsq_variable_is_read_outside_the_settings_module() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for package in ("etsq", "cli", "workers")
        for path in (REPO / package).rglob("*.py")
        if path.name != "settings.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if _ENV_READ.search(line)
    ]
    assert offenders == []


def test_the_readme_settings_table_lists_every_variable() -> None:
    assert {v.field for v in VARIABLES} == SETTINGS_FIELDS  # every Settings field has its variable
    assert markdown_table() in (REPO / "README.md").read_text()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ETSQ_JOB_TIME_LIMIT", "abc", "ETSQ_JOB_TIME_LIMIT='abc': not a valid integer"),
        ("ETSQ_JOB_TIME_LIMIT", "0", "must be a positive integer"),
        ("ETSQ_HTTP_TIMEOUT", "nan", "must be a positive number of seconds"),
        ("ETSQ_JOB_RETRIES", "-1", "must be an integer >= 0"),
        ("ETSQ_RETRY_BACKOFF_S", "inf", "must be a number of seconds >= 0"),
    ],
)
def test_a_bad_setting_names_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env({name: value})


def test_settings_from_env_and_back(tmp_path: Path) -> None:
    env = {
        "ETSQ_HOME": str(tmp_path),
        "ETSQ_JOB_TIME_LIMIT": "60",
        "ETSQ_HTTP_TIMEOUT": "2.5",
        "ETSQ_QUEUE": "q",
    }
    settings = Settings.from_env(env)
    assert settings.database_url == f"sqlite:///{tmp_path / 'etsq.db'}"
    assert (settings.job_time_limit_s, settings.http_timeout_s, settings.queue) == (60, 2.5, "q")
    assert settings.broker_url is None and settings.uses_embedded_broker
    assert Settings.from_env(settings.as_env()) == settings


def test_importing_the_celery_app_starts_nothing_and_writes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "ETSQ_HOME": str(home)}
    env.pop("ETSQ_BROKER_URL", None)
    code = (
        "import os, glob, workers.app as w\n"
        "assert type(w.app).__name__ == 'EtsqCelery'\n"
        "fds = [os.readlink(f) for f in glob.glob('/proc/self/fd/*') if os.path.islink(f)]\n"
        "kids = ''.join(open(f).read() for f in glob.glob('/proc/self/task/*/children'))\n"
        "print(sum(fd.startswith('socket:') for fd in fds), len(kids.split()))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert not home.exists()  # no database, no embedded Redis directory, no log
    sockets, children = map(int, proc.stdout.split())
    assert (sockets, children) == (0, 0)  # no broker connection, no redis-server or other child
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(home) not in ps  # no embedded redis-server was spawned for this home


# Modules that read or write the database: below the command edge they take a Store or a Session.
# (etsq/queue/broker.py's URLs are the broker's.)
_DATABASE_MODULES = (
    "etsq/store/", "etsq/results/", "etsq/queue/execute.py", "etsq/queue/tasks.py", "etsq/queue/janitor.py",
    "etsq/queue/serve.py", "etsq/queue/messages.py", "etsq/watch.py", "etsq/submit.py", "etsq/sweep.py",
)  # fmt: skip
# The worker entry opens its Store from the Settings it is given (Celery hands a task a job id).
_READS_DATABASE_URL = {
    "etsq/settings.py",
    "etsq/queue/execute.py",
    "etsq/queue/tasks.py",
    "etsq/queue/janitor.py",
}


def _name(node: ast.AST) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def _url_offenders(rel: str, tree: ast.AST) -> list[str]:
    found: list[str] = []
    if not rel.startswith(_DATABASE_MODULES):
        return found
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            found += [f"{rel}:{node.lineno} {node.name}(url)" for a in args if a.arg == "url"]
        if _name(node) in {"session_scope", "get_engine", "upgrade"}:
            found.append(f"{rel}:{node.lineno} uses {_name(node)}")
        if _name(node) == "database_url" and rel not in _READS_DATABASE_URL:
            found.append(f"{rel}:{node.lineno} reads settings.database_url")
    return found


def test_no_function_below_the_command_edge_takes_a_database_url() -> None:
    """Only `etsq/store/session.py` turns a URL into an Engine; the CLI and the worker entry open one
    `Store` per process and pass it (or its sessions) down, so a caller can compose writes."""
    offenders = []
    for path in sorted((REPO / "etsq").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel != "etsq/store/session.py":
            offenders += _url_offenders(rel, ast.parse(path.read_text(encoding="utf-8")))
    assert offenders == []
