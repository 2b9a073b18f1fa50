"""The reward-head PRM family (Qwen2.5-Math-PRM's shape) in-process, and where it is refused.

Real forward passes on a tiny random `Qwen2ForProcessRewardModel` checkpoint built by
tests/tinymodel.py (a Qwen2 body, a Linear-ReLU-Linear head with two labels, `<extra_0>` in the
tokenizer); vLLM's pooling runner on the same checkpoint is tested in tests/test_vllm.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from etsq.errors import ModelError
from etsq.models.base import ScoreRequest
from etsq.models.prm_families import QWEN_PRM_SEPARATOR, QWEN_PRM_SYSTEM, qwen_prm_text
from etsq.models.registry import load_local_models
from etsq.models.reward_head import LocalRewardPRM, load_reward_prm
from tests.helpers import cli, one_error_line, run_recorded, tiny_config
from tests.services import HttpServiceHandle
from tests.tinymodel import build_tiny_prm

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
REQUESTS = [
    ScoreRequest(QUESTION, ("3 + 4 = 7.\n\n",)),
    ScoreRequest(QUESTION, ("3 + 4 = 7.\n\n", "The answer is: \\boxed{7}")),
    ScoreRequest(QUESTION, ("3 * 4 = 12.\n\n",)),
    ScoreRequest("What is 144 divided by 12? " * 4, ("144 / 12 = 12.\n\n", "So 12.\n\n", "The answer is 12")),
]


@pytest.fixture(scope="module")
def tiny_prm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_prm(tmp_path_factory.mktemp("models") / "tiny-qwen-prm")


@pytest.fixture(scope="module")
def prm(tiny_prm: Path) -> LocalRewardPRM:
    return load_reward_prm(str(tiny_prm), "qwen-prm")


def test_the_text_is_the_model_cards_conversation_up_to_the_newest_separator(prm: LocalRewardPRM) -> None:
    text = qwen_prm_text(prm.loaded.tokenizer, REQUESTS[1])
    assert text == (
        f"<|im_start|>system\n{QWEN_PRM_SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n3 + 4 = 7.<extra_0>The answer is: \\boxed{7}<extra_0>"
    )
    ids = prm.loaded.tokenizer.encode(text, add_special_tokens=False)
    separator = prm.loaded.tokenizer.convert_tokens_to_ids(QWEN_PRM_SEPARATOR)
    assert ids[-1] == separator and ids.count(separator) == 2  # one per step, the newest last


def test_scores_are_the_heads_label_1_and_batching_changes_nothing(prm: LocalRewardPRM) -> None:
    narrow = LocalRewardPRM(prm.loaded, "qwen-prm", max_rows=3)  # two chunks, with left padding
    batched = narrow.score(REQUESTS)
    assert batched == pytest.approx([prm.score([r])[0] for r in REQUESTS], abs=1e-5)
    assert all(0.0 < s < 1.0 for s in batched) and len({round(s, 4) for s in batched}) == len(REQUESTS)
    assert prm.info.details["family"] == "qwen-prm" and prm.info.backend == "transformers"


def test_a_checkpoint_without_a_reward_head_is_refused(tiny_model: Path) -> None:
    with pytest.raises(ModelError, match=r"no process reward head \(missing score\.0\.bias"):
        load_reward_prm(str(tiny_model), "qwen-prm")


def test_the_local_backend_searches_with_the_reward_head(tiny_model: Path, tiny_prm: Path) -> None:
    from etsq.search.loop import Searcher
    from etsq.search.methods import get_method

    policy, reward = load_local_models(str(tiny_model), str(tiny_prm), Path("/nonexistent"), "qwen-prm")
    assert isinstance(reward, LocalRewardPRM)
    cfg = tiny_config("rebase", width=4)
    searcher = Searcher("What is 2 + 3?", "test/0", policy, reward, cfg, get_method(cfg.method).select)
    tree, records = run_recorded(searcher)
    assert records[-1].final and len(tree.nodes) > 4
    assert all(n.score is not None and 0.0 < n.score < 1.0 for n in tree.nodes[1:])


def test_sglang_refuses_a_reward_head_family_with_one_line(sglang_server: HttpServiceHandle) -> None:
    line = one_error_line(
        cli("worker", "--backend", "sglang", "--policy-url", sglang_server.url, "--prm-family", "qwen-prm")
    )
    assert "SGLang cannot serve the reward-head PRM family 'qwen-prm'" in line, line
