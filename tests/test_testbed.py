"""The testbed (etsq.testbed): generator, verifier, tokenizer, a small build, the shipped models
searched by etsq's own in-process backend."""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path

import pytest

from etsq.datasets import load_dataset
from etsq.testbed import arith
from etsq.testbed import build as tb  # (its testbed_* names would be collected as tests)
from etsq.testbed.build import SMALL, build, build_key, built_paths, shipped_paths, shipped_root
from etsq.testbed.tokenizer import BAD, GOOD, SHEPHERD_TAG, build_tokenizer, prompt
from tests.helpers import cli, one_error_line

# ---------------------------------------------------------------------------- problems


def test_generator_is_seeded_and_splits_are_disjoint() -> None:
    first = [p.question for p in arith.heldout_problems(50)]
    assert first == [p.question for p in arith.heldout_problems(50)]
    stream = arith.train_stream(0)
    train = {next(stream).question for _ in range(5000)}
    assert not train & {p.question for p in arith.heldout_problems()}
    other = arith.train_stream(1)
    assert [next(other).question for _ in range(20)] != [
        next(arith.train_stream(0)).question for _ in range(20)
    ]


def test_problems_stay_in_range_with_distinct_operations() -> None:
    for p in arith.heldout_problems():
        assert arith.MIN_OPS <= len(p.ops) <= arith.MAX_OPS
        assert len(set(p.ops)) == len(p.ops)
        assert all(0 <= v <= arith.MAX_VALUE for v in p.values)
        assert arith.parse_question(p.question) == p


def test_solution_format_fits_etsq() -> None:
    from etsq.answers import extract_answer

    p = arith.heldout_problems(1)[0]
    text = arith.solution_text(p.steps)
    assert text.count(arith.STEP_DELIMITER) == len(p.ops) and text.endswith(arith.STEP_DELIMITER)
    assert extract_answer(text) == str(p.answer)
    assert all(extract_answer(step) is None for step in p.steps[:-1])


def test_verifier_accepts_the_solution_and_flags_broken_steps() -> None:
    p = arith.Problem(17, (arith.Op("+", 3), arith.Op("-", 5), arith.Op("+", 8)))
    good = ["17+3=20", "20-5=15", "15+8=23. The answer is \\boxed{23}"]
    assert p.steps == good and arith.verify_steps(p, good) == [True, True, True]
    assert arith.verify_steps(p.question, good) == [True, True, True]
    assert arith.verify_steps(p, ["17+3=21", "21-5=16", "16+8=24. The answer is \\boxed{24}"]) == [False] * 3
    # a wrong result copied into the next step; the wrong operand; a wrong sign; a premature answer
    assert arith.verify_steps(p, ["17+3=20", "21-5=16"]) == [True, False]
    assert arith.verify_steps(p, ["17+3=20", "20-3=17"]) == [True, False]
    assert arith.verify_steps(p, ["17+3=20", "20+5=25"]) == [True, False]
    assert arith.verify_steps(p, ["17+3=20. The answer is \\boxed{20}"]) == [False]
    assert arith.verify_steps(p, [*good[:2], "15+8=23"]) == [True, True, False]  # no answer stated
    assert arith.verify_steps(p, [*good, "23+1=24"]) == [True, True, True, False]
    assert arith.verify_steps(p, ["seventeen plus three"]) == [False]
    assert arith.verify_steps("not a question", good) == [False] * 3


