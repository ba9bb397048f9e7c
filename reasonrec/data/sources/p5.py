"""P5-indexed Amazon bundles (e.g. the public P5 Amazon Beauty bundle: a folder holding its files).

Files under ``cfg.path``:
* ``sequential_data.txt``: one line per user, ``user_id item_id item_id ...`` (1-based P5 ids,
  time order). Split into byte-range shards.
* ``datamaps.json`` (optional): ``id2user`` / ``id2item`` map P5 ids to reviewerID / ASIN.
* ``items.jsonl`` (optional): ``item_id``, ``asin``, ``title_words``, ``attributes``.

Keys: user_key = reviewerID (the P5 id when unmapped), item_key = ASIN (likewise). There is no
time in P5, so ts = the item's position in the user's sequence.
"""

from __future__ import annotations

import html
import json
from typing import Any

import pyarrow as pa

from reasonrec.data.schemas import RAW_INTERACTIONS, RAW_ITEMS
from reasonrec.data.sources import register
from reasonrec.data.sources._common import (
    Chunk,
    FolderSource,
    decode,
    fingerprint,
    json_records,
    key,
    line_chunks,
    read_chunk,
    short,
    table,
)

# Top-level categories of Amazon's Beauty tree (below the dropped root "Beauty").
BEAUTY_TOP = frozenset({"Makeup", "Skin Care", "Hair Care", "Fragrance", "Tools & Accessories", "Bath & Body"})
NO_BRAND = "Unknown"


def top_categories(attribute_lists: list[list[str]]) -> frozenset[str]:
    """Top-level category names, learned from the data so other P5 bundles (Sports, Toys) work.

    ``attributes`` is ``[brand?] + category path`` (root first). A name that never appears
    after position 0 can only be a brand, and whatever follows a brand is a path root; so the
    roots are the second names of lists whose first name never appears deeper. On Beauty this
    yields exactly BEAUTY_TOP.
    """
    deeper = {a for attrs in attribute_lists for a in attrs[1:]}
    return frozenset(attrs[1] for attrs in attribute_lists if len(attrs) > 1 and attrs[0] not in deeper)


def split_attributes(attrs: list[str], top: frozenset[str]) -> tuple[str | None, list[str]]:
    """Brand vs categories.

    Rule: a category path starts with a top-level category, and a brand, when present, is the
    single name in front of it. So the first name is the category root (no brand) when it is a
    top-level name and the next name is not one too; otherwise it is the brand. That keeps
    brands that share a name with a sub-category ("Retinol", "Scissors") and a brand literally
    called like a root (["Skin Care", "Skin Care", "Face", ...]). "Unknown" means no brand;
    so does a blank first name (dropped by the caller before this rule runs). Names are
    HTML-unescaped first ("L&#39;Oreal Paris" -> "L'Oreal Paris").
    """
    if not attrs:
        return None, []
    if attrs[0] in top and not (len(attrs) > 1 and attrs[1] in top):
        return None, list(attrs)
    brand = attrs[0]
    return (None if brand == NO_BRAND else brand), list(attrs[1:])


@register("p5")
class P5Source(FolderSource):
    SEQUENCES = "sequential_data.txt"
    DATAMAPS = "datamaps.json"
    ITEMS = "items.jsonl"

    kind, needs, lazy = "p5", "folder with sequential_data.txt", ("_maps",)

    # ------------------------------------------------------------------------------ helpers
    def _exists(self, name: str) -> bool:
        return self.loc.fs.exists(self.loc.join(name))

    def maps(self) -> tuple[dict[str, str], dict[str, str]]:
        if self._maps is None:
            id2user: dict[str, str] = {}
            id2item: dict[str, str] = {}
            if self._exists(self.DATAMAPS):
                with self.loc.fs.open(self.loc.join(self.DATAMAPS), "rb") as f:
                    dm = json.load(f)
                id2user = {str(k): str(v) for k, v in (dm.get("id2user") or {}).items()}
                id2item = {str(k): str(v) for k, v in (dm.get("id2item") or {}).items()}
            self._maps = (id2user, id2item)
        return self._maps

    # -------------------------------------------------------------------------------- items
    def item_shards(self) -> list[Any]:
        # P5 catalogs are small (~10^4 items) and the brand rule needs every item's attributes,
        # so the catalog is one shard.
        return ["items"]

    def read_items(self, shard: Any) -> pa.Table:
        # Every line of items.jsonl becomes a row, used by a user or not; items that users have
        # but the catalog lacks get key-only stubs in prepare.
        _, id2item = self.maps()
        recs: list[tuple[dict | None, str | None]] = []
        if self._exists(self.ITEMS):
            path = self.loc.join(self.ITEMS)
            for chunk in line_chunks(self.loc.fs, path, shard_bytes=1 << 62):
                recs.extend(json_records(self.loc.fs, chunk))
        attrs_of = [
            [html.unescape(str(a)).strip() for a in (r.get("attributes") or []) if a is not None and str(a).strip()]
            if r is not None and isinstance(r.get("attributes"), list)
            else []
            for r, _ in recs
        ]
        top = BEAUTY_TOP | top_categories(attrs_of)

        cols: dict[str, list] = {c: [] for c in ("item_key", "title", "brand", "categories", "error")}
        for (rec, err), attrs in zip(recs, attrs_of):
            if rec is None:
                for c in cols:
                    cols[c].append(None)
                cols["error"][-1] = err
                continue
            pid = key(rec.get("item_id"))
            item_key = key(rec.get("asin")) or (id2item.get(pid) if pid else None) or pid
            brand, cats = split_attributes(attrs, top)
            cols["item_key"].append(item_key)
            cols["title"].append(key(rec.get("title_words")))
            cols["brand"].append(brand)
            cols["categories"].append(cats)
            cols["error"].append(None)
        n = len(cols["item_key"])
        cols["domain"] = [self.cfg.domain] * n
        return table(cols, RAW_ITEMS, n)

    # ------------------------------------------------------------------------- interactions
    def interaction_shards(self) -> list[Any]:
        return line_chunks(self.loc.fs, self.loc.join(self.SEQUENCES), shard_bytes=self.shard_bytes)

    def read_interactions(self, shard: Chunk) -> pa.Table:
        id2user, id2item = self.maps()
        rows: list[tuple[str | None, str | None, int | None, str | None]] = []
        for _, raw in read_chunk(self.loc.fs, shard):
            try:
                tokens = decode(raw).split()
            except UnicodeDecodeError as exc:
                rows.append((None, None, None, f"bad utf-8: {short(exc)}"))
                continue
            if not tokens:
                continue
            user = id2user.get(tokens[0], tokens[0])
            if len(tokens) == 1:  # a user without items: kept (item null) so prepare counts it
                rows.append((user, None, 0, None))
            rows.extend((user, id2item.get(iid, iid), pos, None) for pos, iid in enumerate(tokens[1:]))
        users, items, ts, errors = (list(c) for c in zip(*rows)) if rows else ([], [], [], [])
        return table(
            {"user_key": users, "item_key": items, "ts": ts, "error": errors, "domain": [self.cfg.domain] * len(rows)},
            RAW_INTERACTIONS,
            len(rows),
        )

    def fingerprint(self) -> str:
        names = [n for n in (self.SEQUENCES, self.DATAMAPS, self.ITEMS) if n == self.SEQUENCES or self._exists(n)]
        return fingerprint([self.loc.to_url(self.loc.join(n)) for n in names], self.storage, {"kind": "p5"})
