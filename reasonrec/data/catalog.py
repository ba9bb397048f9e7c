"""What every query needs to know about the catalog and its user, shared by the instruction
builder, the batch-scoring job and the Serve app (one implementation, three callers).

* :class:`Catalog`: item prompt texts, photos (encoded bytes, looked up by item id, never copied
  per example), training popularity.
* :class:`UserDirectory`: per user the training history, evidence horizon (EH), bucket and a
  short preference description. An unknown user, or one given only by an inline history, is
  resolved here too: an unknown user with no history is cold (EH 1, bucket ``high``, flagged).
* :class:`PromptBuilder`: renders a task prompt (template mixture, tool hints) into the example
  dict the VLM collator takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa

from reasonrec.data.evidence import EHNormalizer
from reasonrec.data.evidence import bucket as eh_bucket_of
from reasonrec.prompts.templates import (
    ItemRef,
    PromptInputs,
    RenderOptions,
    TemplateSampler,
    ToolHint,
    item_text,
    render_prompt,
)
from reasonrec.prompts.user_desc import ItemAttributes, describe_users
from reasonrec.vlm.config import VLMConfig

if TYPE_CHECKING:  # torch and transformers load only where the VLM runs
    from reasonrec.vlm.infer import ItemTrie


class Catalog:
    """Items by dense id: prompt text, photo bytes (or None), training popularity."""

    def __init__(self, items: pa.Table, popularity: np.ndarray | None = None):
        d = items.sort_by("item_id").to_pydict()
        self.n_items = len(d["item_id"])
        if d["item_id"] != list(range(self.n_items)):
            raise ValueError("items table must hold dense item ids 0..N-1")
        self.text = [
            item_text(t or k, b, (c[-1] if c else None))
            for t, k, b, c in zip(d["title"], d["item_key"], d["brand"], d["categories"])
        ]
        self.images: list[bytes | None] = d.get("image") or [None] * self.n_items
        self.attrs = ItemAttributes.from_columns(brand=d["brand"], categories=d["categories"], price=d["price"])
        self.popularity = np.zeros(self.n_items, np.int64) if popularity is None else np.asarray(popularity, np.int64)

    def check(self, ids: Sequence[int], what: str) -> None:
        bad = [int(i) for i in ids if not 0 <= int(i) < self.n_items]
        if bad:
            raise ValueError(f"{what}: unknown item id(s) {bad[:5]} (catalog has ids 0..{self.n_items - 1})")

    def refs(self, ids: Sequence[int]) -> list[ItemRef]:
        return [ItemRef(int(i), self.text[int(i)], self.images[int(i)] is not None) for i in ids]

    def photos(self, ids: Sequence[int]) -> list[bytes | None]:
        return [self.images[int(i)] for i in ids]

    def text_prior(self) -> np.ndarray:
        """Weights that split a shared text's probability among its items: training popularity,
        + 1 so unseen items keep a share."""
        return self.popularity.astype(np.float64) + 1.0

    def trie(self, tokenizer) -> ItemTrie:
        """The whole catalog as the VLM's constrained-decoding trie (scoring and fine-tune
        validation rank the same items the same way)."""
        from reasonrec.vlm.infer import ItemTrie

        return ItemTrie(tokenizer, self.text, list(range(self.n_items)), prior=self.text_prior())


@dataclass
class UserState:
    user_id: int
    history: np.ndarray
    eh: float
    bucket: str
    desc: str
    cold_user: bool  # unknown user: treated as cold, flagged in the prediction


class UserDirectory:
    """Training histories + EH + descriptions of the prepared users."""

    def __init__(
        self, users: pa.Table, loo: pa.Table, catalog: Catalog, normalizer: EHNormalizer, thresholds: Sequence[float]
    ):
        self.catalog, self.normalizer, self.thresholds = catalog, normalizer, tuple(thresholds)
        loo = loo.sort_by("user_id")
        u = users.sort_by("user_id")
        self.known = {int(x): i for i, x in enumerate(u.column("user_id").to_pylist())}
        self.eh = u.column("evidence_horizon").to_numpy().astype(np.float32)
        self.bucket = u.column("eh_bucket").to_pylist()
        self.train: dict[int, np.ndarray] = {}
        self.valid: dict[int, int] = {}
        for uid, tr, v in zip(
            loo.column("user_id").to_pylist(),
            loo.column("train_items").to_pylist(),
            loo.column("valid_item").to_pylist(),
        ):
            self.train[int(uid)] = np.asarray(tr, np.int64)
            if v is not None:
                self.valid[int(uid)] = int(v)
        ids = list(self.known)
        self.desc = dict(
            zip(ids, describe_users([self.train.get(i, np.zeros(0, np.int64)) for i in ids], catalog.attrs))
        )

    @classmethod
    def from_store(cls, store, catalog: Catalog, thresholds: Sequence[float]) -> UserDirectory:
        users = store.read_table("prepare", "users", columns=["user_id", "evidence_horizon", "eh_bucket"])
        loo = store.read_table("prepare", "loo", columns=["user_id", "train_items", "valid_item"])
        return cls(users, loo, catalog, EHNormalizer.load(store), thresholds)

    def history(self, user_id: int, split: str) -> np.ndarray:
        """The history a query of ``split`` sees (leave-one-out): train[:-1] for train, train for
        valid, train + valid item for test (and for production queries)."""
        from reasonrec.data.prepare import split_history

        return split_history(self.train.get(int(user_id), np.zeros(0, np.int64)), self.valid.get(int(user_id)), split)

    def resolve(self, user_id: int, history: Sequence[int] | None = None, split: str = "test") -> UserState:
        """A known user keeps their prepared EH and bucket (what training saw); an inline history
        replaces the stored one for the prompt. An unknown user is scored from the inline history
        (EH from the run's normalizer), or as fully cold when there is none."""
        idx = self.known.get(int(user_id))
        if idx is not None:
            hist = self.history(user_id, split) if history is None else np.asarray(history, np.int64)
            return UserState(int(user_id), hist, float(self.eh[idx]), self.bucket[idx], self.desc[int(user_id)], False)
        hist = np.asarray(history if history is not None else [], np.int64)
        if len(hist):
            self.catalog.check(hist, "history")
        eh = float(self.normalizer(np.array([len(hist)]))[0]) if len(hist) else 1.0
        desc = describe_users([hist], self.catalog.attrs)[0]
        return UserState(int(user_id), hist, eh, str(eh_bucket_of(np.array([eh]), self.thresholds)[0]), desc, True)


class PromptBuilder:
    """Task prompt -> the VLM example dict ``{"prompt", "image_items", "template_id"}`` (photos
    stay item ids; :meth:`example` attaches the bytes for the collator)."""

    def __init__(
        self, catalog: Catalog, vlm: VLMConfig, sampler: TemplateSampler | None = None, prompt_candidates: int = 20
    ):
        self.catalog = catalog
        self.opts = RenderOptions(
            max_history_items=vlm.max_history_items,
            max_history_photos=vlm.max_history_photos,
            max_candidate_photos=vlm.max_candidate_photos,
        )
        self.sampler = sampler or TemplateSampler()
        self.prompt_candidates = prompt_candidates

    def shown_candidates(self, candidates: Sequence[int], key: int) -> list[int]:
        """The candidates written into a direct prompt: a seeded subset of ``prompt_candidates``
        (a 100-item list would not fit a small model's context); the VLM still scores all of them
        by answer likelihood. The subset does not look at the truth, so it cannot leak it."""
        cands = [int(c) for c in candidates]
        if len(cands) <= self.prompt_candidates:
            return cands
        rng = np.random.default_rng([int(key) & 0x7FFFFFFF, 7])
        return [cands[i] for i in sorted(rng.choice(len(cands), self.prompt_candidates, replace=False))]

    def render(
        self,
        task: str,
        user: UserState,
        key: int,
        *,
        candidates: Sequence[int] = (),
        item_id: int | None = None,
        rating: float | None = None,
        hints: Sequence[ToolHint] = (),
    ) -> dict[str, Any]:
        inputs = PromptInputs(
            user_id=user.user_id,
            user_desc=user.desc,
            history=self.catalog.refs(user.history),
            eh_value=user.eh,
            eh_bucket=user.bucket,
            item=self.catalog.refs([item_id])[0] if item_id is not None else None,
            candidates=self.catalog.refs(self.shown_candidates(candidates, key)) if len(candidates) else (),
            rating=rating,
            tool_hints=list(hints),
        )
        tid = self.sampler.pick(task, key)
        r = render_prompt(task, inputs, tid, self.opts)
        return {"prompt": r.text, "image_items": list(r.image_items), "template_id": tid}

    def example(self, rendered: dict[str, Any]) -> dict[str, Any]:
        """The collator's input: the prompt with its photos' bytes."""
        return {"prompt": rendered["prompt"], "images": self.catalog.photos(rendered["image_items"])}


def item_popularity(loo: pa.Table, n_items: int) -> np.ndarray:
    """Training interaction count per item (from the LOO train lists)."""
    flat = pa.compute.list_flatten(loo.column("train_items")).to_numpy()
    return np.bincount(flat.astype(np.int64), minlength=n_items)


def load_catalog(store, photos: bool = True) -> Catalog:
    """The run's catalog from the committed ``prepare`` outputs (``photos=False``: texts and
    popularity only, without reading the image bytes). Photos come from the ``images`` stage
    (resized, validated) when it is committed for this prepare output, else from prepare's
    embedded bytes; an item whose photo failed has none, and its prompts show its text only."""
    items = store.read_table(
        "prepare", "items", columns=["item_id", "item_key", "title", "brand", "categories", "price"]
    )
    if photos:
        from reasonrec.data.images import item_photos

        ph = item_photos(store)
        idx = pa.compute.index_in(items.column("item_id"), value_set=ph.column("item_id").combine_chunks())
        items = items.append_column("image", ph.column("image").take(idx))
    loo = store.read_table("prepare", "loo", columns=["train_items"])
    return Catalog(items, item_popularity(loo, items.num_rows))


def load_context(
    store,
    vlm: VLMConfig,
    thresholds: Sequence[float],
    sampler: TemplateSampler | None = None,
    prompt_candidates: int = 20,
) -> tuple[Catalog, UserDirectory, PromptBuilder]:
    """Catalog, users and prompt builder of a run (reads the committed ``prepare`` outputs)."""
    catalog = load_catalog(store)
    users = UserDirectory.from_store(store, catalog, thresholds)
    return catalog, users, PromptBuilder(catalog, vlm, sampler, prompt_candidates)
