"""CLI fuzzing: generated argument lists and sweep files for every command.

Every invocation must end with exit status 0 or 2, never a traceback; a refused one (2) prints one
`etsq: error:` line and writes nothing (no run or problem rows, no half-written file, no embedded
broker).  The broker is unreachable, so nothing long-running starts: a submit or worker that gets
past every check stops at the broker with exit 2, which is how `worker`'s option parsing is fuzzed
without its success path, which would block.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cli.main import cli
from etsq.store.session import get_engine, upgrade

UNREACHABLE = "redis://127.0.0.1:1/0"
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples in every CI run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Values a careless or unlucky user types: numbers at and past every edge, words, blanks, unicode.
WEIRD = st.sampled_from(
    ["0", "-1", "1", "2", "4", "4.7", "nan", "-nan", "inf", "-inf", "1e309", "1e-320", "99999999999999999999",
     "2147483648", "65537", "", " ", "true", "null", "[]", "{}", "x", "-", "--", "é", "∞", "0x10", "1_000",
     "http://127.0.0.1:1", "not a url", "ftp://h", "http://h:99999", "a,b", "../..", "/proc/x", "gsm8k"]
)  # fmt: skip
NUMBERS = st.one_of(WEIRD, st.integers(-(2**70), 2**70).map(str), st.floats().map(str))
FREE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
VALUE = st.one_of(WEIRD, NUMBERS, FREE_TEXT)

SUBMIT_OPTIONS = [
    "--method", "--width", "--limit", "--seed", "--temperature", "--softmax-temp", "--max-step-tokens",
    "--max-tokens", "--max-depth", "--lambda-b", "--lambda-s", "--cost", "--cluster-threshold", "--beam-k",
    "--dvts-subtrees", "--backend", "--policy-url", "--prm-url", "--prm-api", "--sim-latency",
    "--sim-answer-every", "--policy-model", "--prm-model", "--prm-family", "--embedding-model", "--queue",
]  # fmt: skip
SUBMIT_FLAGS = ["--wait", "--json", "--no-check-servers"]
CHOICES = {
    "--method": ["ets", "rebase", "beam", "dvts", "bon"],
    "--backend": ["local", "sim", "openai", "sglang"],
    "--cost": ["uniform", "tokens"],
    "--prm-api": ["logprob", "fork"],
    "--prm-family": ["judge", "math-shepherd", "rlhflow"],
}
WORKER_OPTIONS = [
    "--gpu",
    "--queue",
    "--concurrency",
    "--loglevel",
    "--backend",
    "--policy-url",
    "--prm-url",
    "--prm-family",
]
DATASETS = st.sampled_from(
    ["gsm8k", "GSM8K", "math500", "nosuch", "{tmp}/good.jsonl", "{tmp}/bad.jsonl", "{tmp}/missing.jsonl",
     "{tmp}", "", "-", "x.json"]
)  # fmt: skip
RUN_IDS = st.one_of(
    st.sampled_from(["1", "0", "-1", "999", "abc", "1.5", ""]), st.integers(-5, 2**40).map(str)
)


def _option_value(option: str) -> st.SearchStrategy[str]:
    if option in CHOICES:
        return st.one_of(st.sampled_from(CHOICES[option]), VALUE)
    return VALUE


def _options(names: list[str], flags: list[str] = ()) -> st.SearchStrategy[list[str]]:  # type: ignore[assignment]
    pair = st.sampled_from(names).flatmap(lambda name: _option_value(name).map(lambda v: [name, v]))
    flag = st.sampled_from(list(flags)).map(lambda f: [f]) if flags else st.nothing()
    return st.lists(st.one_of(pair, flag), max_size=6).map(lambda parts: [a for part in parts for a in part])


SWEEP_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70000),
    st.floats(allow_nan=True),
    st.sampled_from(WEIRD.elements),
)
SWEEP_VALUE = st.one_of(SWEEP_SCALAR, st.lists(SWEEP_SCALAR, max_size=3))
SWEEP_KEYS = ["datasets", "methods", "widths", "limit", "seeds", "params", "models", "bogus"]
PARAM_KEYS = [
    "lambda_b",
    "lambda_s",
    "beam_k",
    "dvts_subtrees",
    "softmax_temp",
    "temperature",
    "max_depth",
    "cost",
    "nope",
]
MODEL_KEYS = ["backend", "policy", "prm_family", "policy_url", "sim_latency_s", "sim_answer_every", "colour"]
SWEEPS = st.one_of(
    st.fixed_dictionaries(
        {
            "datasets": st.one_of(
                st.just(["gsm8k"]), st.lists(st.sampled_from(["gsm8k", "MATH500", "nosuch", 3]), max_size=2)
            ),
            "methods": st.one_of(
                st.just(["bon"]),
                st.lists(st.sampled_from(["ets", "beam", "dvts", "magic", None]), max_size=2),
            ),
            "widths": st.one_of(st.just([2]), SWEEP_VALUE),
        },
        optional={
            "limit": SWEEP_SCALAR,
            "seeds": SWEEP_VALUE,
            "params": st.one_of(
                st.dictionaries(st.sampled_from(PARAM_KEYS), SWEEP_VALUE, max_size=3), SWEEP_VALUE
            ),
            "models": st.one_of(
                st.dictionaries(st.sampled_from(MODEL_KEYS), SWEEP_SCALAR, max_size=3),
                st.just({"backend": "sim"}),
            ),
        },
    ).map(lambda d: yaml.safe_dump(d).encode()),
    st.dictionaries(st.sampled_from(SWEEP_KEYS), SWEEP_VALUE, max_size=4).map(
        lambda d: yaml.safe_dump(d).encode()
    ),
    st.binary(max_size=40),
    st.sampled_from([b"datasets: [gsm8k\n", b"- a\n", b"\xff\xfe", b"a: &x [*x]\n", b"[" * 5000]),
)


def _command(*parts: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    """A command line made of consecutive parts."""
    return st.tuples(*parts).map(lambda ps: [arg for part in ps for arg in part])


def _words(*words: str) -> st.SearchStrategy[list[str]]:
    return st.just(list(words))


SUBMIT = _command(_words("submit"), DATASETS.map(lambda d: [d]), _options(SUBMIT_OPTIONS, SUBMIT_FLAGS))
SWEEP = _command(
    _words("sweep", "{tmp}/sweep.yaml"), _options(["--queue"], ["--dry-run", "--json", "--no-check-servers"])
)
WORKER = _command(_words("worker"), _options(WORKER_OPTIONS))
ON_RUNS = _command(
    st.sampled_from([["status"], ["cancel"], ["resume"], ["resume", "--wait"], ["aggregate"], ["export"]]),
    st.lists(RUN_IDS, max_size=2),
)
OTHERS = st.one_of(
    _command(_words("status"), st.sampled_from([["--json"], ["--watch"], []])),
    _command(_words("aggregate"), _options(["--agg", "--vote"], ["--json"])),
    _command(
        _words("export", "1", "-o"),
        st.sampled_from([["{tmp}/o.jsonl"], ["{tmp}"], ["/proc/x/y"], ["{tmp}/n/f"]]),
    ),
    _command(_words("db", "upgrade"), _options(["--revision"])),
    st.sampled_from([["broker", "status"], ["broker", "status", "--json"], ["broker", "stop"], ["broker"]]),
    st.sampled_from([["--help"], ["nosuch"], [], ["submit", "--help"]]),  # --debug: tracebacks by design
)
# submit and sweep carry most of the parsing, so they get most of the examples.
COMMANDS = st.sampled_from([SUBMIT] * 4 + [SWEEP] * 3 + [WORKER] * 2 + [ON_RUNS, OTHERS]).flatmap(lambda c: c)


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file, copied for each example (migrating each time would take minutes)."""
    db = tmp_path_factory.mktemp("fuzz-db") / "etsq.db"
    upgrade(f"sqlite:///{db}")
    get_engine(f"sqlite:///{db}").dispose()  # closing the last connection folds the WAL into the file
    return db


