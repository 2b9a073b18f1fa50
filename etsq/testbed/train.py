"""Training the testbed's policy and PRM: two tiny `LlamaForCausalLM`s sharing one tokenizer.

The policy learns `Q: <question>\\nA:\\n` -> the solution steps (loss on the solution tokens only).
The PRM is read by etsq's `likelihood` family: a step's score is the probability of the least
likely solution token so far.  It starts from the trained policy's weights and is fine-tuned on
solutions the verifier labelled: the policy's own samples at temperature 1.0 on training problems
(the errors it really makes), plus correct solutions with one corrupted step (a wrong result,
operand, sign or copied value) and the steps after it continued from the wrong value.  Tokens of
correct steps are made likely (cross-entropy, as for the policy); the first wrong token of the
first wrong step is made unlikely (unlikelihood, -log(1 - p), weighted 0.1).

Why not a label-token PRM: a 0.8M-parameter Math-Shepherd-format PRM, trained on the same
labels, learned the base rate of errors by depth and not their content (step AUC 0.66 at the
first error), while the policy's own token probabilities separate right from wrong steps at 0.99:
checking the step's operand against the question is the lookup the policy already does.

Everything is seeded (torch, Python's `random`, fixed thread count, deterministic algorithms), so a
configuration and seed give the same weights on the same machine and library versions.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from etsq.testbed import arith
from etsq.testbed.tokenizer import MAX_LENGTH, prompt

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    """Model shape and training budget of both models."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4  # head_dim 32: vLLM's CPU attention wants multiples of 32
    intermediate: int = 384
    policy_steps: int = 900
    policy_batch: int = 64
    policy_lr: float = 3e-3
    prm_problems: int = 600  # training problems the policy samples solutions of for the PRM
    prm_samples: int = 4  # samples per problem
    prm_steps: int = 300
    prm_batch: int = 64
    prm_lr: float = 3e-4
    prm_unlikelihood: float = 0.1  # the weight of the unlikelihood term
    warmup: int = 50
    threads: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT = TrainConfig()
