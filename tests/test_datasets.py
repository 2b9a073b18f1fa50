"""Tests for etsq.datasets: the shared benchmark files, generic files, errors and downloads."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from etsq import datasets
from etsq.datasets import Problem, dataset_name, load_dataset
from etsq.errors import DatasetError

SHARED_DATA = Path("/work/shared/data")
GSM8K_ROW = {
    "question": "Janet has 3 ducks. How many?",
    "answer": "She has <<3=3>>3 ducks.\n#### 1,003",
}


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving a temporary folder: (base URL, folder)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_shared_math500_loads(tmp_path: Path) -> None:
    problems = load_dataset("math500", SHARED_DATA, tmp_path)
    assert len(problems) == 500
    first = problems[0]
    assert first.question.startswith("Convert the point $(0,3)$ in rectangular coordinates")
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.meta["subject"] == "Precalculus" and first.meta["level"] == 2
    assert len({p.problem_id for p in problems}) == 500


def test_shared_gsm8k_loads(tmp_path: Path) -> None:
    problems = load_dataset("GSM8K", SHARED_DATA, tmp_path)
    assert len(problems) == 1319
    first = problems[0]
    assert first.problem_id == "gsm8k-0"
    assert first.question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first.answer == "18"
    assert first.meta["solution"].endswith("#### 18")
    assert all("," not in p.answer and p.answer for p in problems)


def test_generic_jsonl_with_ids_and_question_field(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"problem": "1+1?", "answer": "2", "id": 7, "source": "hand"}),
            "",
            json.dumps({"question": "2+2?", "answer": "4", "unique_id": "u-4"}),
            json.dumps({"question": "3+3?", "answer": "6"}),
        ],
    )
    problems = load_dataset(str(path), None, tmp_path)
    assert dataset_name(str(path)) == "mine"
    assert problems == [
        Problem("7", "1+1?", "2", {"id": 7, "source": "hand"}),
        Problem("u-4", "2+2?", "4", {"unique_id": "u-4"}),
        Problem("mine-3", "3+3?", "6", {}),
    ]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"problem": "x", "answer": ', "invalid JSON"),
        ('["problem", "answer"]', "expected a JSON object"),
        ('{"answer": "1"}', "missing field 'problem'"),
        ('{"problem": "x"}', "missing field 'answer'"),
        ('{"problem": "x", "answer": 3}', "'answer' must be a string"),
        ('{"problem": "x", "answer": " "}', "'answer' is empty"),
        ('{"problem": "x", "answer": "1", "id": null}', "'id' must be"),
        ('{"problem": "x", "answer": "1", "id": "a"}', "duplicate problem id 'a'"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    good = json.dumps({"problem": "ok", "answer": "1", "id": "a"})
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DatasetError) as info:
        load_dataset(str(path), None, tmp_path)
    assert str(info.value).startswith(f"{path}:2: ")
    assert reason in str(info.value)


def test_gsm8k_row_without_marker_names_file_and_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [json.dumps(GSM8K_ROW), json.dumps({"question": "q", "answer": "no marker"})]
    _write_jsonl(data_dir / "gsm8k_test.jsonl", rows)
    with pytest.raises(DatasetError, match=r"gsm8k_test\.jsonl:2: .*####"):
        load_dataset("gsm8k", data_dir, tmp_path / "cache")


def test_unknown_name_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="known: gsm8k, math500"):
        load_dataset("aime", None, tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(str(tmp_path / "absent.jsonl"), None, tmp_path)


def test_cache_dir_is_used_when_data_dir_lacks_the_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    _write_jsonl(cache / "gsm8k_test.jsonl", [json.dumps(GSM8K_ROW)])
    problems = load_dataset("gsm8k", tmp_path / "empty", cache)
    assert [(p.problem_id, p.answer) for p in problems] == [("gsm8k-0", "1003")]


def test_download_into_cache(
    tmp_path: Path, http_root: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, root = http_root
    _write_jsonl(root / "test.jsonl", [json.dumps(GSM8K_ROW)])
    monkeypatch.setitem(datasets.DOWNLOAD_URLS, "gsm8k", f"{base}/test.jsonl")
    cache = tmp_path / "cache"
    problems = load_dataset("gsm8k", None, cache)
    assert [p.answer for p in problems] == ["1003"]
    assert sorted(f.name for f in cache.iterdir()) == ["gsm8k_test.jsonl"]  # no temp left
    (root / "test.jsonl").unlink()  # the second load must come from the cache
    assert load_dataset("gsm8k", None, cache) == problems


def test_download_failure_is_one_line_naming_etsq_data_dir(
    tmp_path: Path, http_root: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = http_root
    monkeypatch.setitem(datasets.DOWNLOAD_URLS, "math500", f"{base}/missing.jsonl")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as info:
        load_dataset("math500", None, cache)
    message = str(info.value)
    assert "ETSQ_DATA_DIR" in message and "404" in message and "\n" not in message
    assert list(cache.iterdir()) == []


def test_malformed_download_is_not_cached(
    tmp_path: Path, http_root: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, root = http_root
    (root / "page.html").write_text("<html>rate limited</html>\n", encoding="utf-8")
    monkeypatch.setitem(datasets.DOWNLOAD_URLS, "math500", f"{base}/page.html")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=r"malformed.*ETSQ_DATA_DIR"):
        load_dataset("math500", None, cache)
    assert list(cache.iterdir()) == []
