"""The synthetic multimodal world: the project's embedded default data, with a known ground truth.

Every random quantity is a counter-based hash of ``(seed, stream, entity id[, index])``
(splitmix64, vectorised in NumPy), never a stateful RNG. So item ``i`` and user ``u`` look the
same whichever shard, process or shard count generates them: ``n_user_shards`` / ``n_item_shards``
only set the parallelism, and concatenating the shards of any sharding gives the same tables.

Generative process (``cfg`` = :class:`~reasonrec.config.SyntheticConfig`; C categories, S styles,
B brands, N items, U users, K = n_successors)
-------------------------------------------------------------------------------------------
Items (``world(cfg)``; small per-item arrays every shard can rebuild from the seed in ms):
  * category ``c ~ Uniform(C)``, style ``s ~ Uniform(S)``; items ``0..C*S-1`` are pinned to
    bucket ``(c, s) = (i % C, i // C)`` so that no (category, style) bucket is empty.
  * shape = ``SHAPES[c % 6]`` (fixed by category), pattern = ``PATTERNS[s % 5]`` (fixed by style).
  * colour: category c owns the palette ``COLOURS[(3c + j) % 12], j = 0..2``; style s prefers
    ``j = s % 3`` (probability 0.6, else j uniform), and with probability 0.1 the colour is any
    of the 12 instead (visual noise).
  * brand: brands ``b = c, c + C, c + 2C, ...`` belong to category c; uniform among them
    (``c % B`` when category c has none).
  * popularity ``pop_i = exp(popularity_sigma * N(0,1))``; quality ``q_i = 0.4 * N(0,1)``;
    price = category base * brand premium * ``exp(0.25 N(0,1))``.
  * title, description and categories ``[department, category]`` are rendered from these
    attributes (items of one brand, colour, pattern and category share a title unless
    ``distinct_titles`` appends a product-line name, the ``title_rank``-th of ``_LINES``); the
    image (PNG, ``image_size`` square) is the item's shape filled with its colour on a
    style-tinted background, overlaid (inside the shape only) with its pattern in a darker
    shade of the colour. The plain colour is always the most frequent non-background pixel.
  * successors: item i in bucket (c, s) has K successors; slot k draws an item proportional to
    ``pop`` from bucket (c, s) for even k ("substitutes") or ((c + 1) % C, s) for odd k
    ("complements"), never i itself (the next item of the bucket instead, unless it is alone).
    Slot weights ``w_k ∝ successor_decay ** k``.

Users (``user_latents(cfg, ids)``):
  * taste over categories ``softmax(taste_sharpness * z)``, ``z ~ N(0, I_C)``, and likewise an
    independent taste over styles (logistic-normal; larger sharpness = pickier users).
  * sequence length ``L = min(max_len, min_len + floor(activity_scale * X))``, X ~ Lomax
    (Pareto II) with shape ``activity_alpha``: many users with 1-5 interactions, a few heavy ones.
  * a favourite review aspect (colour, shape, pattern or brand), uniform.
  * first timestamp uniform in ``[start_ts, start_ts + time_span_s)``.

Interactions of user u at positions t = 0..L-1, a first-order Markov chain given the taste:
  * with probability ``p_transition`` (t > 0 only): a successor of the previous item, slot k
    with probability ``w_k``;
  * with probability ``p_noise``: an item uniform over the whole catalogue;
  * otherwise (and for the transition mass at t = 0): a taste draw: category ~ taste_c, style ~
    taste_s, then an item of that bucket proportional to ``pop``.
  ``oracle_next_item_scores`` returns exactly this distribution; ``world_transition_matrix``
  averages it over users (E[taste] is uniform by symmetry).
  * timestamps strictly increase: gap = ``1 + floor(Exp(mean))`` seconds, mean ``burst_gap_s``
    with probability ``p_burst`` else ``mean_gap_s``.
  * rating = ``clip(round(1 + 4 m + q_i + 0.7 N(0,1)), 1, 5)`` with the match
    ``m = (taste_c[c_i] / max taste_c + taste_s[s_i] / max taste_s) / 2``.
  * review = one sentence with sentiment from the rating (<= 2 negative, 3 neutral, >= 4
    positive) about one aspect phrase of the item ("the red colour", "the round shape",
    "the striped pattern", "the Lumina brand"): the user's favourite aspect with probability
    0.75, else a uniform aspect, then a fixed closing per sentiment template.

Keys: users ``u%06d``, items ``i%05d`` (wider when the counts need it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reasonrec.config import SourceConfig, StorageConfig, SyntheticConfig
from reasonrec.data.schemas import RAW_INTERACTIONS, RAW_ITEMS, conform
from reasonrec.data.sources import register
from reasonrec.hashing import GOLDEN, GOLDEN_INT, MASK64, mix64_, mix64_int

# Bump when the generative process changes, so fingerprints (and cached stages) change too.
GENERATOR_VERSION = 1

COLOURS: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (220, 40, 40)),
    ("orange", (245, 140, 30)),
    ("yellow", (240, 210, 40)),
    ("lime", (150, 210, 50)),
    ("green", (40, 150, 70)),
    ("teal", (30, 160, 160)),
    ("blue", (50, 110, 230)),
    ("navy", (30, 50, 130)),
    ("purple", (130, 60, 170)),
    ("pink", (235, 120, 170)),
    ("brown", (140, 90, 50)),
    ("black", (30, 30, 30)),
]
SHAPES = ["round", "square", "triangular", "diamond", "hexagonal", "star"]
PATTERNS = ["solid", "striped", "dotted", "checked", "zigzag"]
STYLES = ["classic", "modern", "retro", "sporty", "minimal"]
# Light backgrounds, one per style, far from every item colour and its dark shade.
BACKGROUNDS = [(246, 244, 238), (236, 240, 247), (250, 238, 226), (237, 246, 235), (244, 236, 246)]
# (plural name, singular noun, department)
CATEGORIES = [
    ("Mugs", "Mug", "Kitchen"),
    ("Lamps", "Lamp", "Home"),
    ("Pillows", "Pillow", "Home"),
    ("Bags", "Bag", "Fashion"),
    ("Hats", "Hat", "Fashion"),
    ("Vases", "Vase", "Home"),
    ("Clocks", "Clock", "Home"),
    ("Bottles", "Bottle", "Kitchen"),
    ("Notebooks", "Notebook", "Office"),
    ("Sneakers", "Sneaker", "Fashion"),
    ("Plates", "Plate", "Kitchen"),
    ("Candles", "Candle", "Home"),
]
ASPECTS = ["colour", "shape", "pattern", "brand"]
_BRAND_HEAD = ["Lu", "Ve", "Ka", "No", "Zi", "Ora", "Pel", "Tri", "Mo", "Sa"]
_BRAND_TAIL = ["mina", "tex", "ro", "vo", "sana", "lyx"]
# Product-line names that make titles distinct (``distinct_titles``): n-th item of a shared title.
_LINES = ["Aria", "Nova", "Velvet", "Bloom", "Luxe", "Silk", "Ember", "Opal"]
# Review templates per sentiment (negative, neutral, positive): prefix + aspect phrase + suffix.
_REVIEW_TEMPLATES = [
    [
        ("Disappointed by ", ". Would not buy again."),
        ("Did not like ", " at all."),
        ("Returned it because of ", "."),
        ("Sadly ", " looks cheap."),
    ],
    [
        ("It is okay; ", " is nothing special."),
        ("Average overall, though ", " is fine."),
        ("Not bad, but ", " could be better."),
        ("Decent; ", " is as described."),
    ],
    [
        ("Love ", ". Would buy again."),
        ("Really happy with ", "."),
        ("Great item; ", " really stands out."),
        ("What I like most is ", "."),
    ],
]
P_STYLE_COLOUR = 0.6
P_COLOUR_NOISE = 0.1
P_FAVOURITE_ASPECT = 0.75

# ------------------------------------------------------------------ counter-based random draws
# SplitMix64 from reasonrec.hashing; its finaliser runs in place (mix64_) on fresh arrays, for speed.
_KEY_OFFSET = 0x632BE59BD9B4E019  # added per part of a scalar key (see _scalar_key)

# Streams: one constant per independent quantity.
(
    S_CAT,
    S_STYLE,
    S_BRAND,
    S_COLOUR_J,
    S_COLOUR_P,
    S_COLOUR_N,
    S_POP,
    S_QUAL,
    S_PRICE,
    S_PREMIUM,
    S_CATPRICE,
    S_SUCC,
    S_IMG,
    S_LEN,
    S_START,
    S_TASTE_C,
    S_TASTE_S,
    S_ASPECT,
    S_INTER,
) = range(1, 20)
(M_MODE, M_TCAT, M_TSTY, M_TITEM, M_NITEM, M_SLOT, M_BURST, M_GAP, M_RATE, M_ASP_P, M_ASP, M_TPL) = range(101, 113)


def _scalar_key(*parts: int) -> np.uint64:
    """Scalar key of integer ``parts`` (Python ints): ``h = mix64(h + part * GOLDEN + offset)`` per part."""
    h = 0
    for p in parts:
        h = mix64_int((h + (p & MASK64) * GOLDEN_INT + _KEY_OFFSET) & MASK64)
    return np.uint64(h)


def _hash(seed: int, stream: int, a, b=None) -> np.ndarray:
    """uint64 hash of (seed, stream, a[, b]); a and b broadcast."""
    h = mix64_(np.asarray(a).astype(np.uint64) * GOLDEN + _scalar_key(seed, stream))
    if b is not None:
        h = mix64_(h + np.asarray(b).astype(np.uint64) * GOLDEN)
    return h


def _sub(base: np.ndarray, stream: int) -> np.ndarray:
    """A further independent stream derived from per-entity base hashes."""
    return mix64_(base ^ _scalar_key(stream))


def _unif(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> floats in the open interval (0, 1)."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def _normal(h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    return np.sqrt(-2.0 * np.log(_unif(h1))) * np.cos(2.0 * np.pi * _unif(h2))


def _categorical_rows(cum: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Draw a column per entry from the row-wise CDFs ``cum`` (n x k, last column 1) at ``rows``,
    with one searchsorted over the rows laid end to end (row r spans (r, r + 1])."""
    n, k = cum.shape
    flat = (cum + np.arange(n)[:, None]).ravel()
    idx = np.searchsorted(flat, rows + u, side="right")
    return np.clip(idx - rows * k, 0, k - 1)


