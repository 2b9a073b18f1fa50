"""Training the testbed's policy and PRM: two tiny `LlamaForCausalLM`s sharing one tokenizer.

The policy learns `Q: <question>\\nA:\\n` -> the solution steps (loss on the solution tokens only).
The PRM starts from the trained policy's weights (it already knows the arithmetic) and learns
Math-Shepherd's format: after each step's tag " ки" the next token is "+" for a correct step and "-"
for a wrong one (a two-way cross-entropy on those two logits at every tag, so one forward pass
trains every step of a solution).  Its training solutions are the policy's own samples at
temperature 1.0 on training problems (the errors it really makes), labelled by the verifier, plus
correct solutions with one corrupted step (a wrong result, operand, sign or copied value) and the
steps after it continued from the wrong value.

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
from etsq.testbed.tokenizer import BAD, GOOD, MAX_LENGTH, SHEPHERD_TAG, prompt

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
    prm_steps: int = 400
    prm_batch: int = 64
    prm_lr: float = 3e-3
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


def shepherd_text(question: str, steps: Sequence[str]) -> str:
    """etsq's math-shepherd PRM text (etsq.models.prm_families.shepherd_text) for these steps."""
    return f"{question} " + "\n".join(f"{step.strip()}{SHEPHERD_TAG}" for step in steps)


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


def prm_encode(tokenizer: Any, example: Labelled) -> tuple[list[int], list[int]]:
    """Token ids of the shepherd text, and per position the label (1 good, 0 bad, -100 elsewhere).

    Encoded piece by piece so that each label sits on its step's own tag, even when a sampled step
    contains the tag text itself; the pre-tokenizer never merges across these pieces, so the ids
    are those of the whole text.
    """
    tag = tokenizer.convert_tokens_to_ids(SHEPHERD_TAG)
    ids: list[int] = tokenizer.encode(f"{example.question} ", add_special_tokens=True)
    targets = [-100] * len(ids)
    for k, (step, label) in enumerate(zip(example.steps, example.labels, strict=True)):
        piece = tokenizer.encode(("\n" if k else "") + step.strip(), add_special_tokens=False)
        ids += [*piece, tag]
        targets += [-100] * len(piece) + [int(label)]
    return ids, targets


def prm_batches(tokenizer: Any, examples: list[Labelled], size: int, seed: int) -> Iterator[dict[str, Any]]:
    encoded = [prm_encode(tokenizer, e) for e in examples]
    rng = random.Random(seed)
    while True:  # epochs: shuffled, then length-sorted within runs of 8 batches (as policy_batches)
        order = list(range(len(encoded)))
        rng.shuffle(order)
        usable = len(order) - len(order) % size
        for run in range(0, usable, size * 8):
            ordered = sorted(order[run : min(run + size * 8, usable)], key=lambda i: len(encoded[i][0]))
            yield from _prm_batch(tokenizer, [encoded[i] for i in ordered], size)


def _prm_batch(
    tokenizer: Any, encoded: list[tuple[list[int], list[int]]], size: int
) -> Iterator[dict[str, Any]]:
    for start in range(0, len(encoded), size):
        rows = encoded[start : start + size]
        yield {
            "input_ids": pad_right([r[0] for r in rows], tokenizer.pad_token_id),
            "attention_mask": pad_right([[1] * len(r[0]) for r in rows], 0),
            "targets": pad_right([r[1] for r in rows], -100),
        }


def label_ids(tokenizer: Any) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(GOOD), tokenizer.convert_tokens_to_ids(BAD)]


def prm_loss_fn(tokenizer: Any) -> Callable[[Any, dict[str, Any]], Any]:
    """Binary cross-entropy on the "+"/"-" logits at the tag positions (class 0 = "+" = good)."""
    pair = label_ids(tokenizer)

    def loss(model: Any, batch: dict[str, Any]) -> Any:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["targets"] != -100
        two = logits[mask][:, pair]
        return torch.nn.functional.cross_entropy(two, 1 - batch["targets"][mask])

    return loss


def prm_step_scores(
    model: Any, tokenizer: Any, examples: Sequence[Labelled], batch: int = 256
) -> list[list[float]]:
    """p(good) at every step tag of each example (one forward pass per solution)."""
    pair = label_ids(tokenizer)
    scores: list[list[float]] = []
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        rows = [prm_encode(tokenizer, e) for e in chunk]
        ids = pad_right([r[0] for r in rows], tokenizer.pad_token_id)
        mask = pad_right([[1] * len(r[0]) for r in rows], 0)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :, pair].float()
        probs = torch.softmax(logits, dim=-1)[:, :, 0]
        for row, (_, targets) in zip(probs.tolist(), rows, strict=True):
            scores.append([p for p, t in zip(row, targets, strict=False) if t != -100])
    return scores


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
    train_loop(
        model, batches, prm_loss_fn(tokenizer), cfg.prm_steps, cfg.prm_lr, cfg.warmup, progress, "prm", hook
    )
    return model
