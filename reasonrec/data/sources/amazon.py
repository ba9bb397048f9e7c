"""Raw Amazon review data (McAuley et al., 2014 and 2018 releases): JSON lines, optionally .gz.

Under ``cfg.path``: a reviews file and a metadata file. ``cfg.reviews_file`` / ``cfg.meta_file``
name them; by default the metadata file is the ``.json``/``.jsonl`` (optionally ``.gz``) file
whose name contains "meta" and the reviews file is the other one. The metadata file is optional
(prepare then stubs the items).

Both spellings are read: ``categories`` (2014, list of paths) / ``category`` (2018, list of
names), ``imUrl`` (2014) / ``imageURL``/``imageURLHighRes`` (2018, lists), numeric (2014) or
"$12.99"-style (2018) prices. 2014 metadata lines are Python literals, not JSON.

Images: with ``cfg.images_dir`` (local or s3://), ``<asin>.jpg``/``.jpeg``/``.png`` is embedded
in ``image`` and its location goes to ``image_uri`` (a missing file leaves ``image`` null and
``image_uri`` the metadata's URL, if any); without it the metadata's URL (http(s), fetched by the
``images`` stage unless ``images.fetch_http`` is off) goes to ``image_uri``.

Every reviewed item whose photo is in ``cfg.images_dir`` gets it, metadata or not: an asin that the
reviews reference but the metadata file lacks (or every asin, without a metadata file) becomes a
photo-only item row (key and ``image_uri``; the ``images`` stage fetches the bytes) instead of a
key-only stub in ``prepare``. Those rows come from one extra item shard (:data:`PHOTO_ONLY`), which
streams the reviews and the metadata once more for their keys; it exists only with ``images_dir``.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any, Iterator

import pyarrow as pa

from reasonrec.config import SourceConfig, StorageConfig
from reasonrec.data.schemas import RAW_INTERACTIONS, RAW_ITEMS
from reasonrec.data.sources import register
from reasonrec.data.sources._common import (
    PHOTO_ONLY,
    Chunk,
    FolderSource,
    Loc,
    append_row,
    fingerprint,
    json_records,
    key,
    line_chunks,
    photo_listing,
    photo_only_items,
    price,
    short,
    table,
    text,
)

_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def categories(rec: dict) -> list[str]:
    """2014 ``categories`` is a list of paths (["Beauty", "Makeup", ...]); 2018 ``category`` is
    one path. Flattened in order, each name once, HTML entities decoded."""
    raw = rec.get("categories")
    if raw is None:
        raw = rec.get("category")
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [raw]
    out: list[str] = []
    for entry in raw:
        for name in entry if isinstance(entry, (list, tuple)) else [entry]:
            name = html.unescape(str(name)).strip() if name is not None else ""
            if name and name not in out:
                out.append(name)
    return out


def image_url(rec: dict) -> str | None:
    for field in ("imUrl", "imageURLHighRes", "imageURL"):
        val = rec.get(field)
        if isinstance(val, (list, tuple)):
            val = next((v for v in val if v), None)
        if val:
            return str(val).strip() or None
    return None


def review_text(summary: Any, body: Any) -> str | None:
    """ "summary. body": the summary reads as the review's first sentence."""
    s, b = text(summary), text(body)
    if not s or not b or s == b:
        return s or b
    return f"{s} {b}" if s[-1] in ".!?" else f"{s}. {b}"


def review_ts(rec: dict) -> int | None:
    t = rec.get("unixReviewTime")
    if t is not None and str(t).strip() != "":
        return int(float(t))
    when = rec.get("reviewTime")  # "09 1, 2013" in both releases
    if when:
        return int(datetime.strptime(str(when).strip(), "%m %d, %Y").replace(tzinfo=UTC).timestamp())
    return None