SMALL = TrainConfig(
    hidden=64, layers=1, heads=2, intermediate=128, policy_steps=30, policy_batch=16,
    prm_problems=16, prm_samples=2, prm_steps=20, prm_batch=16, warmup=5,
)  # fmt: skip


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def new_model(cfg: TrainConfig, tokenizer: Any) -> Any:
    """A randomly initialised Llama shaped by `cfg` (seed torch first)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pad_right(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


# --------------------------------------------------------------------------- policy


def policy_example(tokenizer: Any, problem: arith.Problem) -> tuple[list[int], list[int]]:
    """Token ids of prompt + solution + EOS, and labels (-100 on the prompt)."""
    head = tokenizer.encode(prompt(problem.question), add_special_tokens=False)
    body = tokenizer.encode(arith.solution_text(problem.steps), add_special_tokens=False)
    body.append(tokenizer.eos_token_id)
    return head + body, [-100] * len(head) + body


def policy_batches(tokenizer: Any, stream: Iterator[arith.Problem], size: int) -> Iterator[dict[str, Any]]:
    """Batches of `size` fresh training problems, right-padded.

    (Sorting runs of batches by length wastes less compute on padding, but measured slower to learn.)
    """
    while True:
        examples = [policy_example(tokenizer, next(stream)) for _ in range(size)]
        yield {
            "input_ids": pad_right([e[0] for e in examples], tokenizer.pad_token_id),
            "attention_mask": pad_right([[1] * len(e[0]) for e in examples], 0),
            "labels": pad_right([e[1] for e in examples], -100),
        }


def lm_loss(model: Any, batch: dict[str, Any]) -> Any:
    return model(**batch).loss


def train_loop(
    model: Any,
    batches: Iterator[dict[str, Any]],
    loss_fn: Callable[[Any, dict[str, Any]], Any],
    steps: int,
    peak_lr: float,
    warmup: int,
    progress: Progress,
    name: str,
    hook: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW over `steps` batches; the losses per step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01, betas=(0.9, 0.98))
    losses: list[float] = []
    started = time.monotonic()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup)
        loss = loss_fn(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if hook is not None:
            hook(step)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            progress(f"{name} step {step + 1}/{steps} loss {recent:.4f} ({time.monotonic() - started:.0f}s)")
    model.eval()
    return losses


def train_policy(
    cfg: TrainConfig, tokenizer: Any, seed: int, progress: Progress, hook: Callable[[int], None] | None = None
) -> Any:
    model = new_model(cfg, tokenizer)
    batches = policy_batches(tokenizer, arith.train_stream(seed), cfg.policy_batch)
    train_loop(model, batches, lm_loss, cfg.policy_steps, cfg.policy_lr, cfg.warmup, progress, "policy", hook)
    return model


# --------------------------------------------------------------------------- sampling


def sample_solutions(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    temperature: float = 1.0,
    seed: int = 0,
    batch: int = 512,
) -> list[list[str]]:
    """One sampled solution per question (whole trajectories), split into steps at the delimiter.

    Sampling the whole solution at once draws from the same distribution as etsq sampling it step
    by step (the delimiter is one token, so the prefix tokenizes the same either way).
    """
    generator = torch.Generator().manual_seed(seed)
    out: list[list[str]] = []
    for start in range(0, len(questions), batch):
        rows = sample_tokens(
            model, tokenizer, [prompt(q) for q in questions[start : start + batch]], temperature, generator
        )
        out.extend(split_steps(tokenizer.decode(row, skip_special_tokens=True)) for row in rows)
    return out


def sample_tokens(
    model: Any, tokenizer: Any, texts: list[str], temperature: float, generator: torch.Generator
) -> list[list[int]]:
    """Generated token ids per text (up to EOS), with a KV cache and left padding."""
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    done = torch.zeros(len(texts), dtype=torch.bool)
    generated: list[torch.Tensor] = []
    with torch.inference_mode():
        result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for _ in range((arith.MAX_OPS + 1) * 8):
            logits = result.logits[:, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(-1)
            token = torch.where(done, tokenizer.pad_token_id, token)
            generated.append(token)
            done |= token == tokenizer.eos_token_id
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(len(texts), 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            result = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=result.past_key_values,
                use_cache=True,
            )
    table = torch.stack(generated, dim=1).tolist()
    return [[t for t in row if t != tokenizer.pad_token_id] for row in table]


def split_steps(text: str) -> list[str]:
    """A trajectory's steps: cut after each delimiter; a non-empty unterminated tail is one more."""
    parts = text.split(arith.STEP_DELIMITER)
    steps = [p for p in parts[:-1]]
    if parts[-1].strip():
        steps.append(parts[-1])
    return [s for s in steps if s.strip()] or [text]


# --------------------------------------------------------------------------- PRM


def corrupt(problem: arith.Problem, rng: random.Random) -> list[str]:
    """The problem's solution with one step made wrong and the later steps continued from it."""
    k = rng.randrange(len(problem.ops))
    values = problem.values
    kind = rng.choice(["result", "operand", "sign", "copy"])
    a, op = values[k], problem.ops[k]
    if kind == "copy":
        a = max(0, a + rng.choice([-3, -2, -1, 1, 2, 3]))
    elif kind == "operand":
        op = arith.Op(op.sign, rng.choice([b for b in range(1, arith.MAX_OPERAND + 1) if b != op.operand]))
    elif kind == "sign":
        op = arith.Op("-" if op.sign == "+" else "+", op.operand)
    c = op.apply(a)
    if kind == "result" or c < 0 or (a, op) == (values[k], problem.ops[k]):
        c = max(0, values[k + 1] + rng.choice([-3, -2, -1, 1, 2, 3]))
        if c == values[k + 1]:
            c += 1
    steps = [*problem.steps[:k], f"{a}{op.sign}{op.operand}={c}"]
    for later in problem.ops[k + 1 :]:
        nxt = max(0, later.apply(c))
        steps.append(f"{c}{later.sign}{later.operand}={nxt}")
        c = nxt
    steps[-1] += f"{arith.ANSWER_PHRASE}{c}}}"
    return steps