# ----------------------------------------------------------------------------------- the world
def _cfg_key(cfg: SyntheticConfig) -> tuple:
    return tuple(sorted(dataclasses.asdict(cfg).items()))


def validate_synthetic(cfg: SyntheticConfig) -> None:
    problems = []
    if cfg.n_users < 1 or cfg.n_items < 1:
        problems.append("n_users and n_items must be >= 1")
    if cfg.n_categories < 1 or cfg.n_styles < 1 or cfg.n_brands < 1:
        problems.append("n_categories, n_styles and n_brands must be >= 1")
    if cfg.n_items < cfg.n_categories * cfg.n_styles:
        problems.append("n_items must be >= n_categories * n_styles (no empty bucket)")
    if not (0 <= cfg.p_transition and 0 <= cfg.p_noise and cfg.p_transition + cfg.p_noise <= 1):
        problems.append("need p_transition, p_noise >= 0 and p_transition + p_noise <= 1")
    if not (1 <= cfg.min_len <= cfg.max_len):
        problems.append("need 1 <= min_len <= max_len")
    if cfg.activity_alpha <= 0 or cfg.activity_scale < 0:
        problems.append("activity_alpha must be > 0 and activity_scale >= 0")
    if cfg.n_successors < 1 or not (0 < cfg.successor_decay):
        problems.append("n_successors must be >= 1 and successor_decay > 0")
    if cfg.image_size < 8:
        problems.append("image_size must be >= 8")
    if cfg.n_user_shards < 1 or cfg.n_item_shards < 1:
        problems.append("n_user_shards and n_item_shards must be >= 1")
    if problems:
        raise ValueError("invalid synthetic config: " + "; ".join(problems))