def test_shipped_test_split_is_the_generators() -> None:
    shipped = Path(str(arith.__file__)).parent.parent / "data" / arith.TEST_FILENAME
    assert shipped.read_text(encoding="utf-8") == arith.heldout_jsonl()
    dataset = load_dataset("arith", None)
    assert len(dataset) == arith.TEST_SIZE and dataset.namespace == "arith"
    assert dataset[3].problem_id == "arith-3" and dataset[3].answer == str(
        arith.heldout_problems(4)[3].answer
    )


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_has_single_token_labels(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    rng = random.Random(3)
    texts = [prompt(p.question) + arith.solution_text(p.steps) for p in arith.heldout_problems(20)]
    texts += ["a  b\n\n\n x=105 -3+-+ ки\n{}\\", "".join(rng.choice("0123456789+-= \n") for _ in range(200))]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert tok(text, add_special_tokens=False)["input_ids"] == ids  # nothing added either way
    for label in (GOOD, BAD, SHEPHERD_TAG, "\n\n"):
        assert len(tok.encode(label, add_special_tokens=False)) == 1
    assert all(len(tok.encode(str(n), add_special_tokens=False)) == 1 for n in range(100))
    assert tok.bos_token and tok.eos_token and tok.pad_token
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "3+4-1"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt("3+4-1")


# ---------------------------------------------------------------------------- building


def test_small_build_trains_caches_and_loads(tmp_path: Path) -> None:
    from etsq.testbed.evaluate import evaluate

    started = time.monotonic()
    paths = build(tmp_path, seed=3, config=SMALL)
    assert time.monotonic() - started < 120  # ~10 s on an idle 2-core box
    assert paths.root == tmp_path / "testbed" / build_key(3, SMALL)
    for part in (paths.policy, paths.prm):
        assert (part / "config.json").is_file() and (part / "tokenizer.json").is_file()
        assert (part / "model.safetensors").is_file()
    assert paths.manifest()["seed"] == 3
    assert [p.name for p in (tmp_path / "testbed").iterdir()] == [paths.key]  # no temporary left
    again = time.monotonic()
    assert build(tmp_path, seed=3, config=SMALL) == paths
    assert time.monotonic() - again < 1
    figures = evaluate(paths, problems=4, samples=2, prm_samples=2)
    assert 0 <= figures.accuracy <= 1 and figures.prm_steps > 0


def test_an_interrupted_build_leaves_no_build(tmp_path: Path) -> None:
    def fail(stage: str) -> None:
        if stage == "policy":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, seed=5, config=SMALL, on_stage=fail)
    assert list((tmp_path / "testbed").iterdir()) == []
    assert not built_paths(tmp_path, 5, SMALL).root.exists()


def test_home_under_a_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(tb.TestbedError, match="cannot"):
        build(tmp_path / "file" / "home", config=SMALL)
    line = one_error_line(cli("testbed", "build", "--small", env={"ETSQ_HOME": str(tmp_path / "file" / "h")}))
    assert "testbed" in line


def test_missing_build_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("etsq.testbed.build.shipped_paths", lambda: None)
    with pytest.raises(tb.TestbedError, match="etsq testbed build"):
        tb.testbed_paths(tmp_path)


# ---------------------------------------------------------------------------- the shipped models


def test_shipped_weights_match_the_training_code() -> None:
    """Changing arith, tokenizer or train changes the hash: rebuild and re-ship
    (`python -m etsq.testbed.build`)."""
    shipped = shipped_paths()
    assert shipped is not None, f"no shipped build {build_key()} in {shipped_root()}: re-ship it"
    assert [p.name for p in shipped_root().iterdir()] == [build_key()]
    size = sum(f.stat().st_size for f in shipped.root.rglob("*") if f.is_file())
    assert size < 8_000_000
    assert tb.testbed_paths(Path("/nonexistent")) == shipped


