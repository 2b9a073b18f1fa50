"""The report and the tree view in a real headless Chromium (Debian's, driven by Playwright): no
console errors, every plot loaded, a click on a node shows its text, a W=256 tree stays usable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from etsq.models.config import ModelConfig
from etsq.queue.execute import run_job
from etsq.search.config import SearchConfig
from etsq.settings import Settings
from etsq.store import schema as m
from etsq.store.runs import RunSpec, create_run, load_problems
from etsq.store.session import Store, session_scope
from tests.helpers import cli, cli_json, queued_ids
from tests.test_results import sim_run

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: scripts/test.sh installs Debian's chromium (apt-get install chromium)"
        )
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield chromium
        chromium.close()


class Page:
    """A page with every console error and uncaught exception collected."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.errors: list[str] = []
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("requestfailed", lambda req: self.errors.append(f"failed: {req.url}"))
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_load_state("load")

    def drawn(self) -> int:
        return int(self.page.locator("#rendered").get_attribute("data-count") or -1)

    def transform(self) -> dict[str, float]:
        return dict(self.page.evaluate("window.etsqTree.transform"))


def test_the_report_renders_every_plot(browser: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    for method, width in (("rebase", 2), ("rebase", 4), ("ets", 4)):
        sim_run(url, method, width=width, limit=2)
    out = tmp_path / "report"
    files = cli_json("report", "--out", str(out), env={"ETSQ_DATABASE_URL": url})["files"]
    pngs = sorted(Path(f).name for f in files if f.endswith(".png"))
    # ratios, width, KV; per width W=4 (ets + rebase); one ETS run; time of the unpaired rebase W=2
    assert pngs == sorted(["ratio_vs_width.png", "accuracy_vs_width.png", "accuracy_vs_kv.png", "width_4.png",
                           "ets_run3.png", "time_run1.png"])  # fmt: skip
    assert all(Path(f).with_suffix(".csv").exists() for f in files if f.endswith(".png"))
    view = Page(browser, out / "index.html")
    images = view.page.evaluate(
        "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
    )
    assert sorted(src for src, _, _ in images) == pngs
    assert all(complete and width > 0 for _, complete, width in images), images
    assert view.page.locator("table:not(.study) tbody tr").count() == 3
    assert view.page.locator("table.study tbody tr").count() == 1
    # the page answers the study first: the ratio plot is the first image, drawn and not blank
    first = view.page.locator("img").first
    assert first.get_attribute("src") == "ratio_vs_width.png"
    box = first.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 200 and box["y"] < 900
    assert view.page.locator(".note.sim").count() == 1
    assert view.errors == []


def _tree_page(url: str, run_id: int, problem: str, tmp_path: Path) -> Path:
    out = tmp_path / f"tree-{run_id}.html"
    result = cli("tree", str(run_id), "--problem", problem, "--out", str(out), env={"ETSQ_DATABASE_URL": url})
    assert result.exit_code == 0, result.stderr
    return out


def test_a_click_on_a_node_shows_its_text(browser: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    run_id = sim_run(url, "rebase", width=4, limit=1)
    view = Page(browser, _tree_page(url, run_id, "gsm8k-0", tmp_path))
    nodes = view.page.evaluate("window.etsqTree.nodes.map(n => [n.path, n.x])")
    index, (path, text) = next((i, n) for i, n in enumerate(nodes) if n[0].count(".") == 1)
    view.page.locator(f'g.node[data-i="{index}"] circle').click()
    assert view.page.locator("#step-text").text_content() == text
    assert view.page.locator("#panel h2").text_content() == f"node {path}"
    with session_scope(url) as s:
        stored = s.scalar(select(m.Node.text).join(m.Job).where(m.Job.run_id == run_id, m.Node.path == path))
    assert stored == text
    root = view.page.locator('g.node[data-i="0"] circle')
    root.click()
    assert view.page.locator("#panel h2").text_content() == "root (the prompt)"
    assert view.errors == []


@pytest.fixture
def wide_tree(tmp_path: Path) -> tuple[str, int, int]:
    """One GSM8K problem searched by REBASE at W=256 with the sim backend: thousands of nodes."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    search = SearchConfig(method="rebase", width=256, seed=1, max_depth=20)
    spec = RunSpec("gsm8k", search, ModelConfig.create("sim", sim_answer_every=12), limit=1)
    settings = Settings.from_env().with_(database_url=url)
    run_id, _ = create_run(Store.open(url), spec, load_problems(settings, spec), ["etsq"])
    [job_id] = queued_ids(Store.open(url), run_id)
    assert run_job(job_id, settings) == "done"
    with session_scope(url) as s:
        nodes = int(s.scalar(select(func.count()).select_from(m.Node).where(m.Node.job_id == job_id)) or 0)
    return url, run_id, nodes


def test_a_w256_tree_stays_usable(browser: Any, tmp_path: Path, wide_tree: tuple[str, int, int]) -> None:
    url, run_id, total = wide_tree
    assert total > 2000
    view = Page(browser, _tree_page(url, run_id, "gsm8k-0", tmp_path))
    assert 0 < view.drawn() < 60  # the root and the visible part of its 256 children
    assert view.page.locator("g.node").count() == view.drawn()

    started = time.perf_counter()
    view.page.click("#expand")
    expanded_s = time.perf_counter() - started
    assert 0 < view.drawn() < total / 10  # every node laid out, only those in view drawn
    assert view.page.locator("g.node").count() == view.drawn()
    assert expanded_s < 5, expanded_s

    before = view.transform()
    box = view.page.locator("#view").bounding_box()
    assert box is not None
    view.page.mouse.move(box["x"] + 300, box["y"] + 300)
    view.page.mouse.down()
    view.page.mouse.move(box["x"] + 100, box["y"] + 50, steps=5)
    view.page.mouse.up()
    panned = view.transform()
    assert (panned["tx"], panned["ty"]) == (before["tx"] - 200, before["ty"] - 250)
    view.page.mouse.wheel(0, 400)
    view.page.wait_for_timeout(100)
    assert view.transform()["k"] < panned["k"]

    view.page.click("#fit")
    assert view.transform()["k"] < 0.2 and 0 < view.drawn() <= total  # the whole tree in view
    leaf = view.page.evaluate("window.etsqTree.nodes.findIndex(n => n.t)")
    view.page.evaluate(f"window.etsqTree.show({leaf})")
    assert view.page.locator("#step-text").text_content() == view.page.evaluate(
        f"window.etsqTree.nodes[{leaf}].x"
    )
    assert view.errors == []


def test_the_pages_load_nothing_from_elsewhere(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    run_id = sim_run(url, limit=1)
    page = _tree_page(url, run_id, "gsm8k-0", tmp_path).read_text()
    assert "<script src" not in page and "<link" not in page and "://" not in page.split("<script", 1)[0]
