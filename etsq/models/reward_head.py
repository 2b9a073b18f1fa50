"""Reward-head PRMs in-process: a transformer body plus a label head read at the step separators.

Qwen2.5-Math-PRM (`Qwen2ForProcessRewardModel`) is a Qwen2 body (`model.*` weights) and a head
`score` = Linear(hidden, hidden), ReLU, Linear(hidden, 2) (`score.0.*`, `score.2.*`).  Its model card
loads it with remote code that newer transformers cannot run; here the body is transformers' own
model for the checkpoint's `model_type` (`AutoModel.from_config`) and the head the same two layers, so
`from_pretrained` fills both from the checkpoint and no remote code runs.  A family's rendered text
ends with the newest step's separator, so its score is the head at the last position:
softmax(logits)[good].
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

from etsq.errors import ConfigError, ModelError
from etsq.models.base import ModelInfo, ScoreRequest
from etsq.models.local import (
    MAX_SCORE_ROWS,
    configure_threads,
    encode_batch,
    load_dtype,
    prepare_tokenizer,
    score_by_length,
)
from etsq.models.prm_families import Family, RewardHeadFamily, get_family

BACKEND = "transformers"


class ProcessRewardModel(PreTrainedModel):  # type: ignore[misc]  # transformers is Any to mypy
    """A transformer body (`model`) and a two-layer label head (`score`), as Qwen2.5-Math-PRM stores them."""

    base_model_prefix = "model"
    config_class = PretrainedConfig

    def __init__(self, config: PretrainedConfig, n_labels: int = 2) -> None:
        super().__init__(config)
        self.model = AutoModel.from_config(config)
        hidden = int(config.hidden_size)
        self.score = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_labels)
        )
        self.post_init()

    def forward(self, **inputs: Any) -> torch.Tensor:
        """The head's label logits at every position."""
        hidden = self.model(**inputs).last_hidden_state
        return self.score(hidden.to(self.score[0].weight.dtype))


@dataclass
class LoadedRewardModel:
    path: str
    model: ProcessRewardModel
    tokenizer: Any

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")


_loaded: dict[tuple[str, int], LoadedRewardModel] = {}
_lock = threading.Lock()


def load_reward_model(path: str, n_labels: int = 2, threads: int | None = None) -> LoadedRewardModel:
    """The reward model at `path`, loaded once per process; ModelError when it has no such head."""
    with _lock:
        if (path, n_labels) not in _loaded:
            _loaded[(path, n_labels)] = _load(path, n_labels, threads)
        return _loaded[(path, n_labels)]


def _load(path: str, n_labels: int, threads: int | None) -> LoadedRewardModel:
    configure_threads(threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        model, report = ProcessRewardModel.from_pretrained(
            path, config=config, n_labels=n_labels, dtype=load_dtype(), output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"could not load reward model {path!r}: {exc}") from exc
    missing = [k for k in report.get("missing_keys", []) if k.startswith("score.")]
    if missing:
        raise ModelError(f"{path!r} has no process reward head (missing {', '.join(sorted(missing))})")
    if torch.cuda.is_available():
        model = model.to("cuda")
    prepare_tokenizer(tokenizer, path)
    return LoadedRewardModel(path, model.eval(), tokenizer)


class LocalRewardPRM:
    """The `PRM` protocol on an in-process reward-head model."""

    def __init__(
        self,
        loaded: LoadedRewardModel,
        family: str | Family = "qwen-prm",
        name: str | None = None,
        max_rows: int = MAX_SCORE_ROWS,
    ) -> None:
        found = get_family(family)
        if not isinstance(found, RewardHeadFamily):
            raise ConfigError(f"PRM family {found.name!r} is not a reward-head model")
        self.loaded, self.family, self.max_rows = loaded, found, max_rows
        ids = loaded.tokenizer.encode(found.separator, add_special_tokens=False)
        if len(ids) != 1:
            raise ModelError(
                f"the tokenizer of {loaded.path!r} has no single token for the step separator "
                f"{found.separator!r} (it is {len(ids)} tokens)"
            )
        details = {"path": loaded.path, "dtype": loaded.dtype, "role": "prm", "family": found.name}
        self.info = ModelInfo(name or loaded.path, BACKEND, details)

    def server_stats(self) -> dict[str, Any]:
        return {}

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        texts = [self.family.render(self.loaded.tokenizer, req) for req in requests]
        return score_by_length(texts, self._score_texts, self.max_rows, len)

    def _score_texts(self, texts: list[str]) -> list[float]:
        enc = encode_batch(self.loaded, texts, self.family.add_special_tokens)
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.loaded.model(**enc, position_ids=positions, use_cache=False)[:, -1].float()
        return [float(p) for p in torch.softmax(logits, dim=-1)[:, self.family.good].tolist()]


def load_reward_prm(
    path: str, family: str, name: str | None = None, threads: int | None = None
) -> LocalRewardPRM:
    """An in-process reward-head PRM for `family` from the checkpoint at `path`."""
    found = get_family(family)
    n_labels = found.n_labels if isinstance(found, RewardHeadFamily) else 2
    return LocalRewardPRM(load_reward_model(path, n_labels, threads), found, name=name)