def test_rebase_searches_an_arith_problem_with_the_shipped_models() -> None:
    from etsq.models.registry import load_local_models
    from etsq.results.grading import is_equivalent
    from etsq.search.config import SearchConfig
    from etsq.search.loop import Searcher
    from etsq.search.methods import get_method

    policy, prm = load_local_models("testbed", "testbed-prm", Path("/nonexistent"), "likelihood")
    problem = load_dataset("arith", None)[0]
    assert policy.format_prompt(problem.question) == prompt(problem.question)
    cfg = SearchConfig(method="rebase", width=8, seed=0, max_step_tokens=16, max_depth=12)
    searcher = Searcher(problem.question, problem.problem_id, policy, prm, cfg, get_method("rebase").select)
    tree = searcher.run(searcher.new_tree(), lambda _tree, _rec: None)
    leaves = [n for n in tree.nodes if n.terminal]
    assert leaves and all(n.score is not None for n in tree.nodes[1:])
    answered = [n for n in leaves if n.answer is not None]
    assert answered
    assert any(is_equivalent(problem.answer, n.answer or "") for n in answered)
    for leaf in answered:  # a trajectory the verifier accepts reaches the gold answer
        steps = [s.removesuffix(arith.STEP_DELIMITER) for s in tree.steps(leaf.idx)]
        if all(arith.verify_steps(problem.question, steps)):
            assert is_equivalent(problem.answer, leaf.answer or "")


def test_etsq_reads_the_shipped_prm_as_it_was_trained() -> None:
    """etsq's likelihood family (LocalLikelihoodPRM: the rendered text, the solution's tokens past
    the prompt) gives, for each newest step, the score the training code computes for that step
    from one pass over the whole solution: the PRM is read as it was trained and measured."""
    import random

    from etsq.models.base import ScoreRequest
    from etsq.models.registry import load_local_models
    from etsq.testbed.evaluate import load
    from etsq.testbed.train import Labelled, corrupt, likelihood_step_scores

    _, prm = load_local_models("testbed", "testbed-prm", Path("/nonexistent"), "likelihood")
    model, tokenizer = load(tb.testbed_paths(Path("/nonexistent")).prm)
    rng = random.Random(0)
    solutions = [
        (p, list(p.steps) if i % 2 else corrupt(p, rng)) for i, p in enumerate(arith.heldout_problems(10))
    ]
    trained = likelihood_step_scores(
        model, tokenizer, [Labelled(p.question, s, arith.verify_steps(p, s)) for p, s in solutions]
    )
    requests = [
        ScoreRequest(p.question, tuple(step + arith.STEP_DELIMITER for step in s[: k + 1]))
        for p, s in solutions
        for k in range(len(s))
    ]
    read = prm.score(requests)
    assert read == pytest.approx([score for row in trained for score in row], abs=2e-3)
    # The score falls at a corrupted step and stays down: a wrong prefix is never scored as right.
    flat = iter(read)
    for p, s in solutions:
        scores, labels = [next(flat) for _ in s], arith.verify_steps(p, s)
        assert all(b <= a + 1e-5 for a, b in itertools.pairwise(scores))  # 1e-5: batch-size noise
        if not all(labels):
            first = labels.index(False)
            assert max(scores[first:]) < min(scores[:first], default=1.0)


def test_the_prm_is_taught_the_first_wrong_token_and_nothing_after_it() -> None:
    from etsq.testbed.train import Labelled, prm_encode, step_ids

    tokenizer = build_tokenizer()
    problem = arith.parse_question("17+3-5+8")
    assert problem is not None
    wrong = ["17+3=20", "20-9=11", "11+8=19"]  # the operand of step 2 is not the question's
    ids, likely, unlikely = prm_encode(
        tokenizer, Labelled(problem.question, wrong, arith.verify_steps(problem, wrong))
    )
    head = len(tokenizer.encode(prompt(problem.question), add_special_tokens=False))
    first = step_ids(tokenizer, wrong[0])
    assert ids[head:] == [*first, *tokenizer.encode("20-9", add_special_tokens=False)]
    assert likely[head:] == [*first, tokenizer.convert_tokens_to_ids("20"), -100]
    assert unlikely[head:] == [-100] * (len(first) + 1) + [tokenizer.convert_tokens_to_ids("-9")]
    right = list(problem.steps)
    ids, likely, unlikely = prm_encode(tokenizer, Labelled(problem.question, right, [True] * 3))
    assert ids[-1] == likely[-1] == tokenizer.eos_token_id and set(unlikely) == {-100}
    assert likely[head:] == ids[head:]
