"""Measuring the testbed models: single-sample accuracy, coverage@k and the PRM's step AUC.

On the first N problems of the test split the policy samples k solutions each at temperature 1.0
(in-process, transformers).  Accuracy is the mean correctness over all samples (an unbiased
single-sample estimate); coverage@k' (at least one correct of k' samples) uses the unbiased
estimator 1 - C(n-c, k')/C(n, k') for every k' <= k.  A solution is correct when the verifier
accepts all its steps and it has one step per operation (so its boxed answer is right).

The PRM scores every step of the first `prm_samples` solutions per problem (held-out problems, the
policy's own errors) as etsq's `likelihood` family reads it.  Two AUCs: over all steps, and over
the steps whose earlier steps are all correct (the decision a search faces:
is this new step the first mistake?).

`python -m etsq.testbed.evaluate [--problems N] [--samples K] [--home DIR]` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from etsq.testbed import arith
from etsq.testbed.build import TestbedPaths, testbed_paths


@dataclass(frozen=True)
class Figures:
    """What `evaluate` measured, on how many problems and samples."""

    problems: int
    samples: int
    accuracy: float
    coverage: dict[int, float]
    prm_auc: float
    prm_auc_first_error: float
    prm_steps: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def solved(problem: arith.Problem, steps: Sequence[str]) -> bool:
    return len(steps) == len(problem.ops) and all(arith.verify_steps(problem, steps))


def coverage_at(n: int, correct: int, k: int) -> float:
    """Unbiased P(at least one of k samples is correct) from `correct` of `n` samples."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (ties count half); NaN without both classes."""
    from scipy.stats import rankdata

    pos = sum(labels)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    rank_sum = sum(r for r, label in zip(ranks, labels, strict=True) if label)
    return float((rank_sum - pos * (pos + 1) / 2) / (pos * neg))


def load(path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, tokenizer


def evaluate(
    paths: TestbedPaths, problems: int = 200, samples: int = 64, prm_samples: int = 4, seed: int = 0
) -> Figures:
    from etsq.testbed.train import Labelled, likelihood_step_scores, sample_solutions

    started = time.monotonic()
    policy, tokenizer = load(paths.policy)
    test = arith.heldout_problems(problems)
    questions = [p.question for p in test for _ in range(samples)]
    solutions = sample_solutions(policy, tokenizer, questions, temperature=1.0, seed=seed)
    correct = [sum(solved(p, solutions[i * samples + j]) for j in range(samples)) for i, p in enumerate(test)]
    ks = [k for k in (1, 4, 16, 64, 256) if k <= samples]
    coverage = {k: sum(coverage_at(samples, c, k) for c in correct) / problems for k in ks}
    prm, prm_tokenizer = load(paths.prm)
    labelled = [
        Labelled(p.question, steps, arith.verify_steps(p, steps))
        for i, p in enumerate(test)
        for steps in solutions[i * samples : i * samples + min(prm_samples, samples)]
    ]
    scores = likelihood_step_scores(prm, prm_tokenizer, labelled)
    flat = [
        (s, label, all(e.labels[:k]))
        for e, row in zip(labelled, scores, strict=True)
        for k, (s, label) in enumerate(zip(row, e.labels, strict=True))
    ]
    first = [(s, label) for s, label, clean in flat if clean]
    return Figures(
        problems=problems,
        samples=samples,
        accuracy=sum(correct) / (problems * samples),
        coverage=coverage,
        prm_auc=auc([f[0] for f in flat], [f[1] for f in flat]),
        prm_auc_first_error=auc([f[0] for f in first], [f[1] for f in first]),
        prm_steps=len(flat),
        seconds=round(time.monotonic() - started, 1),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Measure the testbed policy and PRM on the arith test split."
    )
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--prm-samples", type=int, default=4)
    parser.add_argument("--home", type=Path, help="where `etsq testbed build` put it (default: ETSQ_HOME)")
    parser.add_argument("--root", type=Path, help="a build directory (default: the shipped/built default)")
    args = parser.parse_args(argv)
    if args.root:
        paths = TestbedPaths(args.root)
    else:
        from etsq.settings import Settings

        paths = testbed_paths(args.home or Settings.from_env().home)
    figures = evaluate(paths, args.problems, args.samples, args.prm_samples)
    print(json.dumps({"build": str(paths.root), **figures.to_dict()}, indent=2))


if __name__ == "__main__":
    main()