@dataclass(frozen=True)
class Labelled:
    """A question, a solution's steps and the verifier's label of each step."""

    question: str
    steps: list[str]
    labels: list[bool]


def prm_examples(
    cfg: TrainConfig, policy: Any, tokenizer: Any, seed: int, progress: Progress
) -> list[Labelled]:
    """Policy samples on fresh training problems, labelled, plus one corrupted solution per problem."""
    stream = arith.train_stream(seed + 7919)
    problems = [next(stream) for _ in range(cfg.prm_problems)]
    questions = [p.question for p in problems for _ in range(cfg.prm_samples)]
    started = time.monotonic()
    samples = sample_solutions(policy, tokenizer, questions)
    rng = random.Random(seed)
    examples = [Labelled(q, s, arith.verify_steps(q, s)) for q, s in zip(questions, samples, strict=True)]
    examples += [
        Labelled(p.question, steps, arith.verify_steps(p, steps))
        for p in problems
        for steps in [corrupt(p, rng)]
    ]
    good = sum(sum(e.labels) for e in examples)
    total = sum(len(e.labels) for e in examples)
    seconds = time.monotonic() - started
    progress(f"prm data: {len(examples)} solutions, {good}/{total} correct steps ({seconds:.0f}s)")
    return examples


def step_ids(tokenizer: Any, step: str) -> list[int]:
    """A step's token ids as the search sends it: the text, then the step delimiter."""
    text = step if step.endswith(arith.STEP_DELIMITER) else step + arith.STEP_DELIMITER
    return list(tokenizer.encode(text, add_special_tokens=False))


def first_difference(actual: Sequence[int], expected: Sequence[int]) -> int | None:
    """The index of the first token of `actual` that departs from `expected` (None: none does)."""
    for i, token in enumerate(actual):
        if i >= len(expected) or token != expected[i]:
            return i
    return None


def prm_encode(tokenizer: Any, example: Labelled) -> tuple[list[int], list[int], list[int]]:
    """Token ids of prompt + steps, the tokens to make likely, and the one token to make unlikely.

    Correct steps are targets as in the policy's training (an EOS after the last one).  In the
    first wrong step the tokens before its first wrong one are targets too; that token is the
    unlikely target, and the text ends there (what follows is conditioned on a mistake).
    """
    problem = arith.parse_question(example.question)
    assert problem is not None, example.question
    ids: list[int] = tokenizer.encode(prompt(example.question), add_special_tokens=False)
    likely, unlikely = [-100] * len(ids), [-100] * len(ids)
    for k, (step, label) in enumerate(zip(example.steps, example.labels, strict=True)):
        piece = step_ids(tokenizer, step)
        expected = step_ids(tokenizer, problem.steps[k]) if k < len(problem.ops) else []
        wrong = None if label else first_difference(piece, expected)
        if wrong is None and not label:
            break  # a wrong step whose tokens all match is cut short: no token to blame
        keep = piece if wrong is None else piece[: wrong + 1]
        ids += keep
        likely += keep if wrong is None else [*keep[:-1], -100]
        unlikely += [-100] * len(keep) if wrong is None else [-100] * wrong + [keep[-1]]
        if wrong is not None:
            return ids, likely, unlikely
    if all(example.labels) and len(example.steps) == len(problem.ops):
        ids.append(tokenizer.eos_token_id)
        likely.append(tokenizer.eos_token_id)
        unlikely.append(-100)
    return ids, likely, unlikely