@register("amazon")
class AmazonSource(FolderSource):
    kind, needs, lazy = "amazon", "folder with the review and meta files", ("_images",)

    def __init__(self, cfg: SourceConfig, storage: StorageConfig):
        super().__init__(cfg, storage)
        self._files: tuple[str, str | None] | None = None

    # ------------------------------------------------------------------------------ files
    def files(self) -> tuple[str, str | None]:
        """(reviews path, metadata path or None), bare paths on ``self.loc.fs``."""
        if self._files is None:
            names = (
                []
                if self.cfg.reviews_file and self.cfg.meta_file
                else [n for n in self.loc.listdir() if n.lower().endswith(_JSON_SUFFIXES)]
            )
            meta = self.cfg.meta_file or next((n for n in names if "meta" in n.lower()), None)
            reviews = self.cfg.reviews_file
            if reviews is None:
                rest = [n for n in names if n != meta and "meta" not in n.lower()]
                if len(rest) != 1:
                    raise ValueError(
                        f"amazon source: cannot tell the reviews file among {rest} under {self.cfg.path}; "
                        "set data.sources[].reviews_file"
                    )
                reviews = rest[0]
            self._files = (self.loc.join(reviews), self.loc.join(meta) if meta else None)
        return self._files

    def images(self) -> dict[str, str]:
        """asin -> image URL, from one listing of ``images_dir`` (jpg preferred over png)."""
        if self._images is None:
            self._images = photo_listing(Loc(self.cfg.images_dir, self.storage) if self.cfg.images_dir else None)
        return self._images

    # -------------------------------------------------------------------------------- items
    def item_shards(self) -> list[Any]:
        _, meta = self.files()
        shards: list[Any] = line_chunks(self.loc.fs, meta, shard_bytes=self.shard_bytes) if meta else []
        return (shards + [PHOTO_ONLY]) if self.cfg.images_dir and self.images() else shards

    def read_items(self, shard: Chunk | str) -> pa.Table:
        names = ("item_key", "title", "brand", "categories", "price", "description", "image", "image_uri", "error")
        cols: dict[str, list] = {c: [] for c in names}
        if shard == PHOTO_ONLY:
            for asin, uri in photo_only_items(self._reviewed(), self._described(), self.images().get):
                append_row(cols, item_key=asin, categories=[], image_uri=uri)
            return self._items(cols)
        embed = bool(self.cfg.images_dir)
        images = self.images() if embed else {}
        img_loc = Loc(self.cfg.images_dir, self.storage) if embed else None
        for rec, err in json_records(self.loc.fs, shard):
            row = dict.fromkeys(names)
            row["error"] = err
            if rec is not None:
                asin = key(rec.get("asin"))
                title = text(rec.get("title"))
                row.update(
                    item_key=asin,
                    title=html.unescape(title) if title else None,
                    brand=text(rec.get("brand")),
                    categories=categories(rec),
                    price=price(rec.get("price")),
                    description=text(rec.get("description")),
                )
                if embed:
                    url = images.get(asin) if asin else None
                    row["image"] = img_loc.fs.cat_file(url) if url else None
                    row["image_uri"] = url or image_url(rec)
                else:
                    row["image_uri"] = image_url(rec)
            for c in names:
                cols[c].append(row[c])
        return self._items(cols)

    def _items(self, cols: dict[str, list]) -> pa.Table:
        n = len(cols["item_key"])
        cols["domain"] = [self.cfg.domain] * n
        return table(cols, RAW_ITEMS, n)

    def _reviewed(self) -> Iterator[str | None]:
        """The reviews' asins, parsed as :meth:`read_interactions` parses them."""
        for chunk in self.interaction_shards():
            for rec, _ in json_records(self.loc.fs, chunk):
                if rec is not None:
                    yield key(rec.get("asin"))

    def _described(self) -> Iterator[str | None]:
        """The metadata's asins, parsed as :meth:`read_items` parses them (a malformed line has
        none: its item, quarantined, gets a photo-only row if it has a photo)."""
        _, meta = self.files()
        for chunk in line_chunks(self.loc.fs, meta, shard_bytes=self.shard_bytes) if meta else ():
            for rec, _ in json_records(self.loc.fs, chunk):
                if rec is not None:
                    yield key(rec.get("asin"))

    # ------------------------------------------------------------------------- interactions
    def interaction_shards(self) -> list[Any]:
        reviews, _ = self.files()
        return line_chunks(self.loc.fs, reviews, shard_bytes=self.shard_bytes)

    def read_interactions(self, shard: Chunk) -> pa.Table:
        names = ("user_key", "item_key", "ts", "rating", "review", "error")
        cols: dict[str, list] = {c: [] for c in names}
        for rec, err in json_records(self.loc.fs, shard):
            row = dict.fromkeys(names)
            row["error"] = err
            if rec is not None:
                row.update(
                    user_key=key(rec.get("reviewerID")),
                    item_key=key(rec.get("asin")),
                    review=review_text(rec.get("summary"), rec.get("reviewText")),
                )
                try:
                    row["ts"] = review_ts(rec)
                except (ValueError, TypeError, OverflowError) as exc:
                    row["error"] = f"bad review time: {short(exc)}"
                overall = rec.get("overall")
                try:
                    row["rating"] = float(overall) if overall is not None and str(overall).strip() != "" else None
                except (ValueError, TypeError):
                    row["error"] = row["error"] or f"bad rating: {short(repr(overall))}"
            for c in names:
                cols[c].append(row[c])
        n = len(cols["user_key"])
        cols["domain"] = [self.cfg.domain] * n
        return table(cols, RAW_INTERACTIONS, n)

    def fingerprint(self) -> str:
        reviews, meta = self.files()
        urls = [self.loc.to_url(reviews), self.loc.to_url(meta) if meta else None, self.cfg.images_dir]
        return fingerprint(urls, self.storage, {"kind": "amazon"})
