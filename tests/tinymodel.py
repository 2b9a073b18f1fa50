"""Tiny random checkpoints (BPE tokenizer + 2-layer model) that tests load like real models.

`build_tiny_model(path)` writes a complete transformers checkpoint in well under a second: a byte-level
BPE tokenizer trained on a small built-in math corpus (so "Yes", "No", "+", "-", " ки" and "\\n\\n"
exist as tokens) with a chat template, and a randomly initialised `LlamaForCausalLM`.
`build_tiny_prm(path)` writes a process reward model shaped like Qwen2.5-Math-PRM
(`Qwen2ForProcessRewardModel`: a Qwen2 body and a two-label head `score` = Linear, ReLU, Linear, read
at each `<extra_0>`), with a Qwen-style chat template and `<extra_0>` as a special token; vLLM's CPU
build serves it with its pooling runner.  Everything is seeded, so two builds are the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SEED = 1234
VOCAB_SIZE = 600

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_PROBLEMS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7", "7"),
    ("A box holds 12 pens. How many pens are in 5 boxes?", "12 * 5 = 60", "60"),
    ("Sara had 20 dollars and spent 8. How much is left?", "20 - 8 = 12", "12"),
    ("What is 144 divided by 12?", "144 / 12 = 12", "12"),
    ("A train travels 60 miles per hour for 3 hours. How far does it go?", "60 * 3 = 180", "180"),
    ("There are 9 birds and 5 fly away. How many remain?", "9 - 5 = 4", "4"),
]


def _corpus() -> list[str]:
    """Policy-format solutions, judge dialogues and Math-Shepherd lines, repeated so BPE merges them."""
    lines: list[str] = []
    for question, work, answer in _PROBLEMS:
        solution = f"Step 1: {work}.\n\nStep 2: So the total is {answer}.\n\n"
        solution += f"The answer is: \\boxed{{{answer}}}"
        # A trailing blank line is its own pre-token, which lets BPE learn "\n\n" as one token.
        lines += [f"Question: {question}\n\n{solution}", f"{work}.\n\n"]
        lines += ["Is the new step correct? Answer Yes or No.\nYes", "Is the new step correct? No"]
        lines += [f"{question} Step 1: {work} ки\nStep 2: The answer is {answer} ки +", f"{work} ки -"]
    lines += ["0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20", "Yes No Yes No + - + - ки ки"]
    return lines * 20


def _train_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        # A wider init than the default 0.02 so the random model has opinions (non-flat logits).
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).eval()


def build_tiny_model(path: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Write the tiny tokenizer + model checkpoint into `path` (created if needed) and return it.

    A small `vocab_size` (~270) leaves the tokenizer with hardly any merges: "Yes" is then several
    tokens, the model of a wrong-kind PRM server.
    """
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    model = _build_model(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- a Qwen2.5-Math-PRM shape

PRM_SEPARATOR = "<extra_0>"
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _prm_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    from transformers import Qwen2Config

    # Head size 64: vLLM's CPU attention supports multiples of 32 only.
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["Qwen2ForProcessRewardModel"],
    )


def build_tiny_prm(path: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Write a tiny `Qwen2ForProcessRewardModel` checkpoint (weights `model.*` + `score.{0,2}.*`)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Model

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", PRM_SEPARATOR]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    config = _prm_config(tokenizer)
    torch.manual_seed(SEED)
    body = Qwen2Model(config).eval()
    head = torch.nn.Sequential(
        torch.nn.Linear(config.hidden_size, config.hidden_size),
        torch.nn.ReLU(),
        torch.nn.Linear(config.hidden_size, 2),
    )
    # Wider than the default init, so the two labels' logits differ by more than rounding.
    for layer in (head[0], head[2]):
        torch.nn.init.normal_(layer.weight, std=0.05)
    weights = {f"model.{k}": v for k, v in body.state_dict().items()}
    weights |= {f"score.{k}": v for k, v in head.state_dict().items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
