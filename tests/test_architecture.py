"""The seams between modules: no import cycle, settings read in one place, a side-effect-free app."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from etsq.settings import SETTINGS_FIELDS, VARIABLES, Settings, SettingsError, markdown_table

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("etsq", "cli", "workers")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(tree: ast.AST, module: str, known: set[str]) -> Iterator[str]:
    """Every project module imported anywhere in `tree`, at module level or inside functions.

    `from pkg import mod` is an edge to pkg.mod; `from pkg import name` to pkg.  The package a
    submodule sits in, which Python initialises first, is not counted as an edge.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            yield from submodules or ([base] if base in known else [])


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {
        name: set(_imports(ast.parse(path.read_text()), name, known)) - {name}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_at_module_level_or_in_functions() -> None:
    graph = _graph()
    assert len(graph) > 40, "the walk found the project's modules"
    assert "etsq.celery_app" in graph["workers.app"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


_ENV_READ = re.compile(r"os\.(environ|getenv)\b[^\n]*ETSQ_")


def test_no_etsq_variable_is_read_outside_the_settings_module() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in _modules().values()
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
