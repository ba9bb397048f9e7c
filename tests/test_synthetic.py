"""The synthetic world: contracts, determinism, sharding, and its documented ground truth."""

from __future__ import annotations

import dataclasses
import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from reasonrec.config import SourceConfig, SyntheticConfig, load_config
from reasonrec.data.schemas import RAW_INTERACTIONS, RAW_ITEMS
from reasonrec.data.sources import _REGISTRY, read_all_interactions, read_all_items
from reasonrec.data.sources.synthetic import (
    BACKGROUNDS,
    PATTERNS,
    SHAPES,
    SyntheticSource,
    expected_length,
    generate_interaction_arrays,
    item_attributes,
    oracle_next_item_scores,
    user_latents,
    world,
    world_transition_matrix,
)

ROOT = Path(__file__).resolve().parent.parent


def _source(**kw) -> SyntheticSource:
    return SyntheticSource(SourceConfig(kind="synthetic", domain="syn", synthetic=SyntheticConfig(**kw)))


@pytest.fixture(scope="module")
def tiny():
    src = _source()
    return src, read_all_items(src), read_all_interactions(src)


def test_registered_and_schemas(tiny):
    src, items, inter = tiny
    assert _REGISTRY["synthetic"] is SyntheticSource
    assert items.schema.equals(RAW_ITEMS) and inter.schema.equals(RAW_INTERACTIONS)
    assert items.num_rows == src.syn.n_items
    keys = items.column("item_key").to_pylist()
    assert len(set(keys)) == len(keys) and all(re.fullmatch(r"i\d{5}", k) for k in keys)
    assert all(re.fullmatch(r"u\d{6}", k) for k in inter.column("user_key").unique().to_pylist())
    assert set(inter.column("item_key").unique().to_pylist()) <= set(keys)
    assert set(items.column("domain").to_pylist()) == {"syn"} == set(inter.column("domain").to_pylist())
    assert items.column("error").null_count == items.num_rows
    assert inter.column("error").null_count == inter.num_rows
    r = inter.column("rating").to_numpy()
    assert set(np.unique(r)) <= {1.0, 2.0, 3.0, 4.0, 5.0} and len(np.unique(r)) == 5
    assert all(p > 0 for p in items.column("price").to_pylist())
    assert all(len(c) == 2 for c in items.column("categories").to_pylist())


def test_deterministic_and_seed_sensitive(tiny):
    src, items, inter = tiny
    again = _source()
    assert read_all_items(again).equals(items) and read_all_interactions(again).equals(inter)
    assert again.fingerprint() == src.fingerprint()
    other = _source(seed=1)
    assert not read_all_interactions(other).equals(inter)
    assert not read_all_items(other).column("title").equals(items.column("title"))
    assert other.fingerprint() != src.fingerprint()


def test_shard_count_does_not_change_the_data(tiny):
    src, items, inter = tiny
    one = _source(n_user_shards=1, n_item_shards=1)
    many = _source(n_user_shards=7, n_item_shards=3)
    assert len(many.interaction_shards()) == 7 and len(many.item_shards()) == 3
    assert read_all_interactions(one).equals(inter) and read_all_interactions(many).equals(inter)
    assert read_all_items(one).equals(items) and read_all_items(many).equals(items)
    assert one.fingerprint() == many.fingerprint() == src.fingerprint()
    # A shard is a pure function of its descriptor: order of reading does not matter.
    shards = many.interaction_shards()
    assert many.read_interactions(shards[3]).equals(many.read_interactions(shards[3]))
    # More shards than users: every user still generated exactly once.
    small = _source(n_users=5, n_user_shards=9)
    assert read_all_interactions(small).column("user_key").unique().to_pylist() == [f"u{i:06d}" for i in range(5)]


def test_long_tail_activity(tiny):
    _, _, inter = tiny
    counts = np.array(list(Counter(inter.column("user_key").to_pylist()).values()))
    assert (counts <= 5).mean() > 0.6
    assert counts.max() >= 10 * np.median(counts)
    # The documented length law: the empirical mean matches the exact expectation.
    syn = SyntheticConfig(n_users=20000)
    lengths = user_latents(syn, np.arange(syn.n_users))["length"]
    assert lengths.min() >= syn.min_len and lengths.max() <= syn.max_len
    assert abs(lengths.mean() - expected_length(syn)) < 0.05 * expected_length(syn)


def test_timestamps_increase_per_user(tiny):
    src, _, inter = tiny
    users = inter.column("user_key").to_numpy(zero_copy_only=False)
    ts = inter.column("ts").to_numpy()
    same = users[1:] == users[:-1]
    assert inter.schema.field("ts").type == pa.int64()
    assert np.all(np.diff(ts)[same] > 0)
    assert ts.min() >= src.syn.start_ts