def prm_batches(tokenizer: Any, examples: list[Labelled], size: int, seed: int) -> Iterator[dict[str, Any]]:
    encoded = [prm_encode(tokenizer, e) for e in examples]
    rng = random.Random(seed)
    while True:  # epochs: shuffled, then length-sorted within runs of 8 batches
        order = list(range(len(encoded)))
        rng.shuffle(order)
        usable = len(order) - len(order) % size
        for run in range(0, usable, size * 8):
            ordered = sorted(order[run : min(run + size * 8, usable)], key=lambda i: len(encoded[i][0]))
            yield from _prm_batch(tokenizer, [encoded[i] for i in ordered], size)


def _prm_batch(
    tokenizer: Any, encoded: list[tuple[list[int], list[int], list[int]]], size: int
) -> Iterator[dict[str, Any]]:
    for start in range(0, len(encoded), size):
        rows = encoded[start : start + size]
        yield {
            "input_ids": pad_right([r[0] for r in rows], tokenizer.pad_token_id),
            "attention_mask": pad_right([[1] * len(r[0]) for r in rows], 0),
            "likely": pad_right([r[1] for r in rows], -100),
            "unlikely": pad_right([r[2] for r in rows], -100),
        }


def prm_loss_fn(unlikelihood: float) -> Callable[[Any, dict[str, Any]], Any]:
    """Token cross-entropy on the likely targets plus `unlikelihood` x -log(1 - p) on the unlikely ones.

    The cross-entropy keeps the PRM's probabilities those of a policy (unlikelihood alone measured a
    held-out step AUC of 0.73, against 0.98); a small unlikelihood weight sharpens them.
    """

    def loss(model: Any, batch: dict[str, Any]) -> Any:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        likely, unlikely = batch["likely"][:, 1:], batch["unlikely"][:, 1:]
        total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), likely.flatten(), ignore_index=-100)
        wrong = unlikely != -100
        if bool(wrong.any()):
            logp = torch.log_softmax(logits[wrong].float(), dim=-1).gather(-1, unlikely[wrong][:, None])
            total = total - unlikelihood * torch.log1p(-logp.exp().clamp(max=1 - 1e-6)).mean()
        return total

    return loss


def likelihood_step_scores(
    model: Any, tokenizer: Any, examples: Sequence[Labelled], batch: int = 256
) -> list[list[float]]:
    """Per step, the `likelihood` family's score: the probability of the least likely solution
    token up to the end of that step (one forward pass per solution)."""
    scores: list[list[float]] = []
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        heads = [tokenizer.encode(prompt(e.question), add_special_tokens=False) for e in chunk]
        pieces = [[step_ids(tokenizer, step) for step in e.steps] for e in chunk]
        rows = [head + [t for piece in ps for t in piece] for head, ps in zip(heads, pieces, strict=True)]
        ids = pad_right(rows, tokenizer.pad_token_id)
        mask = pad_right([[1] * len(r) for r in rows], 0)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        taken = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0].tolist()
        scores += [_running_min(row, len(head), p) for row, head, p in zip(taken, heads, pieces, strict=True)]
    return scores


def _running_min(logprobs: list[float], head: int, pieces: list[list[int]]) -> list[float]:
    """exp of the lowest token log-probability from the solution's start to each step's end."""
    out, low, at = [], 0.0, head - 1  # logprobs[i] is the log-probability of token i + 1
    for piece in pieces:
        low = min(low, *logprobs[at : at + len(piece)])
        at += len(piece)
        out.append(math.exp(low))
    return out


def train_prm(
    cfg: TrainConfig,
    policy: Any,
    tokenizer: Any,
    seed: int,
    progress: Progress,
    hook: Callable[[int], None] | None = None,
) -> Any:
    examples = prm_examples(cfg, policy, tokenizer, seed, progress)
    model = new_model(cfg, tokenizer)
    model.load_state_dict(policy.state_dict())
    batches = prm_batches(tokenizer, examples, min(cfg.prm_batch, len(examples)), seed)
    loss = prm_loss_fn(cfg.prm_unlikelihood)
    train_loop(model, batches, loss, cfg.prm_steps, cfg.prm_lr, cfg.warmup, progress, "prm", hook)
    return model