@dataclass(frozen=True)
class World:
    """Per-item attribute arrays (length n_items) and the transition structure."""

    category: np.ndarray
    style: np.ndarray
    brand: np.ndarray
    colour: np.ndarray
    shape: np.ndarray
    pattern: np.ndarray
    popularity: np.ndarray
    quality: np.ndarray
    price: np.ndarray
    successors: np.ndarray  # (n_items, K) int64
    successor_weights: np.ndarray  # (K,) sums to 1
    bucket_order: np.ndarray  # item ids sorted by bucket = category * S + style
    bucket_start: np.ndarray  # (C*S,) first index into bucket_order
    bucket_count: np.ndarray
    pop_cum: np.ndarray  # cumsum of popularity along bucket_order
    brand_names: list
    category_names: list
    style_names: list
    aspect_phrases: pa.Array  # 4 * n_items strings: aspect a of item i at a * n_items + i

    def sample_in_bucket(self, bucket: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Item of ``bucket`` drawn proportionally to popularity, at uniforms ``u``."""
        start = self.bucket_start[bucket]
        end = start + self.bucket_count[bucket] - 1
        lo = self.pop_cum[start] - self.popularity[self.bucket_order[start]]
        hi = self.pop_cum[end]
        j = np.searchsorted(self.pop_cum, lo + u * (hi - lo), side="right")
        return self.bucket_order[np.clip(j, start, end)]

    def bucket_probs(self) -> np.ndarray:
        """P(item | its bucket) for every item: popularity / bucket total."""
        b = self.category * len(self.style_names) + self.style
        totals = np.bincount(b, weights=self.popularity, minlength=len(self.bucket_start))
        return self.popularity / totals[b]


def _named(names: Sequence[str], i: int) -> str:
    return names[i % len(names)] + ("" if i < len(names) else f" {i // len(names) + 1}")


def brand_name(b: int) -> str:
    h, t = len(_BRAND_HEAD), len(_BRAND_TAIL)
    return _BRAND_HEAD[b % h] + _BRAND_TAIL[(b + b // h) % t] + ("" if b < h * t else str(b // (h * t)))


def world(cfg: SyntheticConfig) -> World:
    validate_synthetic(cfg)
    return _world_cached(_cfg_key(cfg))


@lru_cache(maxsize=8)
def _world_cached(key: tuple) -> World:
    cfg = SyntheticConfig(**dict(key))
    seed, n, C, S, B = cfg.seed, cfg.n_items, cfg.n_categories, cfg.n_styles, cfg.n_brands
    ids = np.arange(n, dtype=np.int64)

    cat = np.floor(_unif(_hash(seed, S_CAT, ids)) * C).astype(np.int64)
    sty = np.floor(_unif(_hash(seed, S_STYLE, ids)) * S).astype(np.int64)
    pinned = min(n, C * S)
    cat[:pinned] = ids[:pinned] % C
    sty[:pinned] = ids[:pinned] // C

    n_own = np.array([len(range(c, B, C)) for c in range(C)], dtype=np.int64)
    ub = _unif(_hash(seed, S_BRAND, ids))
    brand = np.where(n_own[cat] > 0, cat + C * np.floor(ub * np.maximum(n_own[cat], 1)).astype(np.int64), cat % B)

    j_pref = sty % 3
    j_any = np.floor(_unif(_hash(seed, S_COLOUR_J, ids)) * 3).astype(np.int64)
    j = np.where(_unif(_hash(seed, S_COLOUR_P, ids)) < P_STYLE_COLOUR, j_pref, j_any)
    colour = (3 * cat + j) % len(COLOURS)
    hn = _hash(seed, S_COLOUR_N, ids)
    noisy = _unif(hn) < P_COLOUR_NOISE
    colour = np.where(noisy, np.floor(_unif(_sub(hn, 1)) * len(COLOURS)).astype(np.int64), colour)

    shape = cat % len(SHAPES)
    pattern = sty % len(PATTERNS)
    hp = _hash(seed, S_POP, ids)
    popularity = np.exp(cfg.popularity_sigma * _normal(hp, _sub(hp, 1)))
    hq = _hash(seed, S_QUAL, ids)
    quality = 0.4 * _normal(hq, _sub(hq, 1))
    cat_base = 8.0 + 52.0 * _unif(_hash(seed, S_CATPRICE, np.arange(C)))
    hb = _hash(seed, S_PREMIUM, np.arange(B))
    premium = np.exp(0.3 * _normal(hb, _sub(hb, 1)))
    hpr = _hash(seed, S_PRICE, ids)
    price = np.round(cat_base[cat] * premium[brand] * np.exp(0.25 * _normal(hpr, _sub(hpr, 1))), 2)

    bucket = cat * S + sty
    order = np.argsort(bucket, kind="stable")
    bstart = np.searchsorted(bucket[order], np.arange(C * S))
    bcount = np.bincount(bucket, minlength=C * S)
    pop_cum = np.cumsum(popularity[order])
    rank_in_order = np.empty(n, dtype=np.int64)
    rank_in_order[order] = np.arange(n)

    K = cfg.n_successors
    slots = np.arange(K)
    target = np.where(slots[None, :] % 2 == 0, bucket[:, None], ((cat[:, None] + 1) % C) * S + sty[:, None])
    # Successor draws reuse the bucket sampler, so build the world in two steps.
    partial = World(
        cat,
        sty,
        brand,
        colour,
        shape,
        pattern,
        popularity,
        quality,
        price,
        np.zeros((n, K), np.int64),
        np.ones(K) / K,
        order,
        bstart,
        bcount,
        pop_cum,
        [],
        [],
        [],
        pa.array([], pa.string()),
    )
    succ = partial.sample_in_bucket(target.ravel(), _unif(_hash(seed, S_SUCC, ids[:, None], slots[None, :])).ravel())
    succ = succ.reshape(n, K)
    # Never a self-loop: take the next item of the bucket (wrapping) instead.
    self_hit = succ == ids[:, None]
    if self_hit.any():
        r = rank_in_order[succ[self_hit]]
        b = bucket[succ[self_hit]]
        succ[self_hit] = order[bstart[b] + (r - bstart[b] + 1) % bcount[b]]
    w = cfg.successor_decay ** slots.astype(np.float64)

    brand_names = [brand_name(b) for b in range(B)]
    category_names = [_named([c[0] for c in CATEGORIES], c) for c in range(C)]
    style_names = [_named(STYLES, s) for s in range(S)]
    phrases = (
        [f"the {COLOURS[c][0]} colour" for c in colour.tolist()]
        + [f"the {SHAPES[s]} shape" for s in shape.tolist()]
        + [f"the {PATTERNS[p]} pattern" for p in pattern.tolist()]
        + [f"the {brand_names[b]} brand" for b in brand.tolist()]
    )
    return dataclasses.replace(
        partial,
        successors=succ,
        successor_weights=w / w.sum(),
        brand_names=brand_names,
        category_names=category_names,
        style_names=style_names,
        aspect_phrases=pa.array(phrases),
    )


def item_attributes(cfg: SyntheticConfig, item_ids: Sequence[int] | np.ndarray | None = None) -> dict:
    """Readable attributes of items (all by default): names plus the integer codes."""
    w = world(cfg)
    ids = np.arange(cfg.n_items) if item_ids is None else np.asarray(item_ids, dtype=np.int64)
    return {
        "item_id": ids,
        "category": [w.category_names[c] for c in w.category[ids]],
        "style": [w.style_names[s] for s in w.style[ids]],
        "brand": [w.brand_names[b] for b in w.brand[ids]],
        "colour": [COLOURS[c][0] for c in w.colour[ids]],
        "colour_rgb": [COLOURS[c][1] for c in w.colour[ids]],
        "shape": [SHAPES[s] for s in w.shape[ids]],
        "pattern": [PATTERNS[p] for p in w.pattern[ids]],
        "category_id": w.category[ids],
        "style_id": w.style[ids],
        "brand_id": w.brand[ids],
        "colour_id": w.colour[ids],
        "popularity": w.popularity[ids],
        "quality": w.quality[ids],
        "price": w.price[ids],
        "title_rank": title_rank(w)[ids],
    }


def title_rank(w: World) -> np.ndarray:
    """Per item: how many lower-id items have the same brand, colour, pattern and category (the
    attributes its title is made of), so ``(title, rank)`` names each item once."""
    attrs = np.stack([w.brand, w.colour, w.pattern, w.category], axis=1)
    group = np.unique(attrs, axis=0, return_inverse=True)[1].ravel()
    order = np.argsort(group, kind="stable")  # by group, then by item id
    sizes = np.bincount(group)
    rank = np.empty(len(group), dtype=np.int64)
    rank[order] = np.arange(len(group)) - (np.cumsum(sizes) - sizes)[group[order]]
    return rank


# ----------------------------------------------------------------------------------- users
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def user_latents(cfg: SyntheticConfig, user_ids: Sequence[int] | np.ndarray) -> dict:
    """Ground-truth latents of users: taste_category (n x C), taste_style (n x S), length,
    aspect (index into ASPECTS), start_ts."""
    uid = np.asarray(user_ids, dtype=np.int64)
    seed = cfg.seed
    x = (1.0 - _unif(_hash(seed, S_LEN, uid))) ** (-1.0 / cfg.activity_alpha) - 1.0
    extra = np.floor(np.minimum(cfg.activity_scale * x, cfg.max_len)).astype(np.int64)
    length = np.minimum(cfg.min_len + extra, cfg.max_len)
    start = cfg.start_ts + np.floor(_unif(_hash(seed, S_START, uid)) * cfg.time_span_s).astype(np.int64)
    hc = _hash(seed, S_TASTE_C, uid[:, None], np.arange(cfg.n_categories)[None, :])
    hs = _hash(seed, S_TASTE_S, uid[:, None], np.arange(cfg.n_styles)[None, :])
    taste_c = _softmax(cfg.taste_sharpness * _normal(hc, _sub(hc, 1)))
    taste_s = _softmax(cfg.taste_sharpness * _normal(hs, _sub(hs, 1)))
    aspect = np.floor(_unif(_hash(seed, S_ASPECT, uid)) * len(ASPECTS)).astype(np.int64)
    return {
        "user_id": uid,
        "taste_category": taste_c,
        "taste_style": taste_s,
        "length": length,
        "aspect": aspect,
        "start_ts": start,
    }


def expected_length(cfg: SyntheticConfig) -> float:
    """Exact expected number of interactions per user (for planning benchmark sizes)."""
    # P(L >= min_len + k) = P(scale * X >= k) = (1 + k / scale) ** -alpha for k >= 1.
    ks = np.arange(1, cfg.max_len - cfg.min_len + 1, dtype=np.float64)
    if cfg.activity_scale == 0:
        return float(cfg.min_len)
    return float(cfg.min_len + np.sum((1.0 + ks / cfg.activity_scale) ** -cfg.activity_alpha))


def expected_interactions(cfg: SyntheticConfig) -> float:
    return cfg.n_users * expected_length(cfg)


# ---------------------------------------------------------------------------- interactions
MODE_TASTE, MODE_TRANSITION, MODE_NOISE = 0, 1, 2


def generate_interaction_arrays(cfg: SyntheticConfig, user_lo: int, user_hi: int, with_reviews: bool = True) -> dict:
    """Interactions of users ``[user_lo, user_hi)`` as NumPy arrays sorted by (user, time):
    user_id, item_id, pos, ts, rating, mode (MODE_*), aspect, sentiment, template, and
    ``review`` (a pyarrow string array) when ``with_reviews``."""
    w = world(cfg)
    seed, n_items, S = cfg.seed, cfg.n_items, cfg.n_styles
    lat = user_latents(cfg, np.arange(user_lo, user_hi, dtype=np.int64))
    L = lat["length"]
    total = int(L.sum())
    offsets = np.concatenate([[0], np.cumsum(L)[:-1]]).astype(np.int64)
    row = np.repeat(np.arange(len(L), dtype=np.int64), L)  # local user index
    uid = row + user_lo
    pos = np.arange(total, dtype=np.int64) - offsets[row]
    base = _hash(seed, S_INTER, uid, pos)

    um = _unif(_sub(base, M_MODE))
    mode = np.full(total, MODE_TASTE, dtype=np.int8)
    mode[(um < cfg.p_transition) & (pos > 0)] = MODE_TRANSITION
    mode[(um >= cfg.p_transition) & (um < cfg.p_transition + cfg.p_noise)] = MODE_NOISE

    items = np.empty(total, dtype=np.int64)
    noise = np.nonzero(mode == MODE_NOISE)[0]
    items[noise] = np.floor(_unif(_sub(base[noise], M_NITEM)) * n_items).astype(np.int64)
    taste = np.nonzero(mode == MODE_TASTE)[0]
    if len(taste):
        bt = base[taste]
        cum_c = np.cumsum(lat["taste_category"], axis=1)
        cum_c[:, -1] = 1.0
        cum_s = np.cumsum(lat["taste_style"], axis=1)
        cum_s[:, -1] = 1.0
        c = _categorical_rows(cum_c, row[taste], _unif(_sub(bt, M_TCAT)))
        s = _categorical_rows(cum_s, row[taste], _unif(_sub(bt, M_TSTY)))
        items[taste] = w.sample_in_bucket(c * S + s, _unif(_sub(bt, M_TITEM)))

    # The only sequential part: each transition reads the item one position earlier, so fill
    # transitions position by position (max_len vectorised steps, not one per interaction).
    trans = np.nonzero(mode == MODE_TRANSITION)[0]
    if len(trans):
        cum_w = np.cumsum(w.successor_weights)
        slot = np.minimum(np.searchsorted(cum_w, _unif(_sub(base[trans], M_SLOT)), side="right"), len(cum_w) - 1)
        by_pos = np.argsort(pos[trans], kind="stable")
        trans, slot = trans[by_pos], slot[by_pos]
        tpos = pos[trans]
        bounds = np.flatnonzero(np.diff(tpos)) + 1
        for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(trans)]])):
            idx = trans[lo:hi]
            items[idx] = w.successors[items[idx - 1], slot[lo:hi]]

    burst = _unif(_sub(base, M_BURST)) < cfg.p_burst
    mean_gap = np.where(burst, float(cfg.burst_gap_s), float(cfg.mean_gap_s))
    gap = 1 + np.floor(-np.log(_unif(_sub(base, M_GAP))) * mean_gap).astype(np.int64)
    gap[pos == 0] = 0
    csum = np.cumsum(gap)
    ts = lat["start_ts"][row] + csum - csum[offsets][row]

    ci, si = w.category[items], w.style[items]
    tc, tsy = lat["taste_category"], lat["taste_style"]
    match = 0.5 * tc[row, ci] / tc.max(axis=1)[row] + 0.5 * tsy[row, si] / tsy.max(axis=1)[row]
    hr = _sub(base, M_RATE)
    raw = 1.0 + 4.0 * match + w.quality[items] + 0.7 * _normal(hr, _sub(hr, 1))
    rating = np.clip(np.rint(raw), 1, 5).astype(np.float32)

    fav = _unif(_sub(base, M_ASP_P)) < P_FAVOURITE_ASPECT
    any_aspect = np.floor(_unif(_sub(base, M_ASP)) * len(ASPECTS)).astype(np.int64)
    aspect = np.where(fav, lat["aspect"][row], any_aspect)
    sentiment = np.where(rating <= 2, 0, np.where(rating == 3, 1, 2)).astype(np.int64)
    n_tpl = len(_REVIEW_TEMPLATES[0])
    template = np.floor(_unif(_sub(base, M_TPL)) * n_tpl).astype(np.int64)

    out = {
        "user_id": uid,
        "item_id": items,
        "pos": pos,
        "ts": ts,
        "rating": rating,
        "mode": mode,
        "aspect": aspect,
        "sentiment": sentiment,
        "template": template,
    }
    if with_reviews:
        # String assembly in Arrow's C++ kernels: no per-interaction Python.
        prefixes = pa.array([p for tpls in _REVIEW_TEMPLATES for p, _ in tpls])
        suffixes = pa.array([s for tpls in _REVIEW_TEMPLATES for _, s in tpls])
        k = sentiment * n_tpl + template
        out["review"] = pc.binary_join_element_wise(
            prefixes.take(pa.array(k)),
            w.aspect_phrases.take(pa.array(aspect * n_items + items)),
            suffixes.take(pa.array(k)),
            "",
        )
    return out


# -------------------------------------------------------------------------- ground-truth helpers
def _taste_item_probs(cfg: SyntheticConfig, taste_c: np.ndarray, taste_s: np.ndarray) -> np.ndarray:
    w = world(cfg)
    return taste_c[w.category] * taste_s[w.style] * w.bucket_probs()


def oracle_next_item_scores(cfg: SyntheticConfig, history: Sequence[int], user_id: int | None = None) -> np.ndarray:
    """The true distribution of the next item (length n_items, sums to 1) given the user's
    history (item ids in time order; only the last one matters). With ``user_id`` the user's
    true taste is used, otherwise the population-average (uniform) taste."""
    w = world(cfg)
    n = cfg.n_items
    if user_id is None:
        tc = np.full(cfg.n_categories, 1.0 / cfg.n_categories)
        ts = np.full(cfg.n_styles, 1.0 / cfg.n_styles)
    else:
        lat = user_latents(cfg, [user_id])
        tc, ts = lat["taste_category"][0], lat["taste_style"][0]
    p = np.full(n, cfg.p_noise / n)
    if len(history):
        p += (1.0 - cfg.p_transition - cfg.p_noise) * _taste_item_probs(cfg, tc, ts)
        np.add.at(p, w.successors[int(history[-1])], cfg.p_transition * w.successor_weights)
    else:
        p += (1.0 - cfg.p_noise) * _taste_item_probs(cfg, tc, ts)
    return p


def world_transition_matrix(cfg: SyntheticConfig) -> np.ndarray:
    """Dense population-average P(next = j | previous = i) (n_items x n_items, rows sum to 1);
    for small worlds (n_items up to a few thousand)."""
    w = world(cfg)
    n = cfg.n_items
    taste = _taste_item_probs(
        cfg, np.full(cfg.n_categories, 1.0 / cfg.n_categories), np.full(cfg.n_styles, 1.0 / cfg.n_styles)
    )
    m = np.tile(cfg.p_noise / n + (1.0 - cfg.p_transition - cfg.p_noise) * taste, (n, 1))
    rows = np.repeat(np.arange(n), cfg.n_successors)
    np.add.at(m, (rows, w.successors.ravel()), np.tile(cfg.p_transition * w.successor_weights, n))
    return m


# --------------------------------------------------------------------------------------- images
def _shape_points(shape: str, cx: float, cy: float, r: float) -> list:
    if shape == "triangular":
        angles, radii = [90, 210, 330], [r] * 3
    elif shape == "diamond":
        angles, radii = [0, 90, 180, 270], [r] * 4
    elif shape == "hexagonal":
        angles, radii = list(range(0, 360, 60)), [r] * 6
    else:  # star
        angles, radii = list(range(90, 450, 36)), [r if k % 2 == 0 else r * 0.5 for k in range(10)]
    return [(cx + rr * np.cos(np.radians(a)), cy - rr * np.sin(np.radians(a))) for a, rr in zip(angles, radii)]


@lru_cache(maxsize=64)
def _pattern_mask(pattern: str, size: int):
    """The pattern as an L-mode mask (255 = pattern); item independent, so built once."""
    from PIL import Image, ImageDraw

    unit = max(1, size // 32)
    pat = Image.new("L", (size, size), 0)
    dp = ImageDraw.Draw(pat)
    if pattern == "striped":
        for y in range(0, size, 4 * unit):
            dp.rectangle([0, y, size, y + unit - 1], fill=255)
    elif pattern == "dotted":
        for y in range(2 * unit, size, 6 * unit):
            for x in range(2 * unit, size, 6 * unit):
                dp.rectangle([x, y, x + unit, y + unit], fill=255)
    elif pattern == "checked":
        for v in range(0, size, 6 * unit):
            dp.rectangle([0, v, size, v + unit - 1], fill=255)
            dp.rectangle([v, 0, v + unit - 1, size], fill=255)
    elif pattern == "zigzag":
        step = 3 * unit
        for y0 in range(unit, size, 6 * unit):
            pts = [(x, y0 + (2 * unit if (x // step) % 2 else 0)) for x in range(0, size + step, step)]
            dp.line(pts, fill=255, width=unit)
    return pat


def render_image(
    size: int,
    colour_rgb: tuple,
    shape: str,
    pattern: str,
    background: tuple,
    jitter: tuple[float, float, float] = (0.5, 0.5, 0.5),
) -> bytes:
    """PNG bytes: ``shape`` filled with ``colour_rgb``, ``pattern`` in a darker shade inside it."""
    from PIL import Image, ImageChops, ImageDraw

    u_r, u_x, u_y = jitter
    r = size * (0.30 + 0.08 * u_r)
    cx = size / 2 + (u_x - 0.5) * size * 0.1
    cy = size / 2 + (u_y - 0.5) * size * 0.1
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "round":
        d.ellipse(box, fill=255)
    elif shape == "square":
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=255)
    else:
        d.polygon(_shape_points(shape, cx, cy, r), fill=255)

    pat = _pattern_mask(pattern, size)
    img = Image.new("RGB", (size, size), tuple(background))
    img.paste(tuple(colour_rgb), mask=mask)
    img.paste(tuple(int(v * 0.55) for v in colour_rgb), mask=ImageChops.multiply(mask, pat))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- keys
def _width(prefix_min: int, n: int) -> int:
    return max(prefix_min, len(str(max(n - 1, 0))))


def user_key(cfg: SyntheticConfig, user_id: int) -> str:
    return f"u{user_id:0{_width(6, cfg.n_users)}d}"


def item_key(cfg: SyntheticConfig, item_id: int) -> str:
    return f"i{item_id:0{_width(5, cfg.n_items)}d}"


@lru_cache(maxsize=4)
def _item_key_array(n_items: int) -> pa.Array:
    wd = _width(5, n_items)
    return pa.array([f"i{i:0{wd}d}" for i in range(n_items)])


def _ranges(n: int, k: int) -> list[tuple[int, int]]:
    k = max(1, min(k, n))
    cuts = [n * i // k for i in range(k + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(k)]


def _constant(value: str, n: int) -> pa.Array:
    return pa.array([value]).take(pa.array(np.zeros(n, dtype=np.int64)))


# -------------------------------------------------------------------------------------- reader
@register("synthetic")
class SyntheticSource:
    """Reader for the synthetic world; shards are contiguous id ranges ({"lo", "hi"} dicts)."""

    def __init__(self, cfg: SourceConfig, storage: StorageConfig | None = None):
        self.cfg = cfg
        self.storage = storage
        self.syn: SyntheticConfig = cfg.synthetic
        validate_synthetic(self.syn)

    def item_shards(self) -> list[dict]:
        return [
            {"kind": "items", "index": i, "lo": lo, "hi": hi}
            for i, (lo, hi) in enumerate(_ranges(self.syn.n_items, self.syn.n_item_shards))
        ]

    def interaction_shards(self) -> list[dict]:
        return [
            {"kind": "interactions", "index": i, "lo": lo, "hi": hi}
            for i, (lo, hi) in enumerate(_ranges(self.syn.n_users, self.syn.n_user_shards))
        ]

    def read_items(self, shard: dict) -> pa.Table:
        if shard.get("kind") != "items":
            raise ValueError(f"not an item shard: {shard}")
        syn, w = self.syn, world(self.syn)
        ids = np.arange(shard["lo"], shard["hi"], dtype=np.int64)
        a = item_attributes(syn, ids)
        jit = _unif(_hash(syn.seed, S_IMG, ids[:, None], np.arange(3)[None, :]))
        titles, descs, cats, images = [], [], [], []
        for k in range(len(ids)):
            c = int(a["category_id"][k])
            noun = _named([x[1] for x in CATEGORIES], c)
            dept = CATEGORIES[c % len(CATEGORIES)][2]
            colour, shape, pattern, brand, style = (
                a["colour"][k],
                a["shape"][k],
                a["pattern"][k],
                a["brand"][k],
                a["style"][k],
            )
            line = f" {_named(_LINES, int(a['title_rank'][k]))}" if syn.distinct_titles else ""
            titles.append(f"{brand} {colour.title()} {pattern.title()} {noun}{line}")
            article = "An" if colour[0] in "aeiou" else "A"
            descs.append(
                f"{article} {colour} {shape} {noun.lower()} with a {pattern} pattern in {style} style, "
                f"by {brand}. Part of our {w.category_names[c].lower()} collection."
            )
            cats.append([dept, w.category_names[c]])
            if syn.with_images:
                images.append(
                    render_image(
                        syn.image_size,
                        a["colour_rgb"][k],
                        shape,
                        pattern,
                        BACKGROUNDS[int(a["style_id"][k]) % len(BACKGROUNDS)],
                        tuple(jit[k]),
                    )
                )
        n = len(ids)
        table = pa.table(
            {
                "item_key": _item_key_array(syn.n_items).take(pa.array(ids)),
                "title": pa.array(titles, pa.string()),
                "brand": pa.array(a["brand"], pa.string()),
                "categories": pa.array(cats, pa.list_(pa.string())),
                "price": pa.array(a["price"].astype(np.float32)),
                "description": pa.array(descs, pa.string()),
                "image": pa.array(images if syn.with_images else [None] * n, pa.binary()),
                "domain": _constant(self.cfg.domain, n),
            }
        )
        return conform(table, RAW_ITEMS)

    def read_interactions(self, shard: dict) -> pa.Table:
        if shard.get("kind") != "interactions":
            raise ValueError(f"not an interaction shard: {shard}")
        syn = self.syn
        g = generate_interaction_arrays(syn, shard["lo"], shard["hi"])
        wd = _width(6, syn.n_users)
        ukeys = pa.array([f"u{u:0{wd}d}" for u in range(shard["lo"], shard["hi"])])
        n = len(g["item_id"])
        table = pa.table(
            {
                "user_key": ukeys.take(pa.array(g["user_id"] - shard["lo"])),
                "item_key": _item_key_array(syn.n_items).take(pa.array(g["item_id"])),
                "ts": pa.array(g["ts"]),
                "rating": pa.array(g["rating"]),
                "review": g["review"],
                "domain": _constant(self.cfg.domain, n),
            }
        )
        return conform(table, RAW_INTERACTIONS)

    def fingerprint(self) -> str:
        # Shard counts only change the parallelism, not the data, so they are left out.
        d = dataclasses.asdict(self.syn)
        d.pop("n_user_shards")
        d.pop("n_item_shards")
        blob = json.dumps(
            {"synthetic": d, "domain": self.cfg.domain, "version": GENERATOR_VERSION}, sort_keys=True
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