def test_images_decode_and_show_the_item_colour(tiny):
    src, items, _ = tiny
    attrs = item_attributes(src.syn)
    for k in range(0, items.num_rows, 7):
        img = Image.open(io.BytesIO(items.column("image")[k].as_py()))
        assert img.format == "PNG" and img.size == (src.syn.image_size,) * 2
        pixels = Counter(map(tuple, np.asarray(img.convert("RGB")).reshape(-1, 3).tolist()))
        fg = [(c, n) for c, n in pixels.most_common() if c not in BACKGROUNDS]
        assert fg[0][0] == attrs["colour_rgb"][k]
        title, desc = items.column("title")[k].as_py(), items.column("description")[k].as_py()
        assert attrs["colour"][k] in title.lower() and attrs["brand"][k] in title
        assert attrs["shape"][k] in desc and attrs["pattern"][k] in desc
    # Visual attributes tie to category and style.
    w = world(src.syn)
    assert np.array_equal(w.shape, w.category % len(SHAPES))
    assert np.array_equal(w.pattern, w.style % len(PATTERNS))
    palette_hit = ((w.colour - 3 * w.category) % 12 < 3).mean()
    assert palette_hit > 0.8
    no_images = _source(with_images=False)
    assert no_images.read_items(no_images.item_shards()[0]).column("image").null_count > 0


def test_distinct_titles_name_every_item_once(tiny):
    src, items, _ = tiny
    shared = items.column("title").to_pylist()
    assert len(set(shared)) < len(shared)  # the default world repeats titles
    distinct = read_all_items(_source(distinct_titles=True, n_item_shards=3)).column("title").to_pylist()
    assert len(set(distinct)) == len(distinct)
    # The same title with a product-line name; items that shared a title get different lines.
    assert all(d.startswith(s + " ") for s, d in zip(shared, distinct))
    rank = item_attributes(src.syn)["title_rank"]
    for title in {t for t, n in Counter(shared).items() if n > 1}:
        ks = [k for k, t in enumerate(shared) if t == title]
        assert rank[ks].tolist() == list(range(len(ks)))  # by item id: the same in every sharding


def test_reviews_mention_an_item_feature(tiny):
    src, _, inter = tiny
    attrs = item_attributes(src.syn)
    items = [int(k[1:]) for k in inter.column("item_key").to_pylist()]
    reviews = inter.column("review").to_pylist()
    ratings = inter.column("rating").to_pylist()
    for i, text, r in zip(items, reviews, ratings):
        feats = [
            f"the {attrs['colour'][i]} colour",
            f"the {attrs['shape'][i]} shape",
            f"the {attrs['pattern'][i]} pattern",
            f"the {attrs['brand'][i]} brand",
        ]
        assert any(f in text for f in feats), text
        if r >= 4:
            assert not text.startswith(("Disappointed", "Did not", "Returned", "Sadly"))


def _hit_rate_at_10(syn: SyntheticConfig):
    g = generate_interaction_arrays(syn, 0, syn.n_users, with_reviews=False)
    n = syn.n_items
    starts = np.flatnonzero(np.r_[True, np.diff(g["user_id"]) != 0])
    seqs = np.split(g["item_id"], starts[1:])
    # Fit on all but each user's last item.
    trans, pop = np.zeros((n, n)), np.zeros(n)
    for s in seqs:
        pop += np.bincount(s[:-1], minlength=n)
        np.add.at(trans, (s[:-2], s[1:-1]), 1)
    hits = {"markov": 0, "pop": 0, "oracle": 0}
    evaluated = 0
    top_pop = np.argsort(-pop)[:10]
    for uid, s in zip(g["user_id"][starts], seqs):
        if len(s) < 3:
            continue
        evaluated += 1
        target, history = s[-1], s[:-1]
        hits["pop"] += target in top_pop
        hits["markov"] += target in np.argsort(-(trans[history[-1]] + 1e-3 * pop))[:10]
        hits["oracle"] += target in np.argsort(-oracle_next_item_scores(syn, history, int(uid)))[:10]
    return {k: v / evaluated for k, v in hits.items()}, evaluated


def test_sequential_structure_beats_popularity():
    syn = SyntheticConfig()
    hr, evaluated = _hit_rate_at_10(syn)
    assert evaluated > 100
    assert hr["markov"] > hr["pop"] + 0.25, hr
    assert hr["oracle"] >= hr["markov"] - 0.05, hr
    # Without transitions there is no sequential signal left to exploit.
    flat, _ = _hit_rate_at_10(dataclasses.replace(syn, p_transition=0.0))
    assert flat["markov"] < hr["markov"] - 0.25, (flat, hr)


def test_ground_truth_helpers_are_distributions():
    syn = SyntheticConfig()
    m = world_transition_matrix(syn)
    assert m.shape == (syn.n_items, syn.n_items) and np.allclose(m.sum(1), 1.0)
    p = oracle_next_item_scores(syn, [3, 17], user_id=5)
    assert np.isclose(p.sum(), 1.0) and p.min() > 0
    succ = world(syn).successors[17]
    assert p[succ].sum() > syn.p_transition
    assert np.isclose(oracle_next_item_scores(syn, []).sum(), 1.0)
    # Empirically, about p_transition of the steps after the first follow a successor edge.
    g = generate_interaction_arrays(syn, 0, 2000, with_reviews=False)
    same = g["user_id"][1:] == g["user_id"][:-1]
    prev, nxt = g["item_id"][:-1][same], g["item_id"][1:][same]
    on_edge = (world(syn).successors[prev] == nxt[:, None]).any(1).mean()
    assert syn.p_transition <= on_edge < syn.p_transition + 0.15


def test_invalid_config_and_preset():
    with pytest.raises(ValueError, match="n_items"):
        _source(n_items=5, n_categories=4, n_styles=3)
    with pytest.raises(ValueError, match="p_transition"):
        _source(p_transition=0.9, p_noise=0.2)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    src = SyntheticSource(cfg.data.sources[0])
    assert len(src.read_items(src.item_shards()[0])) > 0