@pytest.fixture
def sandbox(migrated_db: Path) -> Iterator[Any]:
    def make() -> tempfile.TemporaryDirectory[str]:
        return tempfile.TemporaryDirectory(prefix="etsq-fuzz-")

    yield make


def _prepare(tmp: Path, migrated_db: Path, sweep: bytes) -> dict[str, str]:
    shutil.copy(migrated_db, tmp / "etsq.db")
    (tmp / "good.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    (tmp / "bad.jsonl").write_bytes(b'{"question": 1}\n\xff\n')
    (tmp / "sweep.yaml").write_bytes(sweep)
    return {
        "ETSQ_HOME": str(tmp / "home"),
        "ETSQ_DATABASE_URL": f"sqlite:///{tmp / 'etsq.db'}",
        "ETSQ_BROKER_URL": UNREACHABLE,
        "ETSQ_QUEUE": "fuzz",
    }


def _check(tmp: Path, args: list[str], exit_code: int, stderr: str, exception: BaseException | None) -> None:
    assert exception is None or isinstance(exception, SystemExit), (args, repr(exception))
    assert exit_code in (0, 2), (args, exit_code, stderr)
    if exit_code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("etsq: error: "), (args, stderr)
        with sqlite3.connect(tmp / "etsq.db") as conn:
            for table in ("runs", "jobs", "problems"):
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), (args, table)
    stray = [p.name for p in tmp.rglob("*") if p.name.endswith((".part", ".tmp"))]
    assert stray == [], (args, stray)
    assert not (tmp / "home" / "redis").exists(), args  # the embedded broker was never wanted


@FUZZ
@given(args=COMMANDS, sweep=SWEEPS)
def test_every_command_exits_0_or_2_and_a_refusal_writes_nothing(
    args: list[str], sweep: bytes, sandbox: Any, migrated_db: Path
) -> None:
    with sandbox() as name:
        tmp = Path(name)
        env = _prepare(tmp, migrated_db, sweep)
        filled = [arg.replace("{tmp}", name) for arg in args]
        try:
            result = CliRunner().invoke(cli, filled, env=env, catch_exceptions=True)
        finally:
            get_engine(env["ETSQ_DATABASE_URL"]).dispose()
        event(f"{filled[0] if filled else '(none)'} -> {result.exit_code}")
        _check(tmp, filled, result.exit_code, result.stderr, result.exception)
